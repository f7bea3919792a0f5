"""MLflow tracking: one parent run per pipeline run, a nested run per stage, params, metrics and artifacts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from ddm_ops.config import Params

EXPERIMENT = "ddm"


def tracking_uri(params: Params, root: Path) -> str:
    return params.report.tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def stage_param_blocks(root: Path) -> dict[str, list[str]]:
    """The params blocks each stage declares in dvc.yaml (the DAG's single source)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: [p for p in spec.get("params", []) if isinstance(p, str)] for name, spec in stages.items()}


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def log_pipeline_run(
    root: Path,
    params: Params,
    stage_metrics: dict[str, dict[str, float]],
    summary: dict[str, float],
    artifacts: list[Path],
    tables: dict[str, Any] | None = None,
    datasets: dict[str, tuple[Any, Path]] | None = None,
) -> str:
    """Log one pipeline run (parent) with a nested run per stage; return the parent run id.

    `tables` ({artifact name: DataFrame}) are logged as MLflow tables, which the UI shows and compares across runs;
    `datasets` ({name: (DataFrame, file it was read from)}) as the run's MLflow datasets (schema, digest, source).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params, root))
    name = params.report.experiment or EXPERIMENT
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(root / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(name)
    dumped = params.model_dump(mode="json")
    run_name = os.environ.get("DVC_EXP_NAME") or time.strftime("ddm-%Y%m%d-%H%M%S")
    tags = {"dataset": params.data.name, "git_commit": _git_commit(root) or "unknown"}
    blocks = stage_param_blocks(root)
    with mlflow.start_run(run_name=run_name, tags=tags) as parent:
        mlflow.log_params(flatten(dumped))
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        mlflow.log_metrics({f"{s}.{k}": float(v) for s, m in stage_metrics.items() for k, v in m.items()})
        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), path.name)
            else:
                mlflow.log_artifact(str(path))
        for name, table in (tables or {}).items():
            if len(table):
                mlflow.log_table(table, artifact_file=name)
        for name, (frame, source) in (datasets or {}).items():
            mlflow.log_input(mlflow.data.from_pandas(frame, source=str(source.resolve()), name=name), context=name)
        for stage, metrics in stage_metrics.items():
            with mlflow.start_run(run_name=stage, nested=True, tags={**tags, "stage": stage}):
                mlflow.log_params(flatten({b: dumped[b] for b in blocks.get(stage, []) if b in dumped}))
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        return parent.info.run_id
