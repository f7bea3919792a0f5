"""Reference methods on the same clusters and outputs as DDM: trivial baselines that keep the metrics honest,
the first-order trajectory estimate, and gradient ascent on the real cluster from θ_T (functions, and each as an
attributor)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ddm_ops.attributors import GRADIENT_OBJECTIVES, Attribution, Task, removed_model_scores
from ddm_ops.calibration import calibrate_step
from ddm_ops.functional import Weights, per_sample_grads, split_state
from ddm_ops.objectives import OBJECTIVES
from ddm_ops.trajectory import Trajectory, cluster_gradients
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


class ClassIndicator:
    """1 where the cluster's class is the test sample's: the floor every method must clear."""

    objectives = tuple(OBJECTIVES)

    def fit(self, task: Task) -> None:
        self.labels = task.cluster_labels

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution:
        matrix = class_indicator(self.labels, y.cpu().numpy())
        return Attribution({o: matrix for o in objectives})


class InputSimilarity(ClassIndicator):
    """Mean cosine similarity of the cluster's members to the test input, for clusters of its class."""

    def fit(self, task: Task) -> None:
        super().fit(task)
        self.x, self.clusters = task.train[0].cpu(), task.clusters

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution:
        matrix = input_similarity(self.x, self.clusters, self.labels, x.cpu(), y.cpu().numpy())
        return Attribution({o: matrix for o in objectives})


class FirstOrder:
    """The first-order trajectory estimate (TracIn over the recorded checkpoints, summed over each cluster):
    offline the clusters' real gradients along the trajectory; online seconds are per objective."""

    objectives = GRADIENT_OBJECTIVES

    def fit(self, task: Task) -> None:
        self.model = task.network()
        self.trajectory = Trajectory.from_checkpoints(self.model, task.checkpoints, task.batch_size).to(task.device)
        self.grads = [cluster_gradients(self.model, self.trajectory, *task.members(k)) for k in range(task.n_clusters)]

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution:
        start = time.perf_counter()
        matrices = {o: first_order_scores(self.model, self.trajectory, self.grads, x, y, o) for o in objectives}
        return Attribution(matrices, online_seconds=(time.perf_counter() - start) / max(1, len(objectives)))


class GradientAscent:
    """`steps` ascent steps on the real cluster's mean loss from θ_T, the step size fitted on the task's calibration
    clusters (offline); the removed models are real models with outputs."""

    objectives = tuple(OBJECTIVES)

    def __init__(self, steps: int = 3):
        self.steps = steps

    def fit(self, task: Task) -> None:
        if task.calibration is None:
            raise ValueError("gradient_ascent fits its step size on retrained clusters: Task.calibration is needed")
        self.model = task.network()
        self.theta, self.buffers = split_state(self.model, task.final)
        self.members = [task.members(k) for k in range(task.n_clusters)]
        self.num_classes = task.num_classes
        c = task.calibration
        calibration, truth = [self.members[k] for k in c.clusters], c.logits.to(task.device)
        self.step, _ = calibrate_step(lambda s: self._outputs(calibration, s, c.x), truth, self._base(c.x))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """Test logits of θ_T (M, C): doing nothing."""
        return outputs_of(self.model, {k: v[None] for k, v in self.theta.items()}, self.buffers, x)[0]

    def _outputs(self, members: list, step: float, x: torch.Tensor) -> torch.Tensor:
        model, theta, buffers = self.model, self.theta, self.buffers
        return gradient_ascent_outputs(model, theta, buffers, members, self.steps, step, x, self.num_classes)

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution:
        start = time.perf_counter()
        logits = self._outputs(self.members, self.step, x)
        online = time.perf_counter() - start
        base = self._base(x)
        matrices = removed_model_scores(base, logits, y, objectives, f"gradient ascent, step_size {self.step}")
        return Attribution(matrices, logits.cpu(), base.cpu(), online_seconds=online, step_size=self.step)
