"""What is trained and what is attributed: the training loss and the test-sample objectives (higher = better)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over samples; targets are class indices (N,) or soft labels (N, classes)."""
    if targets.dtype.is_floating_point:
        return -(targets * F.log_softmax(logits, dim=-1)).sum()
    return F.cross_entropy(logits, targets, reduction="sum")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct-class margin: logit of the true class minus the largest other logit, per sample."""
    correct = logits.gather(-1, labels[..., None])[..., 0]
    others = logits.scatter(-1, labels[..., None], float("-inf"))
    return correct - others.max(dim=-1).values


def probability(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the true class, per sample."""
    return F.softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]


def negative_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the per-sample cross-entropy (so that higher is better, like the other objectives)."""
    return -F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)


OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "margin": margin,
    "probability": probability,
    "loss": negative_loss,
}
