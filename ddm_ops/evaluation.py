"""Every quality number of a run against the ground truth: LOGO Spearman, group-LDS (per test sample, per class,
whole test loss), the noise ceiling, and fidelity, for DDM and each reference method alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch

from ddm_ops.calibration import dist1_to
from ddm_ops.metrics import aggregate, column_spearman, group_lds, logo_spearman, logo_spearman_within_class, nanmean
from ddm_ops.objectives import OBJECTIVES


@dataclass(frozen=True)
class Truth:
    """Retrained models' test logits per seed (the aligned seed is the target's): full data (M, C), without each
    cluster (K, M, C) in cluster order, with each subset (m, M, C); masks (m, K) of kept clusters; positions of
    the calibration and evaluation clusters."""

    enabled: bool
    aligned_seed: int
    resampled_seeds: list[int]
    full: dict[int, np.ndarray]
    cluster: dict[int, np.ndarray]
    subset: dict[int, np.ndarray]
    masks: np.ndarray
    calibration: np.ndarray
    evaluation: np.ndarray


@dataclass(frozen=True)
class Method:
    """A method's predicted drops per objective name ((K, M) each) and, when it makes one, its removed models."""

    scores: dict[str, np.ndarray]
    logits: np.ndarray | None = None


def _objective(name: str, labels: torch.Tensor) -> Callable[[np.ndarray], np.ndarray]:
    fn = OBJECTIVES[name]
    return lambda logits: fn(torch.from_numpy(logits), labels.expand(*logits.shape[:-2], -1)).double().numpy()


def views(test_labels: np.ndarray) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """Objectives the metrics are computed on: (score objective, aggregation over test samples)."""
    return {
        "margin": ("margin", lambda a: a),
        "class_margin": ("margin", lambda a: aggregate(a, test_labels)),
        "test_loss": ("loss", lambda a: a.mean(-1, keepdims=True)),
    }


def evaluate(
    methods: dict[str, Method],
    base_logits: np.ndarray,
    test_labels: np.ndarray,
    cluster_labels: np.ndarray,
    truth: Truth,
) -> dict[str, dict[str, float]]:
    """{method: {metric: value}} plus a `reference` entry with the noise ceiling and the fidelity baselines.

    LOGO metrics use the evaluation clusters only (the calibration clusters fitted step sizes); group-LDS uses
    every subset. Resampled truths are averaged over seeds; the noise ceiling compares seeds with each other.
    """
    labels = torch.from_numpy(test_labels)
    ev, masks = truth.evaluation, truth.masks
    seeds = truth.resampled_seeds
    out: dict[str, dict[str, float]] = {name: {} for name in methods}
    ref: dict[str, float] = {}
    for view, (objective, agg) in views(test_labels).items():
        o = _objective(objective, labels)
        drop = lambda s, agg=agg, o=o: agg(o(truth.full[s])[None] - o(truth.cluster[s]))  # noqa: E731
        true_aligned = drop(truth.aligned_seed)
        values_aligned = agg(o(truth.subset[truth.aligned_seed]))
        per_seed = {s: drop(s) for s in seeds}
        values_seed = {s: agg(o(truth.subset[s])) for s in seeds}
        true_resampled = np.mean([per_seed[s] for s in seeds], axis=0) if seeds else None
        values_resampled = np.mean([values_seed[s] for s in seeds], axis=0) if seeds else None
        for name, method in methods.items():
            if objective not in method.scores:
                continue
            pred = agg(method.scores[objective])
            m = out[name]
            m[f"logo_{view}_aligned"] = logo_spearman(pred[ev], true_aligned[ev])[0]
            m[f"lds_{view}_aligned"] = group_lds(pred, values_aligned, masks)[0]
            if seeds:
                m[f"logo_{view}_resampled"] = logo_spearman(pred[ev], true_resampled[ev])[0]
                m[f"lds_{view}_resampled"] = group_lds(pred, values_resampled, masks)[0]
            if view == "margin":
                m["logo_margin_within_class_aligned"] = logo_spearman_within_class(
                    pred[ev], true_aligned[ev], cluster_labels[ev], test_labels
                )
        if len(seeds) >= 2:
            pairs = list(permutations(seeds, 2))
            ref[f"ceiling_logo_{view}"] = nanmean(
                np.array([logo_spearman(per_seed[a][ev], per_seed[b][ev])[0] for a, b in pairs])
            )
            ref[f"ceiling_lds_{view}"] = nanmean(
                np.array([nanmean(column_spearman(values_seed[a], values_seed[b])) for a, b in pairs])
            )
    aligned = torch.from_numpy(truth.cluster[truth.aligned_seed][ev])
    base = torch.from_numpy(base_logits)
    ref["fidelity_do_nothing"] = float(dist1_to(aligned, base.expand_as(aligned)).mean())
    if seeds:
        ref["fidelity_seed_noise"] = float(
            np.mean([float(dist1_to(torch.from_numpy(truth.full[s])[None], base[None])) for s in seeds])
        )
    for name, method in methods.items():
        if method.logits is not None:
            out[name]["fidelity_dist1"] = float(dist1_to(aligned, torch.from_numpy(method.logits[ev])).mean())
    return {**out, "reference": ref}
