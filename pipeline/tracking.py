"""MLflow tracking: one parent run per pipeline run, a nested run per stage, params, metrics (with per-epoch and
per-iteration histories) and artifacts, in an experiment that opens in MLflow's model-training view."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from ddm_ops.config import Params
from stages.artifacts import Paths, read_parquet, score_matrix
from stages.common import flatten
from stages.report import git_commit, upstream_metrics

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow 3: the runs table, not GenAI's


def tracking_uri(params: Params, root: Path) -> str:
    return params.report.tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def stage_param_blocks(root: Path) -> dict[str, list[str]]:
    """The params blocks each stage declares in dvc.yaml (the DAG's single source)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: [p for p in spec.get("params", []) if isinstance(p, str)] for name, spec in stages.items()}


def _experiment(root: Path, name: str) -> str:
    """The experiment's id, created (artifacts under <project>/mlartifacts) or tagged for the model-training view."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is None:
        location = (root / "mlartifacts").resolve().as_uri()
        return mlflow.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    if found.tags.get(KIND_TAG) != KIND:
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, KIND)
    return found.experiment_id


def _history(client: Any, run_id: str, frame: Any, step: str, prefix: str = "") -> None:
    """Every other column of `frame` as a metric over its `step` column (epoch, iteration)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{prefix}{column}", float(value), now, int(at))
        for column in frame.columns
        if column != step
        for at, value in zip(frame[step], frame[column])
    ]
    for i in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_pipeline_run(
    root: Path,
    params: Params,
    stage_metrics: dict[str, dict[str, float]],
    summary: dict[str, float],
    artifacts: list[Path],
    tables: dict[str, Any] | None = None,
    datasets: dict[str, tuple[Any, Path]] | None = None,
    histories: dict[str, tuple[Any, str]] | None = None,
    name: str | None = None,
) -> str:
    """Log one pipeline run (parent) with a nested run per stage; return the parent run id.

    `tables` ({artifact name: DataFrame}) are logged as MLflow tables, which the UI shows and compares across runs;
    `datasets` ({name: (DataFrame, file it was read from)}) as the run's MLflow datasets (schema, digest, source);
    `histories` ({stage: (DataFrame, step column)}) as step histories, in the stage's run and as `<stage>/<column>`
    in the parent. The parent run spans the stages' seconds (`stage_seconds`, which DVC may have restored
    from an earlier run) laid end to end up to now, each stage's run its own part of it.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params, root))
    client = mlflow.MlflowClient()
    experiment = _experiment(root, params.report.experiment)
    mlflow.set_experiment(experiment_id=experiment)
    dumped = params.model_dump(mode="json")
    tags = {"dataset": params.data.name, "git_commit": git_commit(root) or "unknown"}
    blocks = stage_param_blocks(root)
    histories = histories or {}
    end = int(time.time() * 1000)
    spans = {s: int(1000 * m.get("stage_seconds", 0.0)) for s, m in stage_metrics.items()}
    start = end - sum(spans.values())
    parent = client.create_run(experiment, start_time=start, tags=tags, run_name=name)
    with mlflow.start_run(run_id=parent.info.run_id):
        mlflow.log_params(flatten(dumped))
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        mlflow.log_metrics({f"{s}.{k}": float(v) for s, m in stage_metrics.items() for k, v in m.items()})
        for stage, (frame, step) in histories.items():
            _history(client, parent.info.run_id, frame, step, prefix=f"{stage}/")  # a chart section each
        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), path.name)
            else:
                mlflow.log_artifact(str(path))
        with warnings.catch_warnings():  # MLflow's hints on a local file source and on integer columns
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted", UserWarning)
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer", UserWarning)
            for name, table in (tables or {}).items():
                if len(table):
                    mlflow.log_table(table, artifact_file=name)
            for name, (frame, source) in (datasets or {}).items():
                dataset = mlflow.data.from_pandas(frame, source=str(source.resolve()), name=name)
                mlflow.log_input(dataset, context=name)
        for stage, metrics in stage_metrics.items():
            child = client.create_run(
                experiment,
                start_time=start,
                tags={**tags, "stage": stage, "mlflow.parentRunId": parent.info.run_id},
                run_name=stage,
            )
            run_id = child.info.run_id
            own = flatten({b: dumped[b] for b in blocks.get(stage, []) if b in dumped})
            client.log_batch(
                run_id,
                metrics=[mlflow.entities.Metric(k, float(v), end, 0) for k, v in metrics.items()],
                params=[mlflow.entities.Param(k, str(v)) for k, v in own.items()],
            )
            if stage in histories:
                _history(client, run_id, *histories[stage])
            start += spans[stage]
            client.set_terminated(run_id, end_time=start)
    return parent.info.run_id


HISTORY = ["epoch", "loss", "test_accuracy", "lr"]  # of the target's training, per epoch, for MLflow's charts


def log_report(root: Path, params: Params, report: Path, summary: dict[str, float]) -> str:
    """Log the run whose report was just written to `report` (its metrics.json summary as `summary`) to MLflow:
    the stages' metrics, the report and its figures, the tables and the training and matching histories."""
    import pandas as pd

    paths = Paths(root)
    stage_metrics = upstream_metrics(paths)
    objective = params.attribute.objectives[0]
    attribution = read_parquet(paths.stage("attribute") / "attribution.parquet")
    wide = score_matrix(attribution[attribution["objective"] == objective])
    run = json.loads((report / "run.json").read_text())
    return log_pipeline_run(
        root,
        params,
        stage_metrics,
        {k: v for k, v in summary.items() if k != "stage_seconds"},
        [report / "report.md", report / "report.html", report / "figures"]
        + [paths.stage("attribute") / "attribution.parquet"]
        + [paths.stage("cluster") / f for f in ("assignments.parquet", "clusters.parquet")]
        + [report / f"{t}.parquet" for t in ("methods", "data_quality", "privacy", "membership")],
        tables={
            "methods.json": read_parquet(report / "methods.parquet"),
            f"attribution_{objective}.json": wide.rename(columns=str).reset_index(),
        },
        datasets={"attribution": (attribution, paths.stage("attribute") / "attribution.parquet")},
        histories={
            "train_target": (read_parquet(paths.stage("train_target") / "history.parquet")[HISTORY], "epoch"),
            "distill": (pd.read_csv(paths.stage("distill") / "matching_curve.csv"), "iteration"),
        },
        name=run["name"],
    )
