"""Quality metrics against retraining: group-LDS, LOGO Spearman, noise ceiling (dattri's shapes)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata


def nanmean(values: np.ndarray) -> float:
    """Mean over the defined values; NaN (without a warning) when none is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between a[:, j] and b[:, j] for every column j; NaN where a column is constant."""
    ra, rb = rankdata(a, axis=0), rankdata(b, axis=0)
    ra, rb = ra - ra.mean(0), rb - rb.mean(0)
    denom = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)


def group_lds(score: np.ndarray, values: np.ndarray, masks: np.ndarray) -> tuple[float, np.ndarray]:
    """Group linear datamodeling score.

    score (K, M): attribution of each group to each test output; values (m, M): the output of the model retrained
    on each of m subsets; masks (m, K): which groups each subset kept. Per test sample, the Spearman correlation
    across subsets between the summed attribution of the kept groups and the retrained output; returns the mean
    over test samples (ignoring undefined ones) and the per-sample values.
    """
    predicted = masks.astype(np.float64) @ score
    per_test = column_spearman(predicted, values)
    return nanmean(per_test), per_test


def logo_spearman(predicted: np.ndarray, true: np.ndarray) -> tuple[float, np.ndarray]:
    """Leave-one-group-out Spearman: per test sample, rank correlation across groups of predicted and true effects.

    predicted, true (K, M): effect of removing each group on each test output (e.g. drop of the margin).
    Returns the mean over test samples and the per-sample values.
    """
    per_test = column_spearman(predicted, true)
    return nanmean(per_test), per_test


def logo_spearman_within_class(
    predicted: np.ndarray, true: np.ndarray, group_labels: np.ndarray, test_labels: np.ndarray
) -> float:
    """LOGO Spearman restricted, for each test sample, to the groups of its own class."""
    values = []
    for c in np.unique(test_labels):
        rows, cols = group_labels == c, test_labels == c
        if rows.sum() > 2:
            values.append(column_spearman(predicted[rows][:, cols], true[rows][:, cols]))
    return nanmean(np.concatenate(values)) if values else float("nan")


def aggregate(matrix: np.ndarray, test_labels: np.ndarray) -> np.ndarray:
    """Per-class means of a (..., M) matrix over the test samples of each class -> (..., classes)."""
    classes = np.unique(test_labels)
    return np.stack([matrix[..., test_labels == c].mean(-1) for c in classes], axis=-1)
