"""Stage perturb: remove every cluster by its synset (a curvature-preconditioned step at the last checkpoints, or the
paper's n_u SGD steps from θ_T); record each θ_{-κ}'s test logits.

With `perturb.step_size: auto` the step size is first fitted on the ground truth's calibration clusters
(the step whose removed models are closest to the retrained ones) and written to calibration.parquet.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.config import Params
from stages.artifacts import BASE, Paths, load_tensors, long_logits, write_parquet
from stages.common import FanOut, dataset, in_process
from stages.removal import remove_all

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    synset = load_tensors(paths.stage("distill") / "synset.pt")
    removal = remove_all(params, paths, synset, params.perturb.step_size)
    metrics = {k: removal[k] for k in ("step_size", "removal_seconds", "online_seconds", "online_peak_memory_mb")}
    if removal["calibration"] is not None:
        write_parquet(
            pd.DataFrame(removal["calibration"]),
            out / "calibration.parquet",
            "Mean Dist1 to the retrained calibration clusters for each candidate removal step size.",
            {"step_size": "removal step size", "dist1": "mean Dist1 of the removed to the retrained models"},
        )
        metrics["calibrated_step_size"] = removal["step_size"]
    logits = removal["logits"].numpy()  # (1 + K, M, C)
    ids = np.concatenate([[BASE], synset["cluster_ids"].numpy()])
    write_parquet(
        long_logits(logits, ids, ds.test_index),
        out / "outputs.parquet",
        "Test-set logits of θ_T (cluster_id -1) and of every θ_{-κ} (κ removed by its synset).",
        {
            "cluster_id": "removed cluster, -1 for the unperturbed target",
            "test_index": "position in the dataset's fixed test split",
            "class": "output class",
            "logit": "logit",
        },
    )
    n = len(ids) - 1
    return {**metrics, "seconds_per_removal": metrics["online_seconds"] / n, "n_removals": n}
