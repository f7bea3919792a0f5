"""Stage attribute: the attribution matrix (score = drop of the objective when κ is removed) with Dist1/2/3."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.attribution import distances, scores
from ddm_ops.config import Params
from stages.artifacts import BASE, Paths, logits_table, long_scores, read_parquet, write_parquet
from stages.common import FanOut, dataset, in_process


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    start = time.perf_counter()
    ids, tests, logits = logits_table(read_parquet(paths.stage("perturb") / "outputs.parquet"))
    if ids[0] != BASE or not np.array_equal(tests, ds.test_index):
        raise ValueError(f"{paths.stage('perturb') / 'outputs.parquet'}: does not match the test split; rerun perturb")
    base, removed = logits[0], logits[1:]
    d = {k: v.numpy().reshape(-1) for k, v in distances(base, removed).items()}
    frames = []
    for objective in params.attribute.objectives:
        a = scores(base, removed, ds.y_test, objective).numpy()
        frames.append(long_scores(a, ids[1:], tests).assign(objective=objective, **d))
    table = pd.concat(frames, ignore_index=True)
    write_parquet(
        table,
        out / "attribution.parquet",
        "Attribution of every (cluster, test sample): score = o(θ_T) - o(θ_{-κ}); positive = the cluster helps.",
        {
            "cluster_id": "removed cluster",
            "test_index": "position in the dataset's fixed test split",
            "objective": "margin (correct-class margin), loss (minus cross-entropy) or probability (of the true class)",
            "score": "drop of the objective when the cluster is removed",
            "dist1": "100 * L2 distance of the softmax outputs of θ_T and θ_{-κ}",
            "dist2": "KL(p(θ_T) || p(θ_{-κ}))",
            "dist3": "1 / (1 + L2 distance of the softmax outputs)",
        },
    )
    head = table[table["objective"] == params.attribute.objectives[0]]
    return {
        "attribute_seconds": time.perf_counter() - start,
        "n_clusters": len(ids) - 1,
        "n_test": len(tests),
        "score_abs_mean": float(head["score"].abs().mean()),
        "dist1_mean": float(head["dist1"].mean()),
    }
