"""The recorded SGD trajectory as stacked weights, and each cluster's real gradient along it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ddm_ops.functional import Weights, batched_grads, split_state, stack
from ddm_ops.train import Checkpoint


@dataclass(frozen=True)
class Trajectory:
    """θ_0 … θ_T stacked (T+1 checkpoints); segment t runs from θ_t to θ_{t+1} with `lrs[t]` for `epochs[t]` epochs."""

    params: Weights
    buffers: Weights
    lrs: torch.Tensor
    epochs: torch.Tensor
    batch_size: int

    @classmethod
    def from_checkpoints(cls, model: nn.Module, checkpoints: list[Checkpoint], batch_size: int) -> Trajectory:
        parts = [split_state(model, c.state) for c in checkpoints]
        return cls(
            params=stack([p for p, _ in parts]),
            buffers=stack([b for _, b in parts]),
            lrs=torch.tensor([c.lr for c in checkpoints[:-1]]),
            epochs=torch.tensor([float(c.epochs) for c in checkpoints[:-1]]),
            batch_size=batch_size,
        )

    @property
    def segments(self) -> int:
        return len(self.lrs)

    def at(self, index: torch.Tensor | int) -> tuple[Weights, Weights]:
        """Weights (params, buffers) of the checkpoints at `index` (stacked when index is a tensor)."""
        return ({k: v[index] for k, v in self.params.items()}, {k: v[index] for k, v in self.buffers.items()})

    def final(self) -> tuple[Weights, Weights]:
        return self.at(-1)

    def to(self, device: torch.device) -> Trajectory:
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Trajectory(
            mv(self.params), mv(self.buffers), self.lrs.to(device), self.epochs.to(device), self.batch_size
        )

    def spread(self, n: int | str) -> torch.Tensor:
        """Indices of n checkpoints spread evenly over the trajectory, θ_0 and θ_T included (n 1: θ_T alone); n "all",
        or at least the number saved: every checkpoint."""
        count = len(self.lrs) + 1
        if n == "all" or n >= count:
            return torch.arange(count)
        return torch.linspace(count - 1, 0, n).round().long().flip(0)


@torch.no_grad()
def summed_gradients(
    model: nn.Module, params: Weights, buffers: Weights, x: torch.Tensor, y: torch.Tensor, batch: int
) -> Weights:
    """Σ_i ∇loss_i over the samples (x, y) at each of a stack of weight sets, `batch` samples a pass (memory; and
    the batches BatchNorm normalises over in train mode)."""
    total: Weights = {}
    for xs, ys in zip(x.split(batch), y.split(batch)):
        for k, g in batched_grads(model, params, buffers, xs, ys).items():  # mean over the batch
            total[k] = total[k] + g * len(xs) if k in total else g * len(xs)
    return total


def cluster_gradients(model: nn.Module, trajectory: Trajectory, x: torch.Tensor, y: torch.Tensor) -> Weights:
    """The cluster's real gradient in each segment, with its true magnitude, stacked (T, ...).

    G_t = (epochs_t / batch_size) * sum_i grad loss_i(θ_t): the cluster's share of the gradient that SGD applied
    during segment t (each member is seen once per epoch, and every batch loss is divided by the batch size).
    """
    params, buffers = trajectory.at(torch.arange(trajectory.segments))
    total = summed_gradients(model, params, buffers, x, y, trajectory.batch_size)
    scale = trajectory.epochs.to(x.device) / trajectory.batch_size
    return {k: g * scale.view(-1, *([1] * (g.dim() - 1))) for k, g in total.items()}


def checkpoint_gradients(
    model: nn.Module, trajectory: Trajectory, index: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> Weights:
    """The cluster's gradient at the checkpoints `index`, stacked: (1 / batch_size) * sum_i grad loss_i(θ_t), its
    share of one epoch of SGD there (batch_size / N times its share of the mean training loss's gradient)."""
    params, buffers = trajectory.at(index)
    total = summed_gradients(model, params, buffers, x, y, trajectory.batch_size)
    return {k: g / trajectory.batch_size for k, g in total.items()}
