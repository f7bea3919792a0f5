"""Reverse gradient matching: learn a cluster's synset whose descent steps undo the cluster's training."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from ddm_ops.config import DistillParams
from ddm_ops.curvature import Curvature, whiten
from ddm_ops.functional import Weights, batched_grads
from ddm_ops.matching import EPS, gradient_distance, whitened_distance
from ddm_ops.train import DivergenceError
from ddm_ops.trajectory import Trajectory, checkpoint_gradients, cluster_gradients

log = logging.getLogger(__name__)

LABEL_INIT = 5.0  # initial logit of the cluster's class for learned soft labels (softmax ≈ 0.94 with 10 classes)
RIDGE = 1e-4  # solved labels: ridge of the least-squares solve, as a fraction of its Gram matrix's mean diagonal


@dataclass(frozen=True)
class Synset:
    """ipc synthetic images (ipc, C, H, W) with their soft labels (ipc, classes): the synset's loss is
    Σ_n Σ_c labels[n, c] ℓ(x_n, c) / ipc. Learned and hard labels are distributions over the classes; solved labels
    are free weights (mostly on the cluster's class, summing to less than one: the synset's gradient takes the
    cluster's magnitude from them)."""

    images: torch.Tensor
    labels: torch.Tensor


def matching_targets(
    model: nn.Module, trajectory: Trajectory, x: torch.Tensor, y: torch.Tensor, params: DistillParams
) -> tuple[torch.Tensor, Weights]:
    """(checkpoint indices where the synset's gradient is taken, the real-gradient targets stacked alike).

    checkpoint: the `params.checkpoints` checkpoints θ_t spread over the trajectory (Trajectory.spread), each
    paired with the cluster's gradient at the same θ_t (checkpoint_gradients), where the removal will use the
    synset. reverse, mirrored / lifo: the synset walks the trajectory backwards from θ_T, step r at θ_{T-r};
    `mirrored` pairs it with segment r (the formula Σ_t ||∇L(θ_{τ-t}; S) + ∇L(θ_t; D)||), `lifo` with segment
    T-1-r (the latest update is undone first); forward (classic gradient matching), the synset at θ_t matched to
    segment t. The reverse target is minus the real gradient, the forward target the real gradient.
    """
    sign = 1.0 if params.direction == "forward" else -1.0
    if params.pairing == "checkpoint":
        index = trajectory.spread(params.checkpoints)
        real = checkpoint_gradients(model, trajectory, index, x, y)
        return index, {k: sign * g for k, g in real.items()}
    real = cluster_gradients(model, trajectory, x, y)
    r = torch.arange(trajectory.segments)
    if params.direction == "forward":
        syn, seg = r, r
    else:
        syn, seg = trajectory.segments - r, (r if params.pairing == "mirrored" else trajectory.segments - 1 - r)
    return syn, {k: sign * g[seg] for k, g in real.items()}


def removal_sign(direction: str) -> float:
    """+1: removal descends the synset loss (reverse synsets); -1: it ascends it (forward synsets mimic the data)."""
    return 1.0 if direction == "reverse" else -1.0


def whitener(curvature: Curvature) -> Callable[[Weights], torch.Tensor]:
    """Gradients stacked over the checkpoints (T, ...) -> whitened by each checkpoint's curvature (T, ..., D)."""

    def whitened(g: Weights) -> torch.Tensor:
        return torch.stack([whiten(f, {k: v[t] for k, v in g.items()}, d) for t, (f, d) in enumerate(curvature)])

    return whitened


def solved_labels(
    model: nn.Module,
    trajectory_weights: tuple[Weights, Weights],
    images: torch.Tensor,
    num_classes: int,
    whitened: Callable[[Weights], torch.Tensor],
    target: torch.Tensor,
) -> torch.Tensor:
    """The soft labels (ipc, classes) that minimise the whitened matching loss for fixed `images`, in closed form.

    The synset's gradient is linear in its labels q, g_t(q) = Σ_nc q_nc ∇ℓ(x_n, c; θ_t) / ipc, so the loss
    mean_t |W_t g_t(q) - b_t|^2 / |b_t|^2 (b_t = `target`, the whitened cluster gradients (T, D); `whitened`, as
    `whitener` makes it, maps gradients (T, ...) to (T, ..., D)) is a least-squares problem in ipc·classes unknowns,
    solved with a small ridge (RIDGE).
    """
    params, buffers = trajectory_weights
    eye = torch.eye(num_classes, device=images.device)
    one = lambda x, c: batched_grads(model, params, buffers, x[None], c[None])  # noqa: E731
    with torch.no_grad():
        per_class = vmap(vmap(one, in_dims=(None, 0)), in_dims=(0, None))(images, eye)  # (ipc, classes, T, ...)
        a = whitened({k: g.flatten(0, 1).movedim(1, 0) for k, g in per_class.items()}).double() / len(images)
        b = target.double()
        w = 1.0 / (b.pow(2).sum(-1) + EPS)
        gram = torch.einsum("t,tid,tjd->ij", w, a, a)
        rhs = torch.einsum("t,tid,td->i", w, a, b)
        ridge = RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + ridge, rhs).view(len(images), num_classes).float()


def distill_cluster(
    model: nn.Module,
    trajectory: Trajectory,
    members: tuple[torch.Tensor, torch.Tensor],
    init_images: torch.Tensor,
    num_classes: int,
    params: DistillParams,
    name: str = "cluster",
    curvature: Curvature | None = None,
) -> tuple[Synset, list[float]]:
    """Learn one cluster's synset; return it and the matching loss per iteration.

    `members` are the cluster's real (images, labels); `init_images` (ipc, C, H, W) the members nearest its
    centroid. All members share one label. `params.labels` solved: the labels are solved for (solved_labels) on
    the initial images and again on the final ones, Adam moving the images in between; learned: Adam learns them
    with the images (one-hot with `params.label_lr` 0). With `params.metric` whitened, `curvature` holds (EK-FAC
    factors, absolute damping) at each matched checkpoint. The loss curve has one entry per iteration, and with
    solved labels a last one after the final solve.
    """
    x, y = members
    label = int(y[0])
    syn_idx, target = matching_targets(model, trajectory, x, y, params)
    p_syn, b_syn = trajectory.at(syn_idx)
    if params.metric == "whitened":
        if curvature is None or len(curvature) != len(syn_idx):
            raise ValueError(
                f"distill {name}: metric whitened needs the curvature at each of {len(syn_idx)} checkpoints"
            )
        whitened = whitener(curvature)
        target_w = whitened(target)
        distance = lambda g: whitened_distance(whitened(g), target_w)  # noqa: E731
    else:
        distance = lambda g: gradient_distance(g, target, params.magnitude_weight, batch_dims=1)  # noqa: E731

    solve = params.labels == "solved"
    if solve:
        if params.metric != "whitened":
            raise ValueError(f"distill {name}: labels solved needs metric whitened (got {params.metric!r})")
        solved = solved_labels(model, (p_syn, b_syn), init_images, num_classes, whitened, target_w)
    images = init_images.clone().requires_grad_(True)
    logits = torch.zeros(len(images), num_classes, device=images.device)
    logits[:, label] = LABEL_INIT
    learn_labels = params.labels == "learned" and params.label_lr > 0
    groups = [{"params": [images], "lr": params.lr}]
    if learn_labels:
        logits.requires_grad_(True)
        groups.append({"params": [logits], "lr": params.label_lr})
    opt = torch.optim.Adam(groups)
    hard = torch.full((len(images),), label, device=images.device)
    losses = []
    for _ in range(params.iterations):
        soft = solved if solve else logits.softmax(-1) if learn_labels else hard
        g = batched_grads(model, p_syn, b_syn, images, soft)
        loss = distance(g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # on the device: no host sync per iteration
    if solve:
        solved = solved_labels(model, (p_syn, b_syn), images.detach(), num_classes, whitened, target_w)
        losses.append(distance(batched_grads(model, p_syn, b_syn, images.detach(), solved)).mean().detach())
    curve = torch.stack(losses).cpu()
    if not torch.isfinite(curve).all():
        bad = int(torch.nonzero(~torch.isfinite(curve))[0])
        raise DivergenceError(f"distill {name}: matching loss is {curve[bad].item()} at iteration {bad}")
    if solve:
        labels = solved
    else:
        labels = logits.softmax(-1) if learn_labels else nn.functional.one_hot(hard, num_classes).float()
    log.debug("%s: matching loss %.4f -> %.4f", name, curve[0], curve[-1])
    return Synset(images.detach(), labels.detach()), curve.tolist()
