"""Stage perturb: remove every cluster from θ_T by n_u SGD steps on its synset; record each θ_{-κ}'s test logits.

With `perturb.step_size: auto` the step size is first fitted on the ground truth's calibration clusters
(the step whose removed models are closest to the retrained ones) and written to calibration.parquet.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.calibration import calibrate_step
from ddm_ops.config import Params
from ddm_ops.devices import resolve_device
from ddm_ops.distill import removal_sign
from ddm_ops.functional import split_state
from ddm_ops.unlearn import outputs_of, unlearn
from stages.common import Paths, dataset, load_ground_truth, load_tensors, new_model, write_parquet

BASE = -1  # cluster_id of the unperturbed target θ_T in outputs.parquet


def run(params: Params, paths: Paths, out: Path) -> dict:
    ds = dataset(params)
    device = resolve_device(params.base.device)
    model = new_model(params, ds).to(device).eval()
    state = load_tensors(paths.stage("train_target") / "model.pt")
    theta, buffers = split_state(model, {k: v.to(device) for k, v in state.items()})
    synset = load_tensors(paths.stage("distill") / "synset.pt")
    x_test = ds.x_test.to(device)
    images, labels = synset["images"].to(device), synset["labels"].to(device)
    sign, n_u = removal_sign(synset["direction"]), params.perturb.n_u

    def remove(rows: np.ndarray | slice, step: float) -> torch.Tensor:
        removed = unlearn(model, theta, buffers, images[rows], labels[rows], n_u, step, sign)
        return outputs_of(model, removed, buffers, x_test)

    metrics = {}
    step = params.perturb.step_size
    if step == "auto":
        gt = load_ground_truth(paths, params)
        truth = torch.from_numpy(gt.cluster[gt.aligned_seed][gt.calibration]).to(device)
        step, curve = calibrate_step(lambda s: remove(gt.calibration, s), truth)
        write_parquet(
            pd.DataFrame(curve),
            out / "calibration.parquet",
            "Mean Dist1 to the retrained calibration clusters for each candidate removal step size.",
            {"step_size": "removal step size", "dist1": "mean Dist1 of the removed to the retrained models"},
        )
        metrics["calibrated_step_size"] = step
    remove(slice(0, 1), step)  # one-off warm-up, not part of the timed online work
    start = time.perf_counter()
    removed = unlearn(model, theta, buffers, images, labels, n_u, step, sign)
    removal_seconds = time.perf_counter() - start
    logits = torch.cat(
        [
            outputs_of(model, {k: v[None] for k, v in theta.items()}, buffers, x_test),
            outputs_of(model, removed, buffers, x_test),
        ]
    )
    online_seconds = time.perf_counter() - start
    logits = logits.cpu().numpy()  # (1 + K, M, C)
    ids = np.concatenate([[BASE], synset["cluster_ids"].numpy()])
    k, m, c = logits.shape
    write_parquet(
        pd.DataFrame(
            {
                "cluster_id": np.repeat(ids, m * c),
                "test_index": np.tile(np.repeat(ds.test_index, c), k),
                "class": np.tile(np.arange(c), k * m),
                "logit": logits.reshape(-1),
            }
        ),
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
    return {
        **metrics,
        "step_size": step,
        "removal_seconds": removal_seconds,
        "online_seconds": online_seconds,
        "seconds_per_removal": online_seconds / n,
        "n_removals": n,
    }
