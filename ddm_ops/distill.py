"""Reverse gradient matching: learn a cluster's synset whose descent steps undo the cluster's training."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ddm_ops.config import DistillParams
from ddm_ops.curvature import Factors, whiten
from ddm_ops.functional import Weights, batched_grads
from ddm_ops.matching import gradient_distance, whitened_distance
from ddm_ops.train import DivergenceError
from ddm_ops.trajectory import Trajectory, checkpoint_gradients, cluster_gradients

log = logging.getLogger(__name__)

LABEL_INIT = 5.0  # initial logit of the cluster's class for learned soft labels (softmax ≈ 0.94 with 10 classes)


@dataclass(frozen=True)
class Synset:
    """ipc synthetic images (ipc, C, H, W) with their labels as distributions over classes (ipc, classes)."""

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


def distill_cluster(
    model: nn.Module,
    trajectory: Trajectory,
    members: tuple[torch.Tensor, torch.Tensor],
    init_images: torch.Tensor,
    num_classes: int,
    params: DistillParams,
    name: str = "cluster",
    curvature: list[tuple[Factors, float]] | None = None,
) -> tuple[Synset, list[float]]:
    """Learn one cluster's synset; return it and the matching loss per iteration.

    `members` are the cluster's real (images, labels); `init_images` (ipc, C, H, W) the members nearest its
    centroid. All members share one label. With `params.label_lr` 0 the labels stay one-hot. With
    `params.metric` whitened, `curvature` holds (EK-FAC factors, absolute damping) at each matched checkpoint.
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

        def whitened(g: Weights) -> torch.Tensor:
            return torch.stack([whiten(f, {k: v[t] for k, v in g.items()}, d) for t, (f, d) in enumerate(curvature)])

        target_w = whitened(target)
        distance = lambda g: whitened_distance(whitened(g), target_w)  # noqa: E731
    else:
        distance = lambda g: gradient_distance(g, target, params.magnitude_weight, batch_dims=1)  # noqa: E731

    images = init_images.clone().requires_grad_(True)
    logits = torch.zeros(len(images), num_classes, device=images.device)
    logits[:, label] = LABEL_INIT
    learn_labels = params.label_lr > 0
    groups = [{"params": [images], "lr": params.lr}]
    if learn_labels:
        logits.requires_grad_(True)
        groups.append({"params": [logits], "lr": params.label_lr})
    opt = torch.optim.Adam(groups)
    hard = torch.full((len(images),), label, device=images.device)
    losses = []
    for _ in range(params.iterations):
        soft = logits.softmax(-1) if learn_labels else hard
        g = batched_grads(model, p_syn, b_syn, images, soft)
        loss = distance(g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # on the device: no host sync per iteration
    curve = torch.stack(losses).cpu()
    if not torch.isfinite(curve).all():
        bad = int(torch.nonzero(~torch.isfinite(curve))[0])
        raise DivergenceError(f"distill {name}: matching loss is {curve[bad].item()} at iteration {bad}")
    labels = logits.softmax(-1) if learn_labels else nn.functional.one_hot(hard, num_classes).float()
    log.debug("%s: matching loss %.4f -> %.4f", name, curve[0], curve[-1])
    return Synset(images.detach(), labels.detach()), curve.tolist()
