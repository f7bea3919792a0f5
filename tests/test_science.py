"""The method does what it claims on a tiny problem: steps on a reverse-matched synset move θ_T toward the
model retrained without the cluster (aligned retraining, the exact counterfactual), more than doing nothing
and more than steps on a random, unmatched synset. Thresholds were set from measurement (see README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddm_ops.attribution import distances
from ddm_ops.calibration import NEWTON_STEP_GRID, STEP_GRID
from ddm_ops.cluster import cluster_within_classes, nearest_members
from ddm_ops.config import DataParams, DistillParams, ModelParams, PerturbParams, SubsetParams, TrainParams
from ddm_ops.curvature import damping_value, fit_factors
from ddm_ops.data import load_dataset
from ddm_ops.distill import distill_cluster
from ddm_ops.functional import batched_logits, split_state, stack
from ddm_ops.models import build_model
from ddm_ops.train import train
from ddm_ops.trajectory import Trajectory
from ddm_ops.unlearn import newton_direction, stepped, unlearn

MODEL = ModelParams(width=16, depth=2)
TRAIN = TrainParams(epochs=15, batch_size=32, lr=0.05, checkpoint_every=1)
CLUSTERS = [0, 5, 9, 14]  # one cluster each of classes 0, 2, 4, 7
STEP, N_U = 0.005, 3


@pytest.fixture(scope="module")
def tiny():
    ds = load_dataset(DataParams(subset=SubsetParams(train=300, test=150)))
    model = build_model(MODEL, ds.image_shape, 10, 0)
    ckpts = []
    train(model, ds.x_train, ds.y_train, TRAIN, 0, on_checkpoint=ckpts.append)
    with torch.no_grad():
        feats = model.features(ds.x_train).numpy()
    ids, dist = cluster_within_classes(feats, ds.y_train.numpy(), 2, 0)
    retrained = []
    for c in CLUSTERS:
        m = build_model(MODEL, ds.image_shape, 10, 0)
        train(m, ds.x_train, ds.y_train, TRAIN, 0, keep=torch.from_numpy(ids != c))
        retrained.append(m.state_dict())
    return ds, model, Trajectory.from_checkpoints(model, ckpts, TRAIN.batch_size), ids, dist, retrained


def _truth(ds, model, retrained) -> torch.Tensor:
    parts = [split_state(model, s) for s in retrained]
    return batched_logits(model, stack([p for p, _ in parts]), stack([b for _, b in parts]), ds.x_test)


def _dist1_of(ds, model, removed, buffers, retrained) -> float:
    """Mean Dist1 of R removed models (stacked weights) to the R retrained ones."""
    r = len(next(iter(removed.values())))
    out = batched_logits(model, removed, {k: v.expand(r, *v.shape) for k, v in buffers.items()}, ds.x_test)
    truth = _truth(ds, model, retrained)
    return torch.stack([distances(t, o[None])["dist1"].mean() for t, o in zip(truth, out)]).mean().item()


def _dist1_to_retrained(ds, model, traj, retrained, images, labels) -> tuple[float, float]:
    params, buffers = traj.final()
    moved = _dist1_of(ds, model, unlearn(model, params, buffers, images, labels, N_U, STEP), buffers, retrained)
    base = batched_logits(
        model, {k: v[None] for k, v in params.items()}, {k: v[None] for k, v in buffers.items()}, ds.x_test
    )[0]
    nothing = torch.stack([distances(t, base[None])["dist1"].mean() for t in _truth(ds, model, retrained)])
    return moved, nothing.mean().item()


def test_reverse_matched_synset_moves_toward_retrained_model(tiny):
    ds, model, traj, ids, dist, retrained = tiny
    p = DistillParams(
        ipc=2, iterations=60, pairing="mirrored", direction="reverse", metric="layerwise", labels="learned"
    )
    synsets = []
    for c in CLUSTERS:
        members = np.flatnonzero(ids == c)
        s, losses = distill_cluster(
            model,
            traj,
            (ds.x_train[members], ds.y_train[members]),
            ds.x_train[nearest_members(ids, dist, c, p.ipc)],
            10,
            p,
        )
        assert losses[-1] < 0.7 * losses[0]  # the matching optimises
        synsets.append(s)
    images = torch.stack([s.images for s in synsets])
    labels = torch.stack([s.labels for s in synsets])
    matched, nothing = _dist1_to_retrained(ds, model, traj, retrained, images, labels)

    g = torch.Generator().manual_seed(0)
    random_images = torch.randn(images.shape, generator=g)
    hard = torch.nn.functional.one_hot(torch.tensor([int(ds.y_train[ids == c][0]) for c in CLUSTERS]), 10).float()
    random_labels = hard[:, None].expand(-1, images.shape[1], -1)
    unmatched, _ = _dist1_to_retrained(ds, model, traj, retrained, random_images, random_labels)
    print(f"Dist1 to retrained: matched {matched:.4f}, do-nothing {nothing:.4f}, random synset {unmatched:.4f}")
    assert matched < 0.96 * nothing  # measured 0.923 (mirrored, reverse, n_u=3, step 0.005)
    assert matched < unmatched


def _synsets(tiny, p: DistillParams, curvature=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The clusters' synsets (images, labels) and their mean final matching loss."""
    ds, model, traj, ids, dist, _ = tiny
    synsets, last = [], []
    for c in CLUSTERS:
        members = np.flatnonzero(ids == c)
        x0 = ds.x_train[nearest_members(ids, dist, c, p.ipc)]
        members = (ds.x_train[members], ds.y_train[members])
        synset, losses = distill_cluster(model, traj, members, x0, 10, p, curvature=curvature)
        synsets.append(synset)
        last.append(losses[-1])
    return torch.stack([s.images for s in synsets]), torch.stack([s.labels for s in synsets]), float(np.mean(last))


def _best_newton(tiny, factors, damping, images, labels) -> float:
    """The removed models' mean Dist1 to the retrained ones at the best Newton step on the grid (1e-3 .. 1 times the
    influence-function step)."""
    ds, model, traj, _, _, retrained = tiny
    params, buffers = traj.final()
    unit = TRAIN.batch_size / len(ds.x_train)  # the influence-function step of checkpoint-paired synsets
    direction = newton_direction(model, params, buffers, factors, images, labels, damping)  # the same for every step
    return min(
        _dist1_of(ds, model, stepped(params, direction, s * unit, -1.0), buffers, retrained)
        for s in NEWTON_STEP_GRID[:19]
    )


def _curvature(tiny):
    ds, model, traj = tiny[:3]
    params, buffers = traj.final()
    factors = fit_factors(model, params, buffers, ds.x_train, seed=0)
    return factors, damping_value(factors, PerturbParams().damping)


def test_curvature_preconditioned_removal_beats_the_plain_step(tiny):
    """Synsets matched at θ_T to the cluster's gradient there; one Newton step with the EK-FAC curvature of the
    training loss lands closer to the retrained models than plain SGD steps on the same synsets, each at its best
    step size on a grid (the same calibration for both)."""
    ds, model, traj, ids, dist, retrained = tiny
    p = DistillParams(ipc=4, iterations=100, pairing="checkpoint", checkpoints=1, metric="layerwise", labels="learned")
    images, labels, _ = _synsets(tiny, p)
    params, buffers = traj.final()
    best_newton = _best_newton(tiny, *_curvature(tiny), images, labels)
    plain = {
        s: _dist1_of(ds, model, unlearn(model, params, buffers, images, labels, N_U, s, sign=-1.0), buffers, retrained)
        for s in STEP_GRID[4:]  # 5e-5 .. 0.1 (measured best 0.018)
    }
    nothing = _dist1_to_retrained(ds, model, traj, retrained, images, labels)[1]
    best_plain = min(plain.values())
    print(f"Dist1 to retrained: newton {best_newton:.4f}, plain {best_plain:.4f}, do-nothing {nothing:.4f}")
    assert best_newton < best_plain  # measured 6.78 vs 7.68 (do-nothing 8.05)


def test_whitened_matching_serves_the_newton_removal_better_than_layerwise(tiny):
    """Synsets matched at θ_T with the gradients compared after whitening by the curvature the removal uses, against
    the paper's layer-wise distance: the Newton removal from the whitened ones lands closer to the retrained models
    (each at its best step)."""
    factors, damping = _curvature(tiny)
    best = {}
    for metric in ("layerwise", "whitened"):
        p = DistillParams(ipc=4, iterations=100, pairing="checkpoint", checkpoints=1, metric=metric, labels="learned")
        images, labels, _ = _synsets(tiny, p, [(factors, damping)])
        best[metric] = _best_newton(tiny, factors, damping, images, labels)
    print(f"Dist1 to retrained at the best Newton step: {best}")
    # measured ratio 0.907 on one CPU (6.18 vs 6.82, do-nothing 8.04) and 0.934-0.959 on another (AMD EPYC, AVX-512)
    # and under 1e-5 perturbations of the images there: the layer-wise synsets vary with float rounding, not these
    assert best["whitened"] < 0.98 * best["layerwise"]


def test_solved_labels_serve_the_newton_removal_better_in_a_fifth_of_the_iterations(tiny):
    """Synsets whitened-matched at 4 checkpoints spread over the trajectory, with closed-form least-squares labels
    and 20 image iterations, against labels learned by Adam over 100: a lower matching loss (one set of labels serves
    every checkpoint's gradient, magnitudes included), and the Newton removal at θ_T lands closer to the retrained
    models (each at its best step). Matched at θ_T alone the two are level (loss 0.174 against 0.169, Dist1 6.17
    against 6.16)."""
    ds, model, traj = tiny[:3]
    params, buffers = traj.at(traj.spread(4))
    curvature = []
    for t in range(4):
        factors = fit_factors(
            model, {k: v[t] for k, v in params.items()}, {k: v[t] for k, v in buffers.items()}, ds.x_train, seed=0
        )
        curvature.append((factors, damping_value(factors, PerturbParams().damping)))
    best, loss = {}, {}
    for labels, iterations in (("learned", 100), ("solved", 20)):
        p = DistillParams(ipc=4, iterations=iterations, pairing="checkpoint", checkpoints=4, labels=labels)
        images, synset_labels, loss[labels] = _synsets(tiny, p, curvature)
        best[labels] = _best_newton(tiny, *curvature[-1], images, synset_labels)
    print(f"final matching loss {loss}; Dist1 to retrained at the best Newton step: {best}")
    assert loss["solved"] < 0.5 * loss["learned"]  # measured 0.133 against 0.363
    assert best["solved"] < 0.95 * best["learned"]  # measured 6.19 against 6.81 (do-nothing 8.01)
