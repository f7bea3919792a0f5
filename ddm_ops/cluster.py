"""k-means within each class: every cluster holds one label; ids run class by class."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def cluster_within_classes(
    features: np.ndarray, labels: np.ndarray, k_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (cluster_id per sample, distance of each sample to its cluster's centroid).

    Class c's clusters get ids c*k .. c*k+k-1 (classes in ascending order), so ids are stable and dense.
    """
    ids = np.empty(len(labels), dtype=np.int64)
    dist = np.empty(len(labels), dtype=np.float64)
    for rank, c in enumerate(np.unique(labels)):
        pos = np.flatnonzero(labels == c)
        if len(pos) < k_per_class:
            raise ValueError(f"cluster.k_per_class = {k_per_class}: class {c} has only {len(pos)} training samples")
        km = KMeans(n_clusters=k_per_class, n_init=10, random_state=seed).fit(features[pos])
        ids[pos] = rank * k_per_class + km.labels_
        dist[pos] = np.linalg.norm(features[pos] - km.cluster_centers_[km.labels_], axis=1)
    return ids, dist


def nearest_members(cluster_ids: np.ndarray, distance: np.ndarray, cluster_id: int, n: int) -> np.ndarray:
    """Positions of the n members of `cluster_id` nearest its centroid (cycled when the cluster is smaller)."""
    pos = np.flatnonzero(cluster_ids == cluster_id)
    pos = pos[np.argsort(distance[pos], kind="stable")]
    return np.resize(pos, n)
