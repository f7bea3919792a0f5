"""Stage data_quality: the removal curve. Retrain without the x% least useful training data by DDM's ranking (whole
clusters, most harmful first) and without as many samples drawn at random; the test accuracy of each.

The ranking is read off the attribution on the even positions of the test split (the validation half) and the
accuracy is measured on the odd positions (the evaluation half), so the curve does not reward fitting the very
samples the ranking was made on. Disabled (the default), the stage writes an empty table.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.config import Params
from ddm_ops.data_quality import cluster_effects, least_useful, loss_of
from stages.artifacts import Paths, concat_or_empty, read_parquet, score_matrix, write_parquet
from stages.common import FanOut, dataset, in_process
from stages.retraining import retrain_one

CURVE_COLUMNS = {
    "strategy": "ddm (least useful clusters by DDM's ranking first) or random (as many samples at random)",
    "percent": "share of the training data asked to be removed (%)",
    "removed_fraction": "share of the training data actually removed (whole clusters for ddm)",
    "seed": "retraining seed",
    "test_accuracy": "accuracy of the retrained model on the evaluation half of the test split",
    "test_loss": "cross-entropy on the evaluation half of the test split",
}
CURVE_DTYPES = {
    "strategy": "str",
    "percent": "float64",
    "removed_fraction": "float64",
    "seed": "int64",
    "test_accuracy": "float64",
    "test_loss": "float64",
}


def halves(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the test split: (validation half, evaluation half)."""
    return np.arange(0, m, 2), np.arange(1, m, 2)


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    dq, rows, metrics = params.data_quality, [], {"enabled": int(params.data_quality.enabled)}
    if dq.enabled:
        ds = dataset(params)
        ids = read_parquet(paths.stage("cluster") / "assignments.parquet")["cluster_id"].to_numpy()
        sizes = np.bincount(ids)
        attribution = read_parquet(paths.stage("attribute") / "attribution.parquet").query("objective == 'loss'")
        loss = score_matrix(attribution).to_numpy()
        validation, evaluation = halves(len(ds.test_index))
        effects = cluster_effects(loss[:, validation])
        rng = np.random.default_rng([params.base.seed, 4])
        jobs = []
        for percent in dq.removal_percent:
            clusters = least_useful(effects, sizes, percent)
            n = int(sizes[clusters].sum())
            at_random = np.sort(rng.choice(len(ids), size=n, replace=False)).tolist()
            for r in range(dq.seeds):
                seed = params.base.seed + 1000 + r  # fresh batches, shared by both strategies
                for strategy, removed, dropped in (("ddm", clusters.tolist(), []), ("random", [], at_random)):
                    name = f"{strategy}-{percent:g}-s{seed}"
                    jobs.append(
                        {
                            "strategy": strategy,
                            "percent": percent,
                            "fraction": n / len(ids),
                            "seed": seed,
                            "item": {"job": name, "removed": removed, "seed": seed, "dropped": dropped},
                        }
                    )
        items = [{"root": str(paths.root), "params": params.model_dump(), **j["item"]} for j in jobs]
        start = time.perf_counter()
        done = fan_out(retrain_one, items, "job", "removal-curve")
        metrics["retrain_seconds"] = time.perf_counter() - start
        labels = ds.y_test[evaluation]
        for j, d in zip(jobs, done):
            logits = torch.load(d["path"], weights_only=True)["logits"][evaluation]
            rows.append(
                {
                    "strategy": j["strategy"],
                    "percent": j["percent"],
                    "removed_fraction": j["fraction"],
                    "seed": j["seed"],
                    "test_accuracy": float((logits.argmax(-1) == labels).double().mean()),
                    "test_loss": loss_of(logits, labels),
                }
            )
    curve = concat_or_empty([pd.DataFrame(rows)] if rows else [], CURVE_DTYPES)
    write_parquet(
        curve, out / "removal_curve.parquet", "Test accuracy after removing the least useful data.", CURVE_COLUMNS
    )
    if rows:
        mean = curve.groupby(["strategy", "percent"])["test_accuracy"].mean()
        metrics.update({f"accuracy_{s}_{p:g}": float(v) for (s, p), v in mean.items()})
    return metrics
