"""Data quality from attribution: each cluster's effect on the held-out loss and accuracy, the ranking from most
harmful to most helpful, how well it finds corrupted samples, and which clusters to remove to clean the data."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ddm_ops.objectives import negative_loss

INSPECTED = (5, 10, 20)  # percent of the training data inspected, most harmful clusters first


def cluster_effects(loss_scores: np.ndarray) -> np.ndarray:
    """(K,) effect of each cluster on the mean held-out loss: the mean over test samples of the score of the `loss`
    objective, i.e. how much the loss rises when the cluster is removed. Positive = helpful, negative = harmful."""
    return loss_scores.mean(1)


def effect_errors(loss_scores: np.ndarray) -> np.ndarray:
    """(K,) standard error of each cluster's effect over the test samples it averages: an effect within two of them
    of 0 may be no more than which test samples there happen to be."""
    return loss_scores.std(1, ddof=1) / np.sqrt(loss_scores.shape[1])


def accuracy_effects(base_logits: torch.Tensor, removed_logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(K,) held-out accuracy of θ_T minus that of each removed model θ_{-κ}: positive = the cluster helps."""
    correct = lambda logits: (logits.argmax(-1) == labels).double().mean(-1)  # noqa: E731
    return (correct(base_logits) - correct(removed_logits)).numpy()


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of (M, C) logits."""
    return float(-negative_loss(logits, labels).mean())


def harmful_first(effects: np.ndarray) -> np.ndarray:
    """Cluster positions from the most harmful (lowest effect) to the most helpful."""
    return np.argsort(effects, kind="stable")


def detection(effects: np.ndarray, cluster_of: np.ndarray, is_noisy: np.ndarray) -> dict[str, float]:
    """How well the ranking finds corrupted samples; every sample is scored by its cluster's harmfulness.

    auc: ROC AUC of -effect[cluster] for telling noisy from clean samples (0.5 = chance). found_at_x: share of the
    noisy samples among the first x% of the training data, inspected cluster by cluster from the most harmful
    (the last cluster counted in proportion); inspecting at random finds x%.
    """
    out = {"auc": float(roc_auc_score(is_noisy, -effects[cluster_of]))}
    sizes = np.bincount(cluster_of, minlength=len(effects))
    noisy = np.bincount(cluster_of, weights=is_noisy.astype(float), minlength=len(effects))
    order = harmful_first(effects)
    inspected = np.concatenate([[0], np.cumsum(sizes[order])])
    found = np.concatenate([[0], np.cumsum(noisy[order])])
    for x in INSPECTED:
        out[f"found_at_{x}"] = float(np.interp(x / 100 * len(cluster_of), inspected, found) / max(is_noisy.sum(), 1))
    return out


def least_useful(effects: np.ndarray, sizes: np.ndarray, percent: float) -> np.ndarray:
    """Cluster positions to remove for `percent` % of the training data, least useful first (the whole clusters
    whose sizes add up closest to that share)."""
    order = harmful_first(effects)
    target = percent / 100 * sizes.sum()
    taken = np.concatenate([[0], np.cumsum(sizes[order])])
    return order[: int(np.argmin(np.abs(taken - target)))]
