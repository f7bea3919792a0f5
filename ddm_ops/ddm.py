"""DDM as an attributor. Offline: every cluster distilled into its synset, the training loss's EK-FAC curvature at
the matched checkpoints, the step size (given, or fitted on calibration clusters). Online: each cluster removed by
its synset (a Newton step at the matched checkpoints of the first perturb.span of training, their output changes
averaged, or θ_T moved by their mean step, each cluster's step lengthened to the kernel's with perturb.lengths
kernel; or the paper's n_u SGD steps from θ_T), with every removed model's test logits; the scores are the drops of
the objectives."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ddm_ops.attributors import Attribution, Task, removed_model_scores
from ddm_ops.calibration import NEWTON_STEP_GRID, STEP_GRID, calibrate_step
from ddm_ops.cluster import nearest_members
from ddm_ops.config import DistillParams, PerturbParams
from ddm_ops.curvature import Curvature, Factors, curvature_factors, damped, lengthened, uses_curvature
from ddm_ops.devices import synchronize
from ddm_ops.distill import distill_cluster, removal_sign
from ddm_ops.functional import split_state
from ddm_ops.models import functional_mode
from ddm_ops.objectives import OBJECTIVES, margin
from ddm_ops.trajectory import Trajectory
from ddm_ops.unlearn import newton_direction, outputs_of, stepped, unlearn

log = logging.getLogger(__name__)
WEIGHTS_PER_PASS = 50_000_000  # removals are batched so that their stacked weights stay below this many numbers
REFERENCE_IMAGES = 512  # perturb.lengths kernel: training images whose margin changes measure the steps' lengths
# the paper's DDM, as first run
PAPER = {"pairing": "mirrored", "ipc": 2, "iterations": 100, "metric": "layerwise", "labels": "learned"}
Distiller = Callable[[Task, DistillParams, Curvature], dict]  # -> the stacked synset (see distill_synsets)


def distill_synsets(task: Task, params: DistillParams, curvature: Curvature) -> dict:
    """Every cluster's synset, distilled in this process one cluster after another (metric whitened: against the
    `curvature` at the matched checkpoints).

    Returns images (K, ipc, C, H, W), soft labels (K, ipc, classes), cluster_ids (K,), init_index (K, ipc) (the
    members matching started from) and the direction, as the distill stage's synset.pt."""
    model = functional_mode(task.network(), params.batchnorm)
    trajectory = Trajectory.from_checkpoints(model, task.checkpoints, task.batch_size).to(task.device)
    distance, parts, init = task.distances(), [], []
    for k in range(task.n_clusters):
        init.append(torch.from_numpy(nearest_members(task.clusters, distance, k, params.ipc)))
        x0 = task.train[0][init[-1]]
        synset, _ = distill_cluster(
            model, trajectory, task.members(k), x0, task.num_classes, params, f"cluster {k}", curvature
        )
        parts.append(synset)
        log.info("distilled cluster %d/%d", k + 1, task.n_clusters)
    return {
        "images": torch.stack([s.images.cpu() for s in parts]),
        "labels": torch.stack([s.labels.cpu() for s in parts]),
        "cluster_ids": torch.arange(task.n_clusters),
        "init_index": torch.stack(init),
        "direction": params.direction,
    }


class DDM:
    """The Distilled Datamodel. `distill` and `perturb` as the params blocks of the same names (their defaults:
    checkpoint-paired synsets removed by EK-FAC Newton steps). `distiller` makes the synsets (default: in this
    process, cluster after cluster; the pipeline hands its fan-out, or the distill stage's file); `factors`
    (indices, factors) are the curvature when already fitted (the curvature stage's), else fitted in `fit`, and
    `kernel` likewise TRAK's kernel's at the same checkpoints (perturb.lengths kernel). A step size "auto" is fitted
    on the task's calibration clusters."""

    objectives = tuple(OBJECTIVES)

    def __init__(
        self,
        distill: DistillParams | None = None,
        perturb: PerturbParams | None = None,
        distiller: Distiller = distill_synsets,
        factors: tuple[torch.Tensor, list[Factors]] | None = None,
        kernel: list[Factors] | None = None,
    ):
        self.distill, self.perturb = distill or DistillParams(), perturb or PerturbParams()
        self.distiller, self.factors, self.kernel = distiller, factors, kernel
        self.curve: list[dict] | None = None

    def fit(self, task: Task) -> None:
        device = task.device
        self.model = model = functional_mode(task.network(), self.distill.batchnorm)
        curvature: Curvature = []
        if uses_curvature(self.perturb.update, self.distill.metric):
            if self.factors is None:
                trajectory = Trajectory.from_checkpoints(model, task.checkpoints, task.batch_size).to(device)
                index, factors = curvature_factors(
                    model, trajectory, task.train, self.distill.checkpoints, task.seed, self.perturb.curvature
                )
            else:
                index, factors = self.factors
            curvature = damped(factors, self.perturb.damping, device)
            last = round(self.perturb.span * (len(task.checkpoints) - 1))  # the removal's latest checkpoint
            if self.perturb.update == "ekfac" and index[0] > last:
                raise ValueError(
                    f"perturb.span {self.perturb.span}: none of the matched checkpoints {index.tolist()} is in the "
                    f"first span of training (θ_0 to θ_{last}); raise perturb.span or distill.checkpoints"
                )
        self.synset = synset = self.distiller(task, self.distill, curvature)
        self.images, self.labels = synset["images"].to(device), synset["labels"].to(device)
        self.sign = removal_sign(synset["direction"])
        self.theta, self.buffers = split_state(model, task.final)
        self.per_pass = max(1, WEIGHTS_PER_PASS // sum(v.numel() for v in self.theta.values()))
        self.unit = task.batch_size / len(task.train[0])  # the influence-function step for checkpoint-paired synsets
        self.points, self.lengths = [], None
        if self.perturb.update == "ekfac":
            ids = index.tolist()
            used = [j for j, i in enumerate(ids) if i <= last]
            for j in used:
                state = {k: v.to(device) for k, v in task.checkpoints[ids[j]].state.items()}
                self.points.append((*split_state(model, state), *curvature[j]))
            if lengthened(self.perturb.update, self.perturb.curvature, self.perturb.lengths):
                self.lengths = self._kernel_lengths(task, used)
        self.step = self.perturb.step_size
        if self.step == "auto":
            c = task.calibration
            if c is None:
                raise ValueError("perturb.step_size 'auto' is fitted on retrained clusters: Task.calibration is needed")
            grid = STEP_GRID if self.perturb.update == "sgd" else NEWTON_STEP_GRID
            log.info("calibrating the step on %d clusters' retrainings over %d sizes", len(c.clusters), len(grid))
            anchors = self._anchors(c.x)
            self.step, self.curve = calibrate_step(
                lambda s: self._remove(c.clusters, s, c.x, anchors)[0], c.logits.to(device), anchors[0][0], grid
            )

    def _kernel_lengths(self, task: Task, used: list[int]) -> torch.Tensor:
        """perturb.lengths kernel: c_k for each cluster, the norm of the margin changes that TRAK's kernel's Newton
        removal causes on REFERENCE_IMAGES random training images (the cluster's own members left out), over that of
        the Fisher's removal (both at the default step), normalized to median 1: the Fisher's steps lengthened by c_k
        have the kernel's magnitudes and keep their directions (docs/method.md). Called before self.lengths is set,
        so both removals here take the plain step."""
        device = self.images.device
        kernel = self.kernel
        if kernel is None:
            trajectory = Trajectory.from_checkpoints(self.model, task.checkpoints, task.batch_size).to(device)
            kernel = curvature_factors(
                self.model, trajectory, task.train, self.distill.checkpoints, task.seed, "margin"
            )[1]
        curvature = damped([kernel[j] for j in used], self.perturb.damping, device)
        pick = torch.randperm(len(task.train[0]), generator=torch.Generator().manual_seed(task.seed))[:REFERENCE_IMAGES]
        x, y = task.train[0][pick.to(device)], task.train[1][pick.to(device)]
        rows = np.arange(len(self.images))
        own = torch.from_numpy(task.clusters[pick.numpy()][None] == rows[:, None]).to(device)
        step = PerturbParams.model_fields["step_size"].default
        anchors, norms = self._anchors(x), []  # the same starting checkpoints for both removals
        for points in (self.points, [(w, b, *c) for (w, b, _, _), c in zip(self.points, curvature)]):
            removed, _ = self._remove(rows, step, x, anchors, points)
            change = margin(anchors[0][0], y) - margin(removed, y.expand(len(rows), -1))
            norms.append(change.masked_fill(own, 0).norm(dim=1))
        lengths = norms[1] / norms[0].clamp_min(torch.finfo(norms[0].dtype).tiny)
        quartiles = lengths.quantile(torch.tensor([0.25, 0.5, 0.75], device=device)).tolist()
        log.info("kernel lengths before normalizing: quartiles %s", ", ".join(f"{q:.3g}" for q in quartiles))
        return lengths / lengths.median()

    def _anchors(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Test logits of θ_T, then of each checkpoint the Newton removal starts from (combine outputs): they do not
        depend on the removed cluster or the step, so each is computed once per use."""
        starts = self.points if self.perturb.combine == "outputs" else []
        weights = [(self.theta, self.buffers)] + [(w, b) for w, b, _, _ in starts]
        return [outputs_of(self.model, {k: v[None] for k, v in w.items()}, b, x) for w, b in weights]

    def _pass(
        self, part: np.ndarray, step: float, x: torch.Tensor, anchors: list, points: list
    ) -> tuple[torch.Tensor, float]:
        """Test logits of the removed models of one pass, and the seconds their weight updates took."""
        model, images, labels, device = self.model, self.images[part], self.labels[part], self.images.device
        size = step * self.unit if self.lengths is None else step * self.unit * self.lengths[part]
        if self.perturb.update == "ekfac" and self.perturb.combine == "outputs":
            change, seconds = 0.0, 0.0
            for (weights, buffers, factors, damping), at in zip(points, anchors[1:]):
                start = time.perf_counter()
                direction = newton_direction(model, weights, buffers, factors, images, labels, damping)
                removed = stepped(weights, direction, size, self.sign)
                synchronize(device)
                seconds += time.perf_counter() - start
                change = change + outputs_of(model, removed, buffers, x) - at
            return anchors[0] + change / len(points), seconds
        start = time.perf_counter()  # one removed model per group, from θ_T
        if self.perturb.update == "sgd":
            removed = unlearn(model, self.theta, self.buffers, images, labels, self.perturb.n_u, step, self.sign)
        else:  # combine steps
            total: dict = {}  # a running sum: the checkpoints' directions are not all held at once
            for weights, buffers, factors, damping in points:
                d = newton_direction(model, weights, buffers, factors, images, labels, damping)
                total = {k: total.get(k, 0.0) + v for k, v in d.items()}
            removed = stepped(self.theta, total, size / len(points), self.sign)
        synchronize(device)
        seconds = time.perf_counter() - start
        return outputs_of(model, removed, self.buffers, x), seconds

    def _remove(
        self, rows: np.ndarray, step: float, x: torch.Tensor, anchors: list, points: list | None = None
    ) -> tuple[torch.Tensor, float]:
        """Test logits of the models with each row's synset removed (from `points`, default the removal's: weights,
        buffers, curvature and damping at each checkpoint), and the seconds the removal steps took."""
        logits, seconds = [], 0.0
        for part in np.array_split(rows, -(-len(rows) // self.per_pass)):
            synchronize(self.images.device)
            out, took = self._pass(part, step, x, anchors, self.points if points is None else points)
            logits.append(out)
            seconds += took
        return torch.cat(logits), seconds

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution:
        """Every cluster removed; online seconds: the removals and the removed models' outputs on x, after a one-off
        warm-up; details: removal_seconds (the weight updates alone)."""
        device = self.images.device
        self._remove(np.arange(1), self.step, x, self._anchors(x))  # warm-up, not part of the timed online work
        synchronize(device)
        start = time.perf_counter()
        anchors = self._anchors(x)
        removed, removal_seconds = self._remove(np.arange(len(self.images)), self.step, x, anchors)
        synchronize(device)
        online = time.perf_counter() - start
        base = anchors[0][0]
        return Attribution(
            removed_model_scores(base, removed, y, objectives, f"update {self.perturb.update}, step_size {self.step}"),
            removed.cpu(),
            base.cpu(),
            online_seconds=online,
            step_size=self.step,
            details={"removal_seconds": removal_seconds},
        )
