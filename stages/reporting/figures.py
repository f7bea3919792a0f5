"""Figures of the report and of `pipeline explain`: images, synsets with their clusters, the attribution heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.cluster import nearest_members
from ddm_ops.data import Dataset


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_pixels(ax, pixels: torch.Tensor, title: str = "") -> None:
    """An image (C, H, W) in [0, 1] without axes: grey (dark ink on white) for one channel, else in colour."""
    image = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    ax.imshow(image, cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def closest_members(assign: pd.DataFrame, cluster_id: int, n: int) -> np.ndarray:
    """Training positions of (at most) `n` members of the cluster nearest its centroid (assignments.parquet)."""
    ids, dist = assign["cluster_id"].to_numpy(), assign["centroid_distance"].to_numpy()
    return nearest_members(ids, dist, cluster_id, min(n, int((ids == cluster_id).sum())))


def show_image(ax, ds: Dataset, x: torch.Tensor, title: str = "") -> None:
    """A normalised image (C, H, W) of the dataset, de-normalised, without axes."""
    show_pixels(ax, ds.denormalise(x), title)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a figure; return its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


REAL_PER_ROW = 6


TOP = 3


def figure_synsets(ds: Dataset, synset: dict, assign: pd.DataFrame, path: Path) -> None:
    """One cluster per class: its synset images, then real members nearest the centroid."""
    plt = pyplot()
    ids = synset["cluster_ids"].numpy()
    labels = assign.groupby("cluster_id")["label"].first()
    chosen = [int(ids[labels.loc[ids].to_numpy() == c][0]) for c in sorted(labels.unique())]
    ipc = synset["images"].shape[1]
    fig, axes = plt.subplots(
        len(chosen), ipc + REAL_PER_ROW, figsize=(1.0 * (ipc + REAL_PER_ROW), 1.05 * len(chosen)), squeeze=False
    )
    for row, cid in enumerate(chosen):
        k = int(np.flatnonzero(ids == cid)[0])
        for j in range(ipc):
            show_image(axes[row, j], ds, synset["images"][k, j], f"synset {cid}" if row == 0 or j == 0 else "")
        members = closest_members(assign, cid, REAL_PER_ROW)
        for j in range(REAL_PER_ROW):
            ax = axes[row, ipc + j]
            if j < len(members):
                show_image(ax, ds, ds.x_train[members[j]], "real" if row == 0 else "")
            else:
                ax.axis("off")
    fig.suptitle("Synset images (left) next to real members of the same cluster (right)", fontsize=9)
    save_figure(fig, path)


def figure_thumbnail(ds: Dataset, synset: dict, assign: pd.DataFrame, cid: int, path: Path, n: int = 4) -> None:
    """A strip for a table cell: the cluster's first synset image, then its `n` real members nearest the centroid."""
    plt = pyplot()
    k = int(np.flatnonzero(synset["cluster_ids"].numpy() == cid)[0])
    members = closest_members(assign, cid, n)
    fig, axes = plt.subplots(1, 1 + n, figsize=(0.45 * (1 + n), 0.5), squeeze=False)
    show_image(axes[0, 0], ds, synset["images"][k, 0])
    for j in range(n):
        if j < len(members):
            show_image(axes[0, 1 + j], ds, ds.x_train[members[j]])
        else:
            axes[0, 1 + j].axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.98, bottom=0.02, wspace=0.1)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def figure_heatmap(
    matrix: np.ndarray, cluster_labels: np.ndarray, test_labels: np.ndarray, objective: str, path: Path
) -> None:
    """Attribution matrix, clusters grouped by class (rows), test samples grouped by class (columns)."""
    plt = pyplot()
    rows, cols = np.argsort(cluster_labels, kind="stable"), np.argsort(test_labels, kind="stable")
    m = matrix[rows][:, cols]
    lim = float(np.quantile(np.abs(m), 0.99)) or 1.0
    fig, ax = plt.subplots(figsize=(10, 4.5))
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    for boundary in np.flatnonzero(np.diff(cluster_labels[rows])) + 0.5:
        ax.axhline(boundary, color="k", lw=0.3)
    for boundary in np.flatnonzero(np.diff(test_labels[cols])) + 0.5:
        ax.axvline(boundary, color="k", lw=0.3)
    for axis, labels in ((ax.yaxis, cluster_labels[rows]), (ax.xaxis, test_labels[cols])):
        classes, first = np.unique(labels, return_index=True)
        counts = np.bincount(labels)[classes]
        axis.set_ticks(first + counts / 2 - 0.5, [f"class {c}" for c in classes], fontsize=7)
    ax.set_xlabel("test samples, grouped by class")
    ax.set_ylabel("clusters, grouped by class")
    ax.set_title(f"Attribution: drop of the {objective} when the cluster is removed (red = the cluster helps)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    save_figure(fig, path)


def figure_examples(
    ds: Dataset,
    matrix: np.ndarray,
    cluster_ids: np.ndarray,
    assign: pd.DataFrame,
    synset: dict,
    examples: np.ndarray,
    path: Path,
    top: int = TOP,
) -> None:
    """For each example test sample: the image, then its `top` most helpful and `top` most harmful clusters, each as
    its first synset image above its real member nearest the centroid, with the score."""
    plt = pyplot()
    representative = assign.groupby("cluster_id")["centroid_distance"].idxmin()  # training position per cluster
    position = {int(c): i for i, c in enumerate(synset["cluster_ids"].tolist())}
    cols = 1 + 2 * top
    fig, axes = plt.subplots(2 * len(examples), cols, figsize=(1.15 * cols, 2.3 * len(examples)), squeeze=False)
    for row, j in enumerate(examples):
        show_image(axes[2 * row, 0], ds, ds.x_test[j], f"test {ds.test_index[j]} (y={int(ds.y_test[j])})")
        axes[2 * row + 1, 0].axis("off")
        order = np.argsort(-matrix[:, j], kind="stable")
        picks = [(k, "helps") for k in order[:top]] + [(k, "hurts") for k in order[::-1][:top]]
        for col, (k, kind) in enumerate(picks, start=1):
            cid = int(cluster_ids[k])
            show_image(axes[2 * row, col], ds, synset["images"][position[cid], 0], f"{kind} c{cid} {matrix[k, j]:+.3f}")
            show_image(axes[2 * row + 1, col], ds, ds.x_train[representative[cid]], "real member")
    fig.suptitle("Most helpful (left) and most harmful (right) clusters: synset image above a real member", fontsize=9)
    save_figure(fig, path)


def figure_matching(matching: pd.DataFrame, path: Path) -> None:
    """Matching loss per iteration: median and 10-90% band over clusters."""
    plt = pyplot()
    q = matching.groupby("iteration")["loss"].quantile([0.1, 0.5, 0.9]).unstack()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.fill_between(q.index, q[0.1], q[0.9], alpha=0.3, label="10-90% of clusters")
    ax.plot(q.index, q[0.5], label="median")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient distance")
    ax.set_title("Reverse gradient matching loss", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
