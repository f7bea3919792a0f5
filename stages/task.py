"""The run's attribution Task read from its files (the target's architecture and trajectory, the training data and
its clusters, with the ground truth the calibration clusters' retrained logits), and the curvature stage's factors."""

from __future__ import annotations

import torch

from ddm_ops.attributors import Calibration, Task
from ddm_ops.config import Params
from ddm_ops.curvature import Factors, stored_factors
from ddm_ops.devices import resolve_device
from stages.artifacts import Paths, load_checkpoints, load_tensors, read_parquet
from stages.common import dataset, new_model
from stages.retraining import load_ground_truth


def run_task(params: Params, paths: Paths, calibrate: bool) -> Task:
    """The Task every method of this run is given, on base.device; with `calibrate`, the ground truth's calibration
    clusters for fitting removal step sizes."""
    ds = dataset(params)
    device = resolve_device(params.base.device)
    assign = read_parquet(paths.stage("cluster") / "assignments.parquet")
    calibration = None
    if calibrate:
        truth = load_ground_truth(paths, params)
        logits = torch.from_numpy(truth.cluster[truth.aligned_seed][truth.calibration])
        calibration = Calibration(truth.calibration, ds.x_test.to(device), logits.to(device))
    return Task(
        model=new_model(params, ds),
        checkpoints=load_checkpoints(paths.stage("train_target") / "checkpoints"),
        batch_size=params.train.batch_size,
        train=(ds.x_train.to(device), ds.y_train.to(device)),
        clusters=assign["cluster_id"].to_numpy(),
        num_classes=ds.num_classes,
        centroid_distance=assign["centroid_distance"].to_numpy(),
        calibration=calibration,
        seed=params.base.seed,
    )


def load_factors(paths: Paths, key: str = "factors") -> tuple[torch.Tensor, list[Factors]] | None:
    """The curvature stage's (checkpoint indices, EK-FAC factors at each), or None when it fitted none (update sgd);
    key "kernel": TRAK's kernel's, fitted for perturb.lengths kernel."""
    return stored_factors(load_tensors(paths.stage("curvature") / "factors.pt"), key)
