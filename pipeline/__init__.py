"""The wiring: the stage runner DVC calls, the Prefect flow over dvc.yaml's graph, task runners and MLflow."""

import os

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

if not os.environ.get("PREFECT_API_URL"):
    # Prefect's temporary server lives only as long as one stage: its run links ("View at http://127.0.0.1:…") are
    # dead once the stage ends, and every task's "Finished in state Completed()" says less than the fan-out's own
    # progress lines. Warnings and errors (a retried or failed task) still show; with a server of your own
    # (PREFECT_API_URL, e.g. make ui) Prefect logs as usual.
    for _logger in ("PREFECT", "PREFECT_FLOW_RUNS", "PREFECT_TASK_RUNS"):
        os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_{_logger}_LEVEL", "WARNING")
