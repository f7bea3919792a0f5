"""Gradient distances for (reverse) gradient matching: layer-wise cosine distance plus a magnitude term (the
paper's), or the relative squared distance of curvature-whitened gradients."""

from __future__ import annotations

import torch

from ddm_ops.functional import Weights

EPS = 1e-12


def _rows(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """View a gradient as (..., rows, -1): one row per output unit for matrices and kernels, one row for vectors."""
    lead = t.shape[:batch_dims]
    body = t.shape[batch_dims:]
    return t.reshape(*lead, body[0] if len(body) >= 2 else 1, -1)


def gradient_distance(a: Weights, b: Weights, magnitude_weight: float = 1.0, batch_dims: int = 0) -> torch.Tensor:
    """Distance between two gradients, summed over layers, for each of the leading `batch_dims` entries.

    Per layer: the mean over output units of (1 - cosine) between their gradient rows (Dataset Condensation's
    layer-wise distance, averaged so every layer weighs the same), plus `magnitude_weight` times the squared
    log-ratio of the layer's gradient norms, (ln |a| - ln |b|)^2 (scale-free and symmetric, so a tiny late-training
    gradient does not swamp the rest). Zero when a == b; 2 per layer when a == -b.
    """
    total = 0.0
    for name in b:
        ra, rb = _rows(a[name], batch_dims), _rows(b[name], batch_dims)
        cos = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1) + EPS)
        total = total + (1.0 - cos).mean(-1)
        dims = tuple(range(batch_dims, a[name].dim()))
        na, nb = a[name].pow(2).sum(dims).sqrt(), b[name].pow(2).sum(dims).sqrt()
        total = total + magnitude_weight * ((na + EPS).log() - (nb + EPS).log()).pow(2)
    return total


def whitened_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b|^2 / |b|^2 over the last dim of whitened gradients (curvature.whiten): 0 when equal, 1 for a = 0."""
    return (a - b).pow(2).sum(-1) / (b.pow(2).sum(-1) + EPS)
