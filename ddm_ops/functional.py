"""Models as functions of their weights: stacked checkpoints, per-weight-set gradients and outputs (torch.func)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ddm_ops.objectives import summed_loss

Weights = dict[str, torch.Tensor]


def split_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[Weights, Weights]:
    """Split a state dict into (trainable parameters, buffers) by the model's own names."""
    names = {n for n, _ in model.named_parameters()}
    return ({k: v for k, v in state.items() if k in names}, {k: v for k, v in state.items() if k not in names})


def stack(states: Sequence[Weights]) -> Weights:
    """Stack weight dicts along a new leading dimension."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


@contextmanager
def math_attention() -> Iterator[None]:
    """Attention by its plain formula: the fused kernels have no batching rule for vmap and no second derivative,
    which matching (a gradient of gradients over stacked weights) needs. No effect on models without attention."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def mean_loss(
    model: nn.Module, params: Weights, buffers: Weights, x: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of the model with weights (params, buffers) on (x, targets)."""
    return summed_loss(functional_call(model, (params, buffers), (x,)), targets) / len(x)


def batched_grads(
    model: nn.Module,
    params: Weights,
    buffers: Weights,
    x: torch.Tensor,
    targets: torch.Tensor,
    data_batched: bool = False,
) -> Weights:
    """Gradient of `mean_loss` for each of a stack of weight sets (leading dim of params and buffers).

    With `data_batched`, x and targets carry the same leading dim (one data set per weight set).
    Differentiable with respect to x and targets (for matching).
    """
    fn = grad(lambda p, b, xx, tt: mean_loss(model, p, b, xx, tt))
    dims = 0 if data_batched else None
    with math_attention():
        return vmap(fn, in_dims=(0, 0, dims, dims))(params, buffers, x, targets)


def batched_logits(model: nn.Module, params: Weights, buffers: Weights, x: torch.Tensor) -> torch.Tensor:
    """Logits (n_weight_sets, N, classes) of each weight set on the same inputs x."""
    with math_attention():
        return vmap(lambda p, b: functional_call(model, (p, b), (x,)))(params, buffers)


def per_sample_grads(
    model: nn.Module, params: Weights, buffers: Weights, x: torch.Tensor, labels: torch.Tensor, objective
) -> Weights:
    """Gradient of objective(logits, label) for every sample (N, ...) at one weight set (e.g. test-margin gradients)."""

    def one(p: Weights, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return objective(functional_call(model, (p, buffers), (xi[None],)), yi[None])[0]

    with math_attention():
        return vmap(grad(one), in_dims=(None, 0, 0))(params, x, labels)
