"""Stage baselines: the methods DDM is compared with, on the same clusters, judged by the same ground truth.

Always the trivial class indicator and input similarity; then those in `baselines.methods`, each built from the
registry (ddm_ops.methods: the paper's DDM, first-order, gradient ascent, forward matching, and from the `peers`
extra dattri's and Kronfluence's methods) and run through the one attributor interface; the DDM variants distil
their synsets through the pipeline's fan-out. Every method's offline and online seconds and peak memory go to
costs.parquet. Disabled, the stage writes empty tables.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.attributors import run as run_method
from ddm_ops.config import Params
from ddm_ops.ddm import DDM, Distiller
from ddm_ops.methods import ALWAYS, METHODS, check_installed
from ddm_ops.train import DivergenceError
from stages.artifacts import COST_COLUMNS, Paths, concat_or_empty, long_logits, long_scores, write_parquet
from stages.common import FanOut, dataset, in_process
from stages.synsets import distill_all
from stages.task import run_task

SCORE_COLUMNS = {
    "method": "reference method (see costs.parquet)",
    "cluster_id": "removed cluster",
    "test_index": "position in the dataset's fixed test split",
    "objective": "margin, loss or probability (as in attribution.parquet)",
    "score": "predicted drop of the objective when the cluster is removed (positive = the cluster helps)",
}
SCORE_DTYPES = {"method": "str", "cluster_id": "int64", "test_index": "int64", "objective": "str", "score": "float64"}
OUTPUT_COLUMNS = {
    "method": "method that produced the removed model",
    "cluster_id": "removed cluster",
    "test_index": "position in the dataset's fixed test split",
    "class": "output class",
    "logit": "logit of the removed model",
}
OUTPUT_DTYPES = {"method": "str", "cluster_id": "int64", "test_index": "int64", "class": "int64", "logit": "float32"}


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    metrics: dict = {"enabled": int(params.baselines.enabled)}
    frames, outputs, costs = [], [], []
    if params.baselines.enabled:
        check_installed(list(params.baselines.methods))
        ds = dataset(params)
        task = run_task(params, paths, calibrate=any(METHODS[m].calibrated for m in params.baselines.methods))
        x, y, ids = ds.x_test.to(task.device), ds.y_test.to(task.device), np.arange(task.n_clusters)
        for name in (*ALWAYS, *params.baselines.methods):
            start = time.perf_counter()
            method = METHODS[name].build(params)
            if isinstance(method, DDM):  # its synsets through the pipeline's fan-out, one folder per cluster
                method.distiller = distiller(params, paths, out / f"{name}_clusters", fan_out)
            try:
                result = run_method(method, task, x, y, params.attribute.objectives, name)
            except DivergenceError as err:
                hint = f"lower its step (baselines.* params), or leave {name} out of baselines.methods"
                raise DivergenceError(f"baselines: {err}; {hint}") from None
            if name == "forward_matching":
                torch.save(method.synset, out / "forward_synset.pt")  # also read by the privacy report
            frames += [
                long_scores(matrix, ids, ds.test_index).assign(method=name, objective=objective)
                for objective, matrix in result.scores.items()
            ]
            if result.logits is not None:
                outputs.append(long_logits(result.logits.numpy(), ids, ds.test_index).assign(method=name))
            costs.append(
                {
                    "method": name,
                    "offline_seconds": result.offline_seconds,
                    "online_seconds": result.online_seconds,
                    "online_seconds_per_query": result.online_seconds / len(ds.test_index),
                    "peak_memory_mb": result.peak_memory_mb,
                }
            )
            if name not in ALWAYS:
                metrics[f"{name}_seconds"] = time.perf_counter() - start
            if result.step_size is not None:
                metrics[f"{name}_step_size"] = result.step_size
    if not (out / "forward_synset.pt").is_file():
        torch.save({}, out / "forward_synset.pt")  # declared in dvc.yaml: present, empty, without forward_matching
    write_parquet(
        concat_or_empty(frames, SCORE_DTYPES),
        out / "baselines.parquet",
        "Scores of the reference methods, in attribution.parquet's layout plus `method`.",
        SCORE_COLUMNS,
    )
    write_parquet(
        concat_or_empty(outputs, OUTPUT_DTYPES),
        out / "outputs.parquet",
        "Test logits of the reference methods that produce a removed model.",
        OUTPUT_COLUMNS,
    )
    write_parquet(
        pd.DataFrame(costs, columns=list(COST_COLUMNS)),
        out / "costs.parquet",
        "Cost of every reference method on this run.",
        COST_COLUMNS,
    )
    return metrics


def distiller(params: Params, paths: Paths, work: Path, fan_out: FanOut) -> Distiller:
    """A DDM variant's distiller through the pipeline's fan-out: the run's params with the variant's distill block
    (whose workers read the curvature stage's factors themselves)."""
    variant = lambda distill: params.model_copy(update={"distill": distill})  # noqa: E731
    return lambda task, distill, curvature: distill_all(variant(distill), paths, work, fan_out)[0]
