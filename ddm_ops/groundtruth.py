"""What the ground truth retrains: within-class random halves of the clusters, and the calibration clusters."""

from __future__ import annotations

import numpy as np


def within_class_subsets(cluster_labels: np.ndarray, n_subsets: int, keep_fraction: float, seed: int) -> np.ndarray:
    """Masks (n_subsets, K) of kept clusters; every class keeps the same number of its clusters.

    Drawing within each class keeps the class balance of every subset fixed, so the subsets differ in which
    clusters they keep, not in how many of each class (which alone would predict much of the outcome).
    """
    rng = np.random.default_rng([seed, 1])
    masks = np.zeros((n_subsets, len(cluster_labels)), dtype=bool)
    for s in range(n_subsets):
        for c in np.unique(cluster_labels):
            members = np.flatnonzero(cluster_labels == c)
            keep = max(1, int(len(members) * keep_fraction))
            masks[s, rng.choice(members, size=keep, replace=False)] = True
    return masks


def calibration_clusters(cluster_labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n cluster ids (positions) from distinct classes where possible, drawn with `seed`; sorted."""
    rng = np.random.default_rng([seed, 2])
    classes = rng.permutation(np.unique(cluster_labels))
    chosen: list[int] = []
    while len(chosen) < min(n, len(cluster_labels)):
        for c in classes:
            free = [k for k in np.flatnonzero(cluster_labels == c) if k not in chosen]
            if free and len(chosen) < n:
                chosen.append(int(rng.choice(free)))
    return np.sort(np.array(chosen, dtype=np.int64))
