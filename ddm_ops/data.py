"""Datasets as tensors with a fixed train/test split; positions in that split are the stable train_index/test_index."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ddm_ops.config import DataParams

SPLIT_SEED = 0  # the split is part of the dataset's definition, never of a run's seed


@dataclass(frozen=True)
class Dataset:
    """Normalised images (N, C, H, W) float32, integer labels, and their positions in the fixed split."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: np.ndarray
    test_index: np.ndarray
    num_classes: int
    mean: float
    std: float

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Back to the [0, 1] pixel range (for figures and privacy checks)."""
        return (x * self.std + self.mean).clamp(0.0, 1.0)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


def _stratified_subset(labels: np.ndarray, n: int | None, seed: int, key: str) -> np.ndarray:
    """Positions of a stratified subset of size n (all positions when n is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    if n < len(classes):
        raise ValueError(f"data.subset.{key} = {n}: must keep at least one sample per class ({len(classes)})")
    keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
    return np.sort(keep)


def load_dataset(params: DataParams) -> Dataset:
    """Load the named dataset, split it with the fixed split, and normalise with the train-split statistics."""
    if params.name == "digits":
        images, labels = _digits()
    else:  # pragma: no cover - the config only admits known names
        raise ValueError(f"data.name = {params.name!r}: unknown dataset")
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=params.test_fraction, stratify=labels, random_state=SPLIT_SEED)
    tr, te = np.sort(tr), np.sort(te)
    mean, std = float(images[tr].mean()), float(images[tr].std())
    train_index = _stratified_subset(
        labels[tr], params.subset and params.subset.train, params.subset.seed if params.subset else 0, "train"
    )
    test_index = _stratified_subset(
        labels[te], params.subset and params.subset.test, params.subset.seed if params.subset else 0, "test"
    )

    def tensor(pos: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((images[pos] - mean) / std)

    return Dataset(
        name=params.name,
        x_train=tensor(tr[train_index]),
        y_train=torch.from_numpy(labels[tr[train_index]]),
        x_test=tensor(te[test_index]),
        y_test=torch.from_numpy(labels[te[test_index]]),
        train_index=train_index,
        test_index=test_index,
        num_classes=int(labels.max()) + 1,
        mean=mean,
        std=std,
    )
