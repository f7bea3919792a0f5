"""Online removal of clusters by their synsets, batched over many removals at once: the paper's n_u SGD steps from
θ_T, or a Newton step preconditioned by the training loss's curvature at a checkpoint."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from ddm_ops.curvature import Factors, precondition
from ddm_ops.functional import Weights, batched_grads, math_attention
from ddm_ops.models import evaluating


def unlearn(
    model: nn.Module,
    params: Weights,
    buffers: Weights,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_u: int,
    step_size: float,
    sign: float = 1.0,
) -> Weights:
    """Remove each of R groups from the model with weights (params, buffers).

    images (R, n, C, H, W) and soft labels (R, n, classes) hold one synset (or union of synsets) per removal.
    Returns the R removed models' parameters stacked (R, ...): n_u steps θ <- θ - sign * step_size * ∇L(θ; S).
    """
    r = len(images)
    p = {k: v.expand(r, *v.shape).clone() for k, v in params.items()}
    b = {k: v.expand(r, *v.shape) for k, v in buffers.items()}
    with torch.no_grad():
        for _ in range(n_u):
            g = batched_grads(model, p, b, images, labels, data_batched=True)
            p = {k: p[k] - sign * step_size * g[k] for k in p}
    return p


def newton_direction(
    model: nn.Module,
    params: Weights,
    buffers: Weights,
    factors: Factors,
    images: torch.Tensor,
    labels: torch.Tensor,
    damping: float,
) -> Weights:
    """(F + damping)^-1 ∇L(θ; S) at the checkpoint (params, buffers) for each of R groups, stacked (R, ...), with F
    the EK-FAC curvature `factors` of the training loss there; only the layers the factors cover. images
    (R, n, C, H, W) and soft labels (R, n, classes) hold one synset (or union of synsets) per removal."""
    r = len(images)
    p = {k: v.expand(r, *v.shape) for k, v in params.items()}
    b = {k: v.expand(r, *v.shape) for k, v in buffers.items()}
    with torch.no_grad():
        return precondition(factors, batched_grads(model, p, b, images, labels, data_batched=True), damping)


def stepped(params: Weights, direction: Weights, step_size: float | torch.Tensor, sign: float = 1.0) -> Weights:
    """The R models θ - sign * step_size * direction (direction stacked (R, ...); parameters it lacks stay): with a
    newton_direction, the Newton removal of each group from the checkpoint θ. step_size: one for all, or (R,)."""
    r = len(next(iter(direction.values())))

    def step(d: torch.Tensor) -> torch.Tensor:
        s = step_size if isinstance(step_size, float) else step_size.to(d.dtype).view(-1, *[1] * (d.dim() - 1))
        return sign * s * d

    return {k: v - step(direction[k]) if k in direction else v.expand(r, *v.shape) for k, v in params.items()}


@torch.no_grad()
def outputs_of(model: nn.Module, params: Weights, buffers: Weights, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Logits (R, N, classes) on x of each of R stacked parameter sets sharing `buffers`, `batch` images a pass;
    in eval mode (BatchNorm with the running statistics in `buffers`), whatever mode matching used."""
    r = len(next(iter(params.values())))

    def logits(i: int) -> torch.Tensor:
        weights = ({k: v[i] for k, v in params.items()}, buffers)
        return torch.cat([functional_call(model, weights, (chunk,)) for chunk in x.split(batch)])

    with math_attention(), evaluating(model):
        return torch.stack([logits(i) for i in range(r)])
