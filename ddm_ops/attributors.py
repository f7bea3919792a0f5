"""One interface for every attribution method: a Task (the trained model, its trajectory, the training data and its
clusters), the offline part (`fit`) and the online part (`attribute`: (K, M) scores per objective and, where the
method makes them, the removed models' test logits), with what each costs (`run`)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from ddm_ops.attribution import scores
from ddm_ops.devices import peak_memory
from ddm_ops.train import Checkpoint, DivergenceError

GRADIENT_OBJECTIVES = ("margin", "loss")  # what the gradient methods score (the quality metrics read these)


@dataclass(frozen=True)
class Calibration:
    """Models retrained without some clusters, to fit a removal step size on: the clusters' positions (n,), the test
    inputs x (M, ...) and the retrained models' logits on them (n, M, C)."""

    clusters: np.ndarray
    x: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class Task:
    """What every method is given. `model` is the architecture (its own weights are not used); `checkpoints` the
    recorded SGD trajectory θ_0 … θ_T (ddm_ops.train.train's on_checkpoint; the last one is the trained model) with
    its `batch_size`; `train` the training images and labels (N, ...), (N,) on the device the work runs on;
    `clusters` (N,) each training sample's cluster, 0 … K-1, every cluster within one class.
    Optional: `centroid_distance` (N,) of each sample to its cluster's centroid (synsets start from the nearest
    members; default: the distance in input space), `calibration` (methods whose step size is fitted), `seed`."""

    model: nn.Module
    checkpoints: list[Checkpoint]
    batch_size: int
    train: tuple[torch.Tensor, torch.Tensor]
    clusters: np.ndarray
    num_classes: int
    centroid_distance: np.ndarray | None = None
    calibration: Calibration | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        k = self.n_clusters
        ids = np.unique(self.clusters)
        if len(self.clusters) != len(self.train[0]) or not np.array_equal(ids, np.arange(k)):
            raise ValueError(
                f"Task.clusters: {len(self.clusters)} ids {ids.min()} … {ids.max()} ({len(ids)} distinct) for "
                f"{len(self.train[0])} training samples; expected one per sample, numbered 0 … K-1, every id used"
            )
        labels = self.train[1].cpu().numpy()
        for c in range(k):
            if len(np.unique(labels[self.clusters == c])) > 1:
                raise ValueError(f"Task.clusters: cluster {c} holds more than one class")

    @property
    def n_clusters(self) -> int:
        return int(self.clusters.max()) + 1

    @property
    def final(self) -> dict[str, torch.Tensor]:
        """θ_T's state on the task's device."""
        return {k: v.to(self.device) for k, v in self.checkpoints[-1].state.items()}

    @property
    def device(self) -> torch.device:
        return self.train[0].device

    @property
    def cluster_labels(self) -> np.ndarray:
        """(K,) the class of each cluster."""
        labels = self.train[1].cpu().numpy()
        return np.array([labels[self.clusters == c][0] for c in range(self.n_clusters)])

    def network(self) -> nn.Module:
        """A copy of the architecture on the task's device, in eval mode (each method sets its own modes)."""
        return copy.deepcopy(self.model).to(self.device).eval()

    def members(self, cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.from_numpy(self.clusters == cluster).to(self.device)
        return self.train[0][keep], self.train[1][keep]

    def distances(self) -> np.ndarray:
        """Each training sample's distance to its cluster's centroid (given, or in input space)."""
        if self.centroid_distance is not None:
            return self.centroid_distance
        x = self.train[0].flatten(1).double().cpu()
        ids = torch.from_numpy(self.clusters)
        centroids = torch.stack([x[ids == c].mean(0) for c in range(self.n_clusters)])
        return (x - centroids[ids]).norm(dim=1).numpy()


@dataclass(frozen=True)
class Attribution:
    """A method's answer: `scores` {objective: (K, M)}, the drop of o_j when cluster κ is removed (positive = the
    cluster helps); where the method makes removed models, their test logits (K, M, C) and θ_T's (M, C), on the
    CPU; its costs (filled by `run`: offline = fit plus offline work done while answering, online = the answer, or
    the part of it the method times itself, e.g. after a warm-up);
    `step_size` where one was fitted, and method-specific figures in `details`."""

    scores: dict[str, np.ndarray]
    logits: torch.Tensor | None = None
    base: torch.Tensor | None = None
    offline_seconds: float = 0.0
    online_seconds: float | None = None  # None: the wall time of attribute()
    peak_memory_mb: float = math.nan
    step_size: float | None = None
    details: dict = field(default_factory=dict)


class Attributor(Protocol):
    """`fit` does the offline part (everything that needs no test sample); `attribute` answers queries."""

    objectives: ClassVar[tuple[str, ...]]  # the objectives it can score

    def fit(self, task: Task) -> None: ...

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution: ...


def removed_model_scores(
    base: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, objectives: Sequence[str], removal: str
) -> dict[str, np.ndarray]:
    """{objective: (K, M)} from θ_T's test logits (M, C) and the removed models' (K, M, C); fails on a removed model
    with non-finite outputs (its step overflowed), `removal` saying how it was removed."""
    bad = (~torch.isfinite(logits)).flatten(1).any(1)
    if bad.any():
        raise DivergenceError(
            f"the model with cluster {int(torch.nonzero(bad)[0])} removed has non-finite test outputs ({removal})"
        )
    return {o: scores(base, logits, y.to(logits.device), o).cpu().numpy().astype(np.float64) for o in objectives}


def run(
    attributor: Attributor,
    task: Task,
    x: torch.Tensor,
    y: torch.Tensor,
    objectives: Sequence[str],
    name: str | None = None,
) -> Attribution:
    """fit, then attribute the objectives the method can score, with its costs and peak extra memory; `name` (default:
    the class's) is what errors call the method."""
    name = name or type(attributor).__name__
    wanted = [o for o in objectives if o in attributor.objectives]
    if not wanted:
        raise ValueError(
            f"{name} scores {list(attributor.objectives)}, none of the objectives asked: {list(objectives)}"
        )
    record: dict = {}
    with peak_memory(record, "memory"):
        start = time.perf_counter()
        attributor.fit(task)
        fitted = time.perf_counter()
        result = attributor.attribute(x, y, wanted)
        answered = time.perf_counter()
    for objective, matrix in result.scores.items():
        bad = ~np.isfinite(matrix).all(1)
        if bad.any():
            raise DivergenceError(
                f"{name}: non-finite {objective} scores for cluster {int(bad.argmax())}; its step size or damping "
                "overflowed"
            )
    return replace(
        result,
        offline_seconds=result.offline_seconds + fitted - start,
        online_seconds=answered - fitted if result.online_seconds is None else result.online_seconds,
        peak_memory_mb=record["memory"],
    )
