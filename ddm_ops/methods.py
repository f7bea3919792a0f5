"""Every attribution method by name: how it is built from the run's params, what it is, and what it needs (read by the
baselines stage, the report and the config checks). A new method is one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ddm_ops.attributors import Attributor
from ddm_ops.baselines import ClassIndicator, FirstOrder, GradientAscent, InputSimilarity
from ddm_ops.config import Params, ParamsError
from ddm_ops.ddm import DDM, PAPER
from ddm_ops.peers import Peer

INSTALL = "pip install -c constraints.txt -e '.[peers]'"


@dataclass(frozen=True)
class Method:
    build: Callable[[Params], Attributor]
    description: str
    calibrated: bool = False  # fits its removal step on the ground truth's calibration clusters
    requires: str | None = None  # the peer library it runs through


def _ddm_variant(distill: dict, update: str) -> Callable[[Params], DDM]:
    """The run's DDM with `distill` overrides, removed by `update`, its step calibrated."""
    return lambda p: DDM(
        p.distill.model_copy(update=distill), p.perturb.model_copy(update={"update": update, "step_size": "auto"})
    )


def _peer(method: str) -> Callable[[Params], Peer]:
    models = {"trak_ensemble": "trak_models", "ekfac_ensemble": "ekfac_models"}.get(method)
    return lambda p: Peer(method, getattr(p.baselines, models) if models else 1, damping=p.baselines.influence_damping)


METHODS: dict[str, Method] = {
    "ddm": Method(
        lambda p: DDM(p.distill, p.perturb),
        "the run's DDM: synsets (distill), removed as perturb says (default: EK-FAC Newton steps at every checkpoint)",
    ),
    "class_indicator": Method(lambda p: ClassIndicator(), "1 for the clusters of the test sample's class"),
    "input_similarity": Method(
        lambda p: InputSimilarity(), "mean cosine similarity of the members to the test image, within its class"
    ),
    "ddm_paper": Method(
        _ddm_variant({**PAPER, "direction": "reverse"}, "sgd"),
        "the paper's DDM: reverse matching along the whole trajectory (mirrored), n_u SGD steps from θ_T",
        calibrated=True,
    ),
    "first_order": Method(lambda p: FirstOrder(), "first-order trajectory estimate (TracIn summed over a cluster)"),
    "gradient_ascent": Method(
        lambda p: GradientAscent(p.baselines.gradient_ascent_steps),
        "ascent on the real cluster's loss from θ_T",
        calibrated=True,
    ),
    "forward_matching": Method(
        _ddm_variant({**PAPER, "direction": "forward"}, "sgd"),
        "classic gradient matching along the trajectory, removed by ascent from θ_T (DDM's predecessor)",
        calibrated=True,
    ),
    "tracin": Method(_peer("tracin"), "dattri's TracIn over the checkpoints", requires="dattri"),
    "influence": Method(_peer("influence"), "dattri's influence function (Arnoldi) at θ_T", requires="dattri"),
    "trak": Method(_peer("trak"), "dattri's TRAK, one model", requires="dattri"),
    "trak_ensemble": Method(
        _peer("trak_ensemble"), "dattri's TRAK over the last checkpoints (baselines.trak_models)", requires="dattri"
    ),
    "ekfac": Method(_peer("ekfac"), "Kronfluence's EK-FAC influence at θ_T", requires="kronfluence"),
    "ekfac_ensemble": Method(
        _peer("ekfac_ensemble"),
        "Kronfluence's EK-FAC at the last checkpoints (baselines.ekfac_models), averaged",
        requires="kronfluence",
    ),
}
ALWAYS = ("class_indicator", "input_similarity")  # computed whenever the baselines are


def check_installed(names: list[str]) -> None:
    """Raise ParamsError before any work when a requested method's library is missing."""
    for name in names:
        module = METHODS[name].requires
        if module is None:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ParamsError(f"baselines.methods lists {name!r}, which needs {module}: {INSTALL}") from None
