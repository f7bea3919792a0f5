"""Attribution from model outputs: score = drop of the objective when a cluster is removed, and Dist1/2/3."""

from __future__ import annotations

import torch

from ddm_ops.objectives import OBJECTIVES


def scores(
    base_logits: torch.Tensor, removed_logits: torch.Tensor, labels: torch.Tensor, objective: str = "margin"
) -> torch.Tensor:
    """A[κ, j] = o_j(θ_T) - o_j(θ_{-κ}); base (M, C), removed (K, M, C), labels (M,) -> (K, M).

    Positive: removing cluster κ lowers test sample j's objective, i.e. the cluster helps it.
    """
    o = OBJECTIVES[objective]
    return o(base_logits, labels)[None] - o(removed_logits, labels.expand(len(removed_logits), -1))


def distances(base_logits: torch.Tensor, removed_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dist1 = 100 |p_a - p_b|_2, Dist2 = KL(p_a || p_b), Dist3 = 1 / (1 + |p_a - p_b|_2); each (K, M).

    p_a = softmax of the base model's logits (M, C), p_b of each removed model's (K, M, C).
    """
    log_pa = base_logits.log_softmax(-1)[None]
    log_pb = removed_logits.log_softmax(-1)
    diff = (log_pa.exp() - log_pb.exp()).norm(dim=-1)
    kl = (log_pa.exp() * (log_pa - log_pb)).sum(-1)
    return {"dist1": 100.0 * diff, "dist2": kl, "dist3": 1.0 / (1.0 + diff)}
