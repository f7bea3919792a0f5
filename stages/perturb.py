"""Stage perturb: remove every cluster by its synset (a curvature-preconditioned step at the distill.checkpoints, or the
paper's n_u SGD steps from θ_T); record each θ_{-κ}'s test logits.

With `perturb.step_size: auto` the step size is first fitted on the ground truth's calibration clusters (the step
whose removed models are closest to the retrained ones, relative to doing nothing); calibration.parquet
holds each candidate step's distances (no rows with a fixed step).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.config import Params
from ddm_ops.curvature import lengthened
from ddm_ops.ddm import DDM
from ddm_ops.devices import peak_memory
from ddm_ops.train import DivergenceError
from stages.artifacts import BASE, Paths, load_tensors, long_logits, write_parquet
from stages.common import FanOut, dataset, in_process
from stages.task import load_factors, run_task


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    synset = load_tensors(paths.stage("distill") / "synset.pt")
    task = run_task(params, paths, calibrate=params.perturb.step_size == "auto")
    factors = load_factors(paths)
    if params.perturb.update == "ekfac" and factors is None:
        raise ValueError(f"{paths.stage('curvature') / 'factors.pt'} holds no factors; rerun the curvature stage")
    kernel = load_factors(paths, "kernel")
    if lengthened(params.perturb.update, params.perturb.curvature, params.perturb.lengths) and kernel is None:
        raise ValueError(
            f"{paths.stage('curvature') / 'factors.pt'} holds no kernel factors; rerun the curvature stage"
        )
    ddm = DDM(
        params.distill,
        params.perturb,
        distiller=lambda task, distill, curvature: synset,
        factors=factors,
        kernel=kernel and kernel[1],
    )
    start = time.perf_counter()
    ddm.fit(task)  # synsets and curvature handed over: the rest of the offline part (the step's calibration)
    metrics: dict = {"fit_seconds": time.perf_counter() - start}
    try:
        with peak_memory(metrics, "online_peak_memory_mb"):
            removal = ddm.attribute(ds.x_test.to(task.device), ds.y_test.to(task.device), [])
    except DivergenceError as err:
        hint = " or raise perturb.damping" if params.perturb.update == "ekfac" else ""
        raise DivergenceError(f"perturb: {err}; lower perturb.step_size{hint}") from None
    metrics.update(
        step_size=removal.step_size,
        removal_seconds=removal.details["removal_seconds"],
        online_seconds=removal.online_seconds,
    )
    columns = {
        "step_size": "removal step size",
        "relative": "mean over the clusters of Dist1 of the removed to the retrained model / do-nothing Dist1",
        "dist1": "mean Dist1 of the removed to the retrained models",
    }
    write_parquet(
        pd.DataFrame(ddm.curve or [], columns=list(columns), dtype=float),
        out / "calibration.parquet",
        "Dist1 of the removed to the retrained calibration clusters for each candidate removal step size; the step "
        "with the lowest relative Dist1 is chosen (no rows when perturb.step_size is fixed).",
        columns,
    )
    if ddm.curve is not None:
        metrics["calibrated_step_size"] = removal.step_size
    logits = torch.cat([removal.base[None], removal.logits]).numpy()  # (1 + K, M, C)
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
