"""Removal: every cluster taken out of the target by its synset (the online part of DDM: a Newton step at the
curvature checkpoints, or the paper's SGD steps from θ_T), with the removed models' test logits."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ddm_ops.calibration import NEWTON_STEP_GRID, STEP_GRID, calibrate_step
from ddm_ops.config import Params
from ddm_ops.curvature import damping_value, from_state
from ddm_ops.devices import peak_memory, resolve_device, synchronize
from ddm_ops.distill import removal_sign
from ddm_ops.functional import split_state
from ddm_ops.models import functional_mode
from ddm_ops.train import DivergenceError
from ddm_ops.unlearn import newton_removal, outputs_of, unlearn
from stages.artifacts import Paths, load_checkpoints, load_tensors
from stages.common import dataset, new_model
from stages.retraining import load_ground_truth

log = logging.getLogger(__name__)
WEIGHTS_PER_PASS = 50_000_000  # removals are batched so that their stacked weights stay below this many numbers


def remove_all(params: Params, paths: Paths, synset: dict, step: float | str) -> dict:
    """Remove every cluster by its synset (perturb.update); θ_T's and every θ_{-κ}'s test logits.

    sgd: n_u SGD steps from θ_T. ekfac: at each checkpoint of the curvature stage a Newton step; the removed
    model's logits are θ_T's plus the mean over those checkpoints of (removed - checkpoint) logits.
    With `step` "auto" the step size is first fitted on the ground truth's calibration clusters. Returns logits
    (1 + K, M, C) on the CPU (θ_T first), the step, the calibration curve (or None), and the seconds and peak
    memory of the online work (the removals and the removed models' test outputs).
    """
    ds = dataset(params)
    device = resolve_device(params.base.device)
    model = functional_mode(new_model(params, ds).to(device), params.distill.batchnorm)
    state = load_tensors(paths.stage("train_target") / "model.pt")
    theta, buffers = split_state(model, {k: v.to(device) for k, v in state.items()})
    x_test = ds.x_test.to(device)
    images, labels = synset["images"].to(device), synset["labels"].to(device)
    sign = removal_sign(synset["direction"])
    per_pass = max(1, WEIGHTS_PER_PASS // sum(v.numel() for v in theta.values()))
    points = _curvature_points(params, paths, model, device) if params.perturb.update == "ekfac" else []
    unit = params.train.batch_size / len(ds.x_train)  # the influence-function step for checkpoint-paired synsets

    def anchor_logits() -> list[torch.Tensor]:
        """Test logits of θ_T, then of each checkpoint the Newton removal starts from: they do not depend on the
        removed cluster or the step, so each is computed once per use (calibration, the timed online work)."""
        weights = [(theta, buffers)] + [(w, b) for w, b, _, _ in points]
        return [outputs_of(model, {k: v[None] for k, v in w.items()}, b, x_test) for w, b in weights]

    def removed_logits(part: np.ndarray, step: float) -> tuple[torch.Tensor, float]:
        """Test logits of the removed models of one pass, and the seconds their weight updates took."""
        start = time.perf_counter()
        if params.perturb.update == "sgd":
            removed = unlearn(model, theta, buffers, images[part], labels[part], params.perturb.n_u, step, sign)
            synchronize(device)
            seconds = time.perf_counter() - start
            return outputs_of(model, removed, buffers, x_test), seconds
        change, seconds = 0.0, 0.0
        for (weights, bufs, factors, damping), at in zip(points, anchors[1:]):
            start = time.perf_counter()
            removed = newton_removal(
                model, weights, bufs, factors, images[part], labels[part], step * unit, damping, sign
            )
            synchronize(device)
            seconds += time.perf_counter() - start
            change = change + outputs_of(model, removed, bufs, x_test) - at
        return anchors[0] + change / len(points), seconds

    def remove(rows: np.ndarray, step: float) -> tuple[torch.Tensor, float]:
        """Test logits of the models with each row's synset removed, and the seconds the removal steps took."""
        logits, seconds = [], 0.0
        for part in np.array_split(rows, -(-len(rows) // per_pass)):
            synchronize(device)
            out, took = removed_logits(part, step)
            logits.append(out)
            seconds += took
        return torch.cat(logits), seconds

    anchors = anchor_logits()
    curve = None
    if step == "auto":
        gt = load_ground_truth(paths, params)
        truth = torch.from_numpy(gt.cluster[gt.aligned_seed][gt.calibration]).to(device)
        grid = STEP_GRID if params.perturb.update == "sgd" else NEWTON_STEP_GRID
        log.info("calibrating the step on %d clusters' retrainings over %d sizes", len(gt.calibration), len(grid))
        step, curve = calibrate_step(lambda s: remove(gt.calibration, s)[0], truth, grid)
    remove(np.arange(1), step)  # one-off warm-up, not part of the timed online work
    result: dict = {"step_size": step, "calibration": curve}
    with peak_memory(result, "online_peak_memory_mb"):
        synchronize(device)
        start = time.perf_counter()
        anchors = anchor_logits()
        removed, result["removal_seconds"] = remove(np.arange(len(images)), step)
        synchronize(device)
        result["online_seconds"] = time.perf_counter() - start
    bad = (~torch.isfinite(removed)).flatten(1).any(1)
    if bad.any():
        cluster = int(synset["cluster_ids"][int(torch.nonzero(bad)[0])])
        raise DivergenceError(
            f"perturb: the model with cluster {cluster} removed has non-finite test outputs (update "
            f"{params.perturb.update}, step_size {step}); lower perturb.step_size"
            + (" or raise perturb.damping" if params.perturb.update == "ekfac" else "")
        )
    result["logits"] = torch.cat([anchors[0], removed]).cpu()
    return result


def _curvature_points(params: Params, paths: Paths, model: torch.nn.Module, device: torch.device) -> list[tuple]:
    """(params, buffers, factors, absolute damping) of each checkpoint the curvature stage fitted, on `device`."""
    state = load_tensors(paths.stage("curvature") / "factors.pt")
    if not state["factors"]:
        raise ValueError(f"{paths.stage('curvature') / 'factors.pt'} holds no factors; rerun the curvature stage")
    checkpoints = load_checkpoints(paths.stage("train_target") / "checkpoints")
    points = []
    for i, factors in zip(state["checkpoints"].tolist(), state["factors"]):
        weights, bufs = split_state(model, {k: v.to(device) for k, v in checkpoints[i].state.items()})
        layers = [f.to(device) for f in from_state(factors)]
        points.append((weights, bufs, layers, damping_value(layers, params.perturb.damping)))
    return points
