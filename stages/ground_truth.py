"""Stage ground_truth: retrain without each cluster and without random halves, aligned and resampled.

Aligned: the target's seed and batches with the removed samples dropped (the exact counterfactual of this
model). Resampled: fresh seeds (the effect in expectation), plus the full data for each seed (noise floor).
Every retraining is one Prefect task and one cached result keyed by everything it depends on, so a failed or
repeated stage redoes only the retrainings it lacks. Disabled (the default), the stage writes empty tables.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.config import Params
from ddm_ops.groundtruth import calibration_clusters, within_class_subsets
from stages.artifacts import Paths, concat_or_empty, long_logits, read_parquet, write_parquet
from stages.common import FanOut, dataset, in_process
from stages.retraining import retrain_one

RETRAIN_COLUMNS = {
    "flavour": "aligned (target's seed and batches) or resampled (fresh seed)",
    "removal": "cluster (one cluster removed), subset (only the subset's clusters kept) or full (nothing removed)",
    "cluster_id": "removed cluster, -1 otherwise",
    "subset_id": "subset (row of masks.parquet), -1 otherwise",
    "seed": "training seed",
    "test_index": "position in the dataset's fixed test split",
    "class": "output class",
    "logit": "logit of the retrained model",
}
RETRAIN_DTYPES = {
    "flavour": "str",
    "removal": "str",
    "cluster_id": "int64",
    "subset_id": "int64",
    "seed": "int64",
    "test_index": "int64",
    "class": "int64",
    "logit": "float32",
}
TIMING_COLUMNS = {
    "job": "retraining name",
    "seconds": "wall time of the retraining when it ran",
    "cached": "true when reused from .ddm_cache",
}


def _jobs(params: Params, cluster_ids: np.ndarray, masks: np.ndarray) -> list[dict]:
    """(name, removed clusters, seed, flavour, removal, cluster_id, subset_id) of every retraining."""
    seed = params.base.seed
    jobs = []
    seeds = [("aligned", seed)] + [("resampled", seed + r) for r in range(1, params.ground_truth.seeds + 1)]
    for flavour, s in seeds:
        jobs.append(
            {
                "job": f"{flavour}-s{s}-full",
                "removed": [],
                "seed": s,
                "flavour": flavour,
                "removal": "full",
                "cluster_id": -1,
                "subset_id": -1,
            }
        )
        for k in cluster_ids:
            jobs.append(
                {
                    "job": f"{flavour}-s{s}-c{k}",
                    "removed": [int(k)],
                    "seed": s,
                    "flavour": flavour,
                    "removal": "cluster",
                    "cluster_id": int(k),
                    "subset_id": -1,
                }
            )
        for i, mask in enumerate(masks):
            jobs.append(
                {
                    "job": f"{flavour}-s{s}-m{i}",
                    "removed": [int(k) for k in cluster_ids[~mask]],
                    "seed": s,
                    "flavour": flavour,
                    "removal": "subset",
                    "cluster_id": -1,
                    "subset_id": i,
                }
            )
    return jobs


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    clusters = read_parquet(paths.stage("cluster") / "clusters.parquet")
    cluster_ids, labels = clusters["cluster_id"].to_numpy(), clusters["label"].to_numpy()
    gt = params.ground_truth
    masks = (
        within_class_subsets(labels, gt.subsets, gt.keep_fraction, params.base.seed)
        if gt.enabled
        else np.zeros((0, len(cluster_ids)), dtype=bool)
    )
    calibration = calibration_clusters(labels, gt.calibration_clusters, params.base.seed) if gt.enabled else []
    write_parquet(
        pd.DataFrame(
            {
                "subset_id": np.repeat(np.arange(len(masks)), len(cluster_ids)),
                "cluster_id": np.tile(cluster_ids, len(masks)),
                "kept": masks.reshape(-1),
            }
        ),
        out / "masks.parquet",
        "Which clusters each random within-class subset kept.",
        {"subset_id": "subset", "cluster_id": "cluster", "kept": "true when the subset kept the cluster"},
    )
    write_parquet(
        pd.DataFrame(
            {
                "cluster_id": cluster_ids,
                "role": np.where(np.isin(cluster_ids, cluster_ids[calibration]), "calibration", "evaluation"),
            }
        ),
        out / "roles.parquet",
        "Clusters whose retraining calibrates removal step sizes are left out of the evaluation.",
        {"cluster_id": "cluster", "role": "calibration or evaluation"},
    )
    jobs = _jobs(params, cluster_ids, masks) if gt.enabled else []
    start = time.perf_counter()
    items = [
        {
            "root": str(paths.root),
            "params": params.model_dump(),
            "job": j["job"],
            "removed": j["removed"],
            "seed": j["seed"],
        }
        for j in jobs
    ]
    done = fan_out(retrain_one, items, "job", "retrain") if items else []
    wall = time.perf_counter() - start
    frames, timings = [], []
    for j, d in zip(jobs, done):
        saved = torch.load(d["path"], weights_only=True)
        frames.append(
            long_logits(saved["logits"].numpy()[None], [j["cluster_id"]], ds.test_index).assign(
                **{k: j[k] for k in ("flavour", "removal", "subset_id", "seed")}
            )
        )
        timings.append({"job": j["job"], "seconds": float(saved["seconds"]), "cached": d["cached"]})
    write_parquet(
        concat_or_empty(frames, RETRAIN_DTYPES),
        out / "retrain.parquet",
        "Test-set logits of every retrained model.",
        RETRAIN_COLUMNS,
    )
    write_parquet(
        pd.DataFrame(timings, columns=list(TIMING_COLUMNS)),
        out / "timings.parquet",
        "Wall time of every retraining.",
        TIMING_COLUMNS,
    )
    seconds = [t["seconds"] for t in timings]
    return {
        "enabled": int(gt.enabled),
        "n_retrainings": len(jobs),
        "wall_seconds": wall,
        "seconds_per_retraining": float(np.mean(seconds)) if seconds else 0.0,
        "n_cached": sum(t["cached"] for t in timings),
    }
