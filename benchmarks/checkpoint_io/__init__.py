"""Checkpoint I/O benchmark: our S3 fast path against raw boto3, naive MLflow and the plain-HTTP floor.

    python -m benchmarks.checkpoint_io [--sizes 16MB,512MB,2GB] [--rounds 5] [--quick] [--output PATH]

It starts a local stack of its own (SeaweedFS + MLflow server in ``.tracking/bench``, on ports
that do not clash with the defaults) and stops it at the end, or reuses the stack already
running there, or with ``--use-env`` the one the ``MLFLOW_*`` / ``AWS_*`` variables describe.
Every contender writes to the same endpoint, bucket and credentials, and every load ends with
the same ready model and optimizer. Contenders run interleaved, in a rotating order, for one
warm-up round and ``--rounds`` measured rounds; each one's objects are deleted right after it
is measured. Medians, ratios and PASS/FAIL against the targets are printed and written as JSON.

Parts: :mod:`.stack` (the endpoint and reclaiming its space), :mod:`.runs` (the MLflow runs
measured into), :mod:`.model` (models of a given size), :mod:`.contenders` (timed saves and
loads), :mod:`.probes` (memory, fixed cost, request counts), :mod:`.report` (targets, verdicts,
tables) and :mod:`.cli` (arguments and the order of it all).
"""

from benchmarks.checkpoint_io.contenders import CONTENDERS
from benchmarks.checkpoint_io.report import METRICS, TARGETS

__all__ = ["CONTENDERS", "METRICS", "TARGETS"]
