"""Stage baselines: the methods DDM is compared with, on the same clusters, judged by the same ground truth.

Always the trivial class indicator and input similarity; then those in `baselines.methods`: the paper's DDM, the
first-order trajectory estimate, gradient ascent on the real cluster from θ_T, forward gradient matching (DDM's
predecessor: synsets that imitate the cluster, removed by ascent), and from the `peers` extra dattri's TracIn,
influence function and TRAK (one model, and an ensemble of checkpoints) and Kronfluence's EK-FAC (at θ_T, and an
ensemble of checkpoints; per-sample scores summed over each cluster). Every method's offline and online seconds
and peak memory go to costs.parquet. Disabled, the stage writes empty tables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops import peers
from ddm_ops.attribution import scores
from ddm_ops.baselines import class_indicator, first_order_scores, gradient_ascent_outputs, input_similarity
from ddm_ops.calibration import calibrate_step
from ddm_ops.config import Params
from ddm_ops.devices import peak_memory, resolve_device
from ddm_ops.functional import split_state
from ddm_ops.train import DivergenceError
from ddm_ops.trajectory import Trajectory, cluster_gradients
from ddm_ops.unlearn import outputs_of
from stages.artifacts import (
    COST_COLUMNS,
    Paths,
    concat_or_empty,
    load_checkpoints,
    load_tensors,
    long_logits,
    long_scores,
    read_parquet,
    write_parquet,
)
from stages.common import FanOut, dataset, in_process, new_model
from stages.removal import remove_all
from stages.retraining import load_ground_truth
from stages.synsets import distill_all

SCORE_COLUMNS = {
    "method": "reference method (see costs.parquet)",
    "cluster_id": "removed cluster",
    "test_index": "position in the dataset's fixed test split",
    "objective": "margin, loss or probability (as in attribution.parquet)",
    "score": "predicted drop of the objective when the cluster is removed (positive = the cluster helps)",
}
SCORE_DTYPES = {"method": "str", "cluster_id": "int64", "test_index": "int64", "objective": "str", "score": "float64"}
OUTPUT_COLUMNS = {
    "method": "method that produced the removed model",
    "cluster_id": "removed cluster",
    "test_index": "position in the dataset's fixed test split",
    "class": "output class",
    "logit": "logit of the removed model",
}
OUTPUT_DTYPES = {"method": "str", "cluster_id": "int64", "test_index": "int64", "class": "int64", "logit": "float32"}
SCORED_OBJECTIVES = ("margin", "loss")  # what the quality metrics read; the gradient methods compute only these
PAPER = {"pairing": "mirrored", "ipc": 2, "iterations": 100}  # the paper's DDM as this project first ran it


class Methods:
    """What the methods share: the data, θ_T, the trajectory, the clusters; and the tables they fill."""

    def __init__(self, params: Params, paths: Paths, out: Path, fan_out: FanOut):
        self.params, self.paths, self.out, self.fan_out = params, paths, out, fan_out
        self.ds = ds = dataset(params)
        self.device = resolve_device(params.base.device)
        clusters = read_parquet(paths.stage("cluster") / "clusters.parquet")
        self.cluster_ids, self.labels = clusters["cluster_id"].to_numpy(), clusters["label"].to_numpy()
        self.ids = read_parquet(paths.stage("cluster") / "assignments.parquet")["cluster_id"].to_numpy()
        x, y = ds.x_train.to(self.device), ds.y_train.to(self.device)
        self.train = (x, y)
        self.members = [(x[self.ids == k], y[self.ids == k]) for k in self.cluster_ids]
        self.test = (ds.x_test.to(self.device), ds.y_test.to(self.device))
        self.model = new_model(params, ds).to(self.device).eval()  # reference methods: BatchNorm running stats
        self.checkpoints = load_checkpoints(paths.stage("train_target") / "checkpoints")
        self.trajectory = Trajectory.from_checkpoints(self.model, self.checkpoints, params.train.batch_size).to(
            self.device
        )
        state = load_tensors(paths.stage("train_target") / "model.pt")
        self.state = {k: v.to(self.device) for k, v in state.items()}
        self.theta, self.buffers = split_state(self.model, self.state)
        self.truth = load_ground_truth(paths, params)
        self.objectives = [o for o in params.attribute.objectives if o in SCORED_OBJECTIVES]
        self.frames: list[pd.DataFrame] = []
        self.outputs: list[pd.DataFrame] = []
        self.costs: list[dict] = []
        self.step_sizes: dict[str, float] = {}

    def add(self, method: str, matrices: dict[str, np.ndarray], offline: float, online: float, memory: float):
        for objective, matrix in matrices.items():
            bad = ~np.isfinite(matrix).all(1)
            if bad.any():
                raise DivergenceError(
                    f"baselines {method}: non-finite {objective} scores for cluster {self.cluster_ids[bad.argmax()]}; "
                    f"its step size or damping overflowed (baselines.* params), or leave {method} out of "
                    "baselines.methods"
                )
            scores = long_scores(matrix.astype(np.float64), self.cluster_ids, self.ds.test_index)
            self.frames.append(scores.assign(method=method, objective=objective))
        self.costs.append(
            {
                "method": method,
                "offline_seconds": offline,
                "online_seconds": online,
                "online_seconds_per_query": online / len(self.ds.test_index),
                "peak_memory_mb": memory,
            }
        )

    def removed_models(self, method: str, logits: torch.Tensor, base: torch.Tensor) -> dict[str, np.ndarray]:
        """Score matrices of a method that makes removed models; their logits go to outputs.parquet."""
        self.outputs.append(
            long_logits(logits.cpu().numpy(), self.cluster_ids, self.ds.test_index).assign(method=method)
        )
        y = self.ds.y_test.to(logits.device)
        return {o: scores(base, logits, y, o).cpu().numpy() for o in self.params.attribute.objectives}

    def trivial(self) -> None:
        """The class indicator and input similarity: the same matrix for every objective."""
        ds, test_labels = self.ds, self.ds.y_test.numpy()
        for method, fn in (
            ("class_indicator", lambda: class_indicator(self.labels, test_labels)),
            ("input_similarity", lambda: input_similarity(ds.x_train, self.ids, self.labels, ds.x_test, test_labels)),
        ):
            record: dict = {}
            start = time.perf_counter()
            with peak_memory(record, "memory"):
                matrix = fn()
            matrices = {o: matrix for o in self.params.attribute.objectives}
            self.add(method, matrices, 0.0, time.perf_counter() - start, record["memory"])

    def first_order(self) -> None:
        record: dict = {}
        with peak_memory(record, "memory"):
            start = time.perf_counter()
            grads = [cluster_gradients(self.model, self.trajectory, x, y) for x, y in self.members]
            offline = time.perf_counter() - start
            start = time.perf_counter()
            matrices = {
                o: first_order_scores(self.model, self.trajectory, grads, *self.test, o) for o in self.objectives
            }
            online = (time.perf_counter() - start) / len(self.objectives)
        self.add("first_order", matrices, offline, online, record["memory"])

    def gradient_ascent(self) -> None:
        truth = torch.from_numpy(self.truth.cluster[self.truth.aligned_seed][self.truth.calibration]).to(self.device)
        steps, n = self.params.baselines.gradient_ascent_steps, self.ds.num_classes
        model, theta, buffers, x_test = self.model, self.theta, self.buffers, self.test[0]
        calibration = [self.members[k] for k in self.truth.calibration]
        record: dict = {}
        with peak_memory(record, "memory"):
            start = time.perf_counter()
            step, _ = calibrate_step(
                lambda s: gradient_ascent_outputs(model, theta, buffers, calibration, steps, s, x_test, n), truth
            )
            offline = time.perf_counter() - start
            start = time.perf_counter()
            logits = gradient_ascent_outputs(model, theta, buffers, self.members, steps, step, x_test, n)
            online = time.perf_counter() - start
        base = outputs_of(model, {k: v[None] for k, v in theta.items()}, buffers, x_test)[0]
        matrices = self.removed_models("gradient_ascent", logits, base)
        self.add("gradient_ascent", matrices, offline, online, record["memory"])
        self.step_sizes["gradient_ascent"] = step

    def synset_method(self, method: str, distill: dict, perturb: dict) -> dict:
        """A DDM variant: synsets distilled with `distill` overrides, removed with `perturb` overrides, step
        calibrated on the calibration clusters. Returns the synset."""
        p = self.params
        variant = p.model_copy(
            update={
                "distill": p.distill.model_copy(update=distill),
                "perturb": p.perturb.model_copy(update={**perturb, "step_size": "auto"}),
            }
        )
        synset, _, distilled = distill_all(variant, self.paths, self.out / f"{method}_clusters", self.fan_out)
        removal = remove_all(variant, self.paths, synset, "auto")
        logits = removal["logits"]
        matrices = self.removed_models(method, logits[1:], logits[0])
        memory = max(distilled["distill_peak_memory_mb"], removal["online_peak_memory_mb"])
        self.add(method, matrices, distilled["distill_seconds"], removal["online_seconds"], memory)
        self.step_sizes[method] = removal["step_size"]
        return synset

    def forward_matching(self) -> None:
        """DDM's predecessor: classic gradient matching along the whole trajectory (the synset at θ_t imitates
        segment t), removed by n_u SGD ascent steps from θ_T; sizes as the paper's DDM."""
        synset = self.synset_method("forward_matching", {**PAPER, "direction": "forward"}, {"update": "sgd"})
        torch.save(synset, self.out / "forward_synset.pt")  # also read by the privacy report

    def ddm_paper(self) -> None:
        """The paper's DDM: reverse matching along the whole trajectory (mirrored pairing) and removal by n_u plain
        SGD steps from θ_T."""
        self.synset_method("ddm_paper", {**PAPER, "direction": "reverse"}, {"update": "sgd"})

    def peer(self, method: str) -> None:
        """A library's per-sample scores (N, M), summed over each cluster."""
        train, test, model, final = self.train, self.test, self.model, self.state
        if method == "tracin":
            states = [c.state for c in self.checkpoints[:-1]]  # θ_t, weighted by the SGD it received
            weights = [c.lr * c.epochs / self.params.train.batch_size for c in self.checkpoints[:-1]]
            run: Callable = lambda o, ph: peers.tracin(model, states, weights, train, test, o, ph)  # noqa: E731
        elif method == "influence":
            damping = self.params.baselines.influence_damping
            run = lambda o, ph: peers.influence(model, final, train, test, o, ph, damping)  # noqa: E731
        elif method == "trak":
            run = lambda o, ph: peers.trak(model, [final], train, test, o, ph)  # noqa: E731
        elif method == "trak_ensemble":
            states = [c.state for c in self.checkpoints[-self.params.baselines.trak_models :]]
            run = lambda o, ph: peers.trak(model, states, train, test, o, ph)  # noqa: E731
        elif method == "ekfac":
            run = lambda o, ph: peers.ekfac(model, final, train, test, o, ph)  # noqa: E731
        else:
            states = [c.state for c in self.checkpoints[-self.params.baselines.ekfac_models :]]
            run = lambda o, ph: peers.ekfac_ensemble(model, states, train, test, o, ph)  # noqa: E731
        record: dict = {}
        matrices, phases = {}, []
        with peak_memory(record, "memory"):
            for o in self.objectives:
                phases.append(peers.Phases())
                per_sample = run(o, phases[-1])
                matrices[o] = peers.per_cluster(per_sample, self.ids, len(self.cluster_ids))
        seconds = {k: float(np.mean([ph.seconds[k] for ph in phases])) for k in ("offline", "online")}
        self.add(method, matrices, seconds["offline"], seconds["online"], record["memory"])


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    metrics: dict = {"enabled": int(params.baselines.enabled)}
    frames, outputs, costs = [], [], []
    if params.baselines.enabled:
        peers.check_installed(list(params.baselines.methods))
        methods = Methods(params, paths, out, fan_out)
        methods.trivial()
        for name in params.baselines.methods:
            start = time.perf_counter()
            if name in peers.PEERS:
                methods.peer(name)
            else:
                getattr(methods, name)()
            metrics[f"{name}_seconds"] = time.perf_counter() - start
        metrics.update({f"{name}_step_size": step for name, step in methods.step_sizes.items()})
        frames, outputs, costs = methods.frames, methods.outputs, methods.costs
    if not (out / "forward_synset.pt").is_file():
        torch.save({}, out / "forward_synset.pt")  # declared in dvc.yaml: present, empty, without forward_matching
    write_parquet(
        concat_or_empty(frames, SCORE_DTYPES),
        out / "baselines.parquet",
        "Scores of the reference methods, in attribution.parquet's layout plus `method`.",
        SCORE_COLUMNS,
    )
    write_parquet(
        concat_or_empty(outputs, OUTPUT_DTYPES),
        out / "outputs.parquet",
        "Test logits of the reference methods that produce a removed model.",
        OUTPUT_COLUMNS,
    )
    write_parquet(
        pd.DataFrame(costs, columns=list(COST_COLUMNS)),
        out / "costs.parquet",
        "Cost of every reference method on this run.",
        COST_COLUMNS,
    )
    return metrics
