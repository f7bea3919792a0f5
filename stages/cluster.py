"""Stage cluster: k-means within each class on the recorded features; every training sample gets a cluster_id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.cluster import cluster_within_classes
from ddm_ops.config import Params
from stages.artifacts import Paths, load_tensors, write_parquet
from stages.common import FanOut, dataset, in_process


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    features = load_tensors(paths.stage("record_trajectory") / "features.pt")["features"].numpy()
    labels = ds.y_train.numpy()
    ids, dist = cluster_within_classes(features, labels, params.cluster.k_per_class, params.base.seed)
    write_parquet(
        pd.DataFrame(
            {
                "train_index": ds.train_index,
                "label": labels,
                "cluster_id": ids,
                "centroid_distance": dist,
                "is_noisy": ds.noisy,
            }
        ),
        out / "assignments.parquet",
        "Cluster of every training sample (k-means within its class, on the labels as the model saw them).",
        {
            "train_index": "position in the dataset's fixed training split",
            "label": "class label as the model saw it",
            "cluster_id": "cluster; class c holds ids c*k .. c*k+k-1",
            "centroid_distance": "distance to the cluster's centroid in feature space",
            "is_noisy": "true where data.label_noise flipped the label (false without label noise)",
        },
    )
    k = int(ids.max()) + 1
    sizes = np.bincount(ids, minlength=k)
    cluster_labels = np.array([labels[ids == c][0] for c in range(k)])
    write_parquet(
        pd.DataFrame({"cluster_id": np.arange(k), "label": cluster_labels, "size": sizes}),
        out / "clusters.parquet",
        "One row per cluster.",
        {"cluster_id": "cluster", "label": "class of all its members", "size": "number of training samples"},
    )
    return {
        "noisy_fraction": float(ds.noisy.mean()),
        "n_clusters": k,
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "mean_size": float(sizes.mean()),
    }
