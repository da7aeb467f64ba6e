# The MLflow tracking server with the PostgreSQL driver and boto3 for S3 artifact roots.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow>=3.15,<4" "psycopg2-binary>=2.9" "boto3>=1.34"
EXPOSE 5000
