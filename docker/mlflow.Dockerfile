# The MLflow tracking server: mlflow with the PostgreSQL driver (psycopg2) and boto3 for the bucket,
# at the versions constraints.txt pins. Build context: docker/. compose.yaml gives the command.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt mlflow psycopg2-binary boto3 \
    && useradd --system --user-group --uid 10001 --create-home --home-dir /home/mlflow mlflow

# numeric, so a runtime that enforces runAsNonRoot can verify it: the mlflow user created above
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
