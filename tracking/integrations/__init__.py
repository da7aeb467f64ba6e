"""Framework integrations: Lightning (:mod:`tracking.integrations.lightning`) and the Hugging Face
Trainer (:mod:`tracking.integrations.transformers`).

Each is thin: it hands the framework's own checkpoint (a dict, or a folder of files) to the same
commit as every other checkpoint (a logged model of the run, its files, the manifest last, READY,
the run's pointer tags), and resuming is the framework's own resume, fed from a run ID. The core
never imports this package; each subpackage needs its framework installed (``pip install
"torch-mlflow-tracking[lightning]"`` or ``[transformers]``).
"""
