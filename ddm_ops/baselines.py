"""Reference methods on the same clusters and outputs as DDM: trivial baselines that keep the metrics honest,
the first-order trajectory estimate, and gradient ascent on the real cluster from θ_T."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddm_ops.functional import Weights, per_sample_grads
from ddm_ops.objectives import OBJECTIVES
from ddm_ops.trajectory import Trajectory
from ddm_ops.unlearn import outputs_of, unlearn

TEST_GRADIENT_ENTRIES = 1 << 26  # per-sample test-gradient entries held at once (a ResNet18's 450 needed 40 GB)


def class_indicator(cluster_labels: np.ndarray, test_labels: np.ndarray) -> np.ndarray:
    """(K, M): 1 where the cluster's class is the test sample's class, else 0."""
    return (cluster_labels[:, None] == test_labels[None, :]).astype(np.float64)


def input_similarity(
    x_train: torch.Tensor,
    cluster_ids: np.ndarray,
    cluster_labels: np.ndarray,
    x_test: torch.Tensor,
    test_labels: np.ndarray,
) -> np.ndarray:
    """(K, M): mean cosine similarity of the cluster's members to the test input, for clusters of its class; else 0."""
    a = nn.functional.normalize(x_train.flatten(1).double(), dim=1)
    b = nn.functional.normalize(x_test.flatten(1).double(), dim=1)
    sim = (a @ b.T).numpy()
    mean = np.stack([sim[cluster_ids == k].mean(0) for k in range(len(cluster_labels))])
    return mean * class_indicator(cluster_labels, test_labels)


def first_order_scores(
    model: nn.Module,
    trajectory: Trajectory,
    grads: list[Weights],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    objective: str,
) -> np.ndarray:
    """(K, M) first-order trajectory estimate of the drop of o_j when cluster κ is removed.

    `grads` holds each cluster's real gradients along the trajectory (cluster_gradients, with their true
    magnitude). Training on κ moved θ by -Σ_t η_t G_κ(t); to first order removing it changes o_j by
    +Σ_t η_t <∇o_j(θ_t), G_κ(t)>, so the drop is -Σ_t η_t <∇o_j(θ_t), G_κ(t)> (TracIn over the recorded
    checkpoints, summed over the cluster).
    """
    flat = lambda g, t: torch.cat([v[t].flatten() for v in g.values()])  # noqa: E731
    score = torch.zeros(len(grads), len(x_test), dtype=torch.float64)
    for t in range(trajectory.segments):
        params, buffers = trajectory.at(t)
        gt = torch.stack([flat(g, t) for g in grads]).double()
        step = max(1, TEST_GRADIENT_ENTRIES // gt.shape[1])  # test samples whose gradients are held at once
        for a in range(0, len(x_test), step):
            j = per_sample_grads(
                model, params, buffers, x_test[a : a + step], y_test[a : a + step], OBJECTIVES[objective]
            )
            jt = torch.cat([v.flatten(1) for v in j.values()], dim=1).double()
            score[:, a : a + step] -= float(trajectory.lrs[t]) * gt @ jt.T
    return score.numpy()


def gradient_ascent_outputs(
    model: nn.Module,
    params: Weights,
    buffers: Weights,
    members: list[tuple[torch.Tensor, torch.Tensor]],
    n_steps: int,
    step_size: float,
    x_test: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    """(K, M, C) test logits after n_steps of ascent on each cluster's real mean loss from θ_T."""
    outs = []
    for x, y in members:
        labels = nn.functional.one_hot(y, num_classes).float()
        removed = unlearn(model, params, buffers, x[None], labels[None], n_steps, step_size, sign=-1.0)
        outs.append(outputs_of(model, removed, buffers, x_test)[0])
    return torch.stack(outs)
