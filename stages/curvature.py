"""Stage curvature: EK-FAC factors of the training loss (perturb.curvature: its Fisher, or TRAK's kernel of the
log-odds; both for perturb.lengths kernel) at the checkpoints where distill matches synsets and perturb removes
clusters."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ddm_ops.config import Params
from ddm_ops.curvature import curvature_factors, lengthened, to_state, uses_curvature
from ddm_ops.devices import resolve_device
from ddm_ops.models import functional_mode
from ddm_ops.trajectory import Trajectory
from stages.artifacts import Paths, load_checkpoints
from stages.common import FanOut, dataset, in_process, new_model


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    """factors.pt: {"checkpoints": indices, "factors": one to_state() per checkpoint, and with perturb.lengths kernel
    "kernel": TRAK's kernel's likewise}; empty when neither the removal (perturb.update sgd) nor the matching
    (distill.metric layerwise) uses the curvature."""
    state: dict = {"checkpoints": torch.zeros(0, dtype=torch.long), "factors": []}
    metrics: dict = {"n_checkpoints": 0}
    if uses_curvature(params.perturb.update, params.distill.metric):
        ds = dataset(params)
        device = resolve_device(params.base.device)
        model = functional_mode(new_model(params, ds).to(device), params.distill.batchnorm)
        checkpoints = load_checkpoints(paths.stage("train_target") / "checkpoints")
        trajectory = Trajectory.from_checkpoints(model, checkpoints, params.train.batch_size).to(device)
        start = time.perf_counter()
        train = (ds.x_train.to(device), ds.y_train.to(device))
        kinds = {"factors": params.perturb.curvature}
        if lengthened(params.perturb.update, params.perturb.curvature, params.perturb.lengths):
            kinds["kernel"] = "margin"
        for key, kind in kinds.items():
            index, factors = curvature_factors(
                model, trajectory, train, params.distill.checkpoints, params.base.seed, kind
            )
            state.update(
                checkpoints=index, **{key: [to_state([f.to(torch.device("cpu")) for f in fs]) for fs in factors]}
            )
        metrics.update(n_checkpoints=len(index), curvature_seconds=time.perf_counter() - start)
    torch.save(state, out / "factors.pt")
    return metrics
