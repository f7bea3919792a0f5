"""The wiring: the stage runner DVC calls, the Prefect flow over dvc.yaml's graph, task runners and MLflow."""

import os

# The project's packages, lowest layer first: each imports only from itself and those before it (a test holds it).
PACKAGES = ("ddm_ops", "stages", "pipeline")

# Offline by default: no tool phones home (users may still override these in their environment).
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TQDM_DISABLE": "1",  # libraries' progress bars (dattri's); this project's own bars say when to show
}.items():
    os.environ.setdefault(_key, _value)
