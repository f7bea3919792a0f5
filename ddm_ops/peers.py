"""Established attribution methods through their own libraries (the `peers` extra): dattri's TracIn, influence
function (Arnoldi) and TRAK, and Kronfluence's EK-FAC, at their documented defaults.

Each gives per-training-sample scores (N, M) in this project's sign convention, positive = the sample helps test
sample j (removing it lowers o_j): the libraries are handed the training cross-entropy and, on the test side,
-o_j (a loss, so that their positive scores are the helpful ones). `per_cluster` sums them into DDM's (K, M) layout.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from ddm_ops.attributors import GRADIENT_OBJECTIVES, Attribution, Task
from ddm_ops.objectives import OBJECTIVES

PEERS = ("tracin", "influence", "trak", "trak_ensemble", "ekfac", "ekfac_ensemble")


class Phases:
    """Wall seconds of a method's offline phase (needs no test sample) and its online phase (answers the queries)."""

    def __init__(self) -> None:
        self.seconds = {"offline": 0.0, "online": 0.0}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def per_cluster(scores: np.ndarray, cluster_ids: np.ndarray, k: int) -> np.ndarray:
    """(N, M) per-sample scores summed over the members of each cluster -> (K, M)."""
    return np.stack([scores[cluster_ids == c].sum(0) for c in range(k)])


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _functions(model: nn.Module, objective: str) -> dict[str, Callable]:
    """torch.func-style functions f(params, (x, y)) that dattri takes; batched or single samples alike."""
    o = OBJECTIVES[objective]

    def logits(params, data):
        x, y = data
        if x.dim() == 3:  # TracIn and TRAK hand over one sample at a time
            x, y = x[None], y[None]
        return functional_call(model, params, (x,)), y.long()

    def train_loss(params, data):
        z, y = logits(params, data)
        return F.cross_entropy(z, y)

    def test_loss(params, data):  # -o: the libraries' positive score is then "helps"
        z, y = logits(params, data)
        return -o(z, y).sum()

    def test_output(params, data):  # TRAK's target: o itself, oriented like its training output
        z, y = logits(params, data)
        return o(z, y).sum()

    def trak_output(params, data):  # TRAK's model output on a training sample: log(p / (1 - p))
        z, y = logits(params, data)
        log_p = -F.cross_entropy(z, y)
        return log_p - torch.log1p(-torch.exp(log_p))

    def correct_probability(params, data):
        z, y = logits(params, data)
        return torch.exp(-F.cross_entropy(z, y))

    return {
        "train_loss": train_loss,
        "test_loss": test_loss,
        "test_output": test_output,
        "trak_output": trak_output,
        "correct_probability": correct_probability,
    }


def tracin(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    weights: list[float],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    objective: str,
    phases: Phases,
) -> np.ndarray:
    """TracIn over the recorded checkpoints, each weighted by `weights` (its share of SGD: lr x epochs / batch).
    dattri computes the training gradients when it answers, so all of it is online."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    f = _functions(model, objective)
    task = AttributionTask(loss_func=f["train_loss"], target_func=f["test_loss"], model=model, checkpoints=states)
    device = str(train[0].device)
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.tensor(weights),
        normalized_grad=False,  # TracIn itself (True would be TracIn-CosIn)
        projector_kwargs={"device": device},  # dattri's default projection (512 dimensions)
        device=device,
    )
    with phases("online"):
        return attributor.attribute(_loader(*train, 256), _loader(*test, 256)).cpu().numpy()


def influence(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    objective: str,
    phases: Phases,
    damping: float = 0.0,
) -> np.ndarray:
    """Influence functions at θ_T with the inverse Hessian of the training loss restricted to its top 100
    eigendirections, found by 100 Arnoldi iterations (dattri's IFAttributorArnoldi at its defaults; Schioppa et
    al. 2022); `damping` x identity is added to the Hessian, 0 by default as in dattri.

    The variant that fits a CPU: the Hessian is never formed, the offline phase is 100 Hessian-vector products
    over the training set, and a query is a projection. dattri's conjugate-gradient variant re-solves for every
    test sample: 10 iterations over the whole training set each, 45 minutes for digits' 450 test samples here."""
    from dattri.algorithm import IFAttributorArnoldi
    from dattri.task import AttributionTask

    f = _functions(model, objective)
    task = AttributionTask(loss_func=f["train_loss"], target_func=f["test_loss"], model=model, checkpoints=state)
    attributor = IFAttributorArnoldi(task=task, device=str(train[0].device), regularization=damping)
    # the Hessian of the whole training set (one batch); without no_grad every iteration's graph is kept (20 GB)
    with phases("offline"), _positive_arnoldi(), torch.no_grad():
        attributor.cache(_loader(*train, len(train[0])))
    with phases("online"), torch.no_grad():
        return attributor.attribute(_loader(*train, 256), _loader(*test, 256)).cpu().numpy()


@contextmanager
def _positive_arnoldi() -> Iterator[None]:
    """dattri 0.3.0's Arnoldi projector keeps the top eigenvalues by magnitude and warns that it drops the negative
    ones, but keeps them (their 1/sqrt makes every score NaN). For the duration, a projector that drops them, as its
    warning says, and finds its eigenspace when it is built (the offline phase), not at the first query."""
    from dattri.func import projection

    class Positive(projection.ArnoldiProjector):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.get_eigenspace()
            keep = self.eigvals > self.tol**2
            self.eigvals, self.eigvecs = self.eigvals[keep], self.eigvecs[keep]

    original, projection.ArnoldiProjector = projection.ArnoldiProjector, Positive
    try:
        yield
    finally:
        projection.ArnoldiProjector = original


def trak(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    objective: str,
    phases: Phases,
) -> np.ndarray:
    """TRAK over the given weights (one model, or an ensemble), dattri's default projection and no regularisation."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    f = _functions(model, objective)
    task = AttributionTask(loss_func=f["trak_output"], target_func=f["test_output"], model=model, checkpoints=states)
    device = str(train[0].device)
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=f["correct_probability"],
        projector_kwargs={"device": device},
        device=device,
    )
    with phases("offline"):
        attributor.cache(_loader(*train, 256))
    with phases("online"), torch.no_grad():
        return attributor.attribute(_loader(*test, 256)).cpu().numpy()


def ekfac(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    objective: str,
    phases: Phases,
) -> np.ndarray:
    """EK-FAC influence at θ_T (Kronfluence's defaults: true Fisher, damping 1e-8); its Conv2d and Linear layers."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    o = OBJECTIVES[objective]

    class ObjectiveTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            z = model(x)
            if sample:  # labels drawn from the model: the true Fisher
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(z, -1), 1).flatten()
            return F.cross_entropy(z, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -o(model(x), y).sum()

    net = copy.deepcopy(model)
    net.load_state_dict(state)
    task = ObjectiveTask()
    net = prepare_model(net.eval(), task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(
            "ddm",
            net,
            task,
            cpu=train[0].device.type == "cpu",
            disable_tqdm=True,
            output_dir=folder,
            log_level=logging.WARNING,
        )
        train_set, test_set = TensorDataset(*train), TensorDataset(*test)
        torch.manual_seed(0)  # the sampled labels of the true Fisher
        with phases("offline"):
            analyzer.fit_all_factors(
                "ekfac", train_set, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac")
            )
        with phases("online"):
            analyzer.compute_pairwise_scores(
                "scores",
                "ekfac",
                query_dataset=test_set,
                train_dataset=train_set,
                per_device_query_batch_size=256,
                per_device_train_batch_size=256,
                score_args=ScoreArguments(),
            )
            return analyzer.load_pairwise_scores("scores")["all_modules"].T.cpu().numpy()  # (N, M)


def ekfac_ensemble(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    objective: str,
    phases: Phases,
) -> np.ndarray:
    """EK-FAC influence (as `ekfac`) at each of the given checkpoints, scores averaged: the reference that DDM's
    checkpoint-averaged Newton removal imitates with the real training data."""
    return np.mean([ekfac(model, s, train, test, objective, phases) for s in states], axis=0)


class Peer:
    """A peer as an attributor: `method` one of PEERS; `models` the last this many checkpoints of the ensembles,
    `damping` the influence function's. Per-sample scores summed over each cluster; the libraries fit per
    objective, so offline and online seconds are the means over the objectives."""

    objectives = GRADIENT_OBJECTIVES

    def __init__(self, method: str, models: int = 5, damping: float = 0.0):
        if method not in PEERS:
            raise ValueError(f"peer {method!r}: allowed {', '.join(PEERS)}")
        self.method, self.models, self.damping = method, models, damping

    def fit(self, task: Task) -> None:
        self.task, self.model = task, task.network()

    def _scores(self, test: tuple[torch.Tensor, torch.Tensor], objective: str, phases: Phases) -> np.ndarray:
        """(N, M) per-sample scores."""
        task, model, train, final = self.task, self.model, self.task.train, self.task.final
        last = [c.state for c in task.checkpoints[-self.models :]]  # the ensembles' (as saved: the libraries move them)
        if self.method == "tracin":
            past = task.checkpoints[:-1]  # θ_t, weighted by the SGD it received
            weights = [c.lr * c.epochs / task.batch_size for c in past]
            return tracin(model, [c.state for c in past], weights, train, test, objective, phases)
        if self.method == "influence":
            return influence(model, final, train, test, objective, phases, self.damping)
        if self.method.startswith("trak"):
            return trak(model, last if self.method == "trak_ensemble" else [final], train, test, objective, phases)
        if self.method == "ekfac":
            return ekfac(model, final, train, test, objective, phases)
        return ekfac_ensemble(model, last, train, test, objective, phases)

    def attribute(self, x: torch.Tensor, y: torch.Tensor, objectives: Sequence[str]) -> Attribution:
        matrices, phases = {}, []
        for o in objectives:
            phases.append(Phases())
            per_sample = self._scores((x, y), o, phases[-1])
            matrices[o] = per_cluster(per_sample, self.task.clusters, self.task.n_clusters)
        offline, online = (float(np.mean([ph.seconds[k] for ph in phases])) for k in ("offline", "online"))
        return Attribution(matrices, offline_seconds=offline, online_seconds=online)
