"""The attributor interface as a library: docs/usage.md's example run as written on a user's own model and data (no
DVC, no pipeline), its scores held to retraining; every method in the registry through the same interface."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ddm_ops.attribution import distances
from ddm_ops.attributors import Calibration, Task, run
from ddm_ops.config import BASELINES, CALIBRATED, Params
from ddm_ops.curvature import curvature_factors
from ddm_ops.ddm import DDM
from ddm_ops.methods import ALWAYS, METHODS
from ddm_ops.objectives import margin
from ddm_ops.train import predict, train
from ddm_ops.trajectory import Trajectory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example() -> dict:
    """The namespace docs/usage.md's "DDM as a library" example leaves behind (about 20 s)."""
    text = (ROOT / "docs" / "usage.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## DDM as a library") :], re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/usage.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def retrained(example) -> torch.Tensor:
    """(K, M, C) test logits of the example's model retrained without each group (same θ_0 and batch order)."""
    ns = example
    logits = []
    for k in range(ns["task"].n_clusters):
        net = copy.deepcopy(ns["model"])
        net.load_state_dict(ns["checkpoints"][0].state)
        train(net, ns["x_train"], ns["y_train"], ns["sgd"], seed=0, keep=torch.from_numpy(ns["clusters"] != k))
        logits.append(predict(net, ns["x_test"]))
    return torch.stack(logits)


def correlation(example: dict, retrained: torch.Tensor, scores: np.ndarray) -> float:
    """Pearson over every (group, test image) of the predicted and the true drop of the margin."""
    y = example["y_test"]
    base = margin(predict(example["model"], example["x_test"]), y)
    truth = base[None] - margin(retrained, y.expand(len(retrained), -1))
    return float(np.corrcoef(scores.ravel(), truth.numpy().ravel())[0, 1])


def test_the_docs_example_attributes_like_retraining(example, retrained):
    """Measured (the defaults: whitened matching at every checkpoint, kernel lengths; 50 iterations): Pearson 0.821
    with the true margin drops (lengths curvature 0.807, layer-wise matching 0.377; first-order 0.68, EK-FAC 0.69,
    class indicator 0.61 on this MLP); the removed models' mean Dist1 to the retrained ones 3.24 against θ_T's 3.39."""
    answer, scores, x = example["answer"], example["scores"], example["x_test"]
    assert scores.shape == (30, 597) and answer.logits.shape == (30, 597, 10)
    torch.testing.assert_close(answer.base, predict(example["model"], x), atol=1e-4, rtol=1e-4)
    assert answer.offline_seconds > 0 and answer.online_seconds > 0 and answer.step_size == 0.02
    assert correlation(example, retrained, scores) > 0.7
    dist1 = lambda a, b: float(torch.stack([distances(t, o[None])["dist1"].mean() for t, o in zip(a, b)]).mean())  # noqa: E731
    assert dist1(retrained, answer.logits) < 0.99 * dist1(retrained, answer.base.expand_as(retrained))


def test_the_registry_is_the_configs_list():
    assert set(METHODS) == {"ddm", *ALWAYS, *BASELINES}
    assert {name for name, m in METHODS.items() if m.calibrated} == set(CALIBRATED)
    params = Params()
    for name, method in METHODS.items():
        built = method.build(params)
        assert (
            callable(built.fit)
            and callable(built.attribute)
            and set(built.objectives) <= {"margin", "loss", "probability"}
        ), name


@pytest.mark.parametrize("name", ["class_indicator", "input_similarity", "first_order", "gradient_ascent"])
def test_every_kind_of_method_answers_through_the_interface(example, retrained, name):
    """On the example's task, with three groups' retrainings for the step that gradient ascent fits. Measured
    Pearson: class indicator 0.61, input similarity 0.65, first-order 0.68, gradient ascent 0.53."""
    task, x, y = example["task"], example["x_test"], example["y_test"]
    rows = np.array([0, 10, 20])
    calibrated = Task(**{**task.__dict__, "calibration": Calibration(rows, x, retrained[rows])})
    answer = run(METHODS[name].build(Params()), calibrated, x, y, ["margin", "loss", "probability"])
    assert set(answer.scores) == set(METHODS[name].build(Params()).objectives)
    assert all(s.shape == (30, 597) and np.isfinite(s).all() for s in answer.scores.values())
    assert (answer.logits is not None) == (name == "gradient_ascent")
    assert answer.online_seconds > 0 and np.isfinite(answer.peak_memory_mb)
    assert correlation(example, retrained, answer.scores["margin"]) > 0.45


def test_combined_steps_remove_from_theta_t_with_one_model_per_group(example, retrained):
    """perturb.combine steps: one removed model per group, θ_T moved by the mean of the checkpoints' Newton steps.
    At θ_T alone it is the per-checkpoint removal exactly; over the example's 6 checkpoints it still follows
    retraining, less closely (measured Pearson 0.611 at the default step, against 0.821 for combine outputs)."""
    ddm, x, y = example["ddm"], example["x_test"], example["y_test"]

    def variant(combine: str, points: slice = slice(None)):
        v = copy.copy(ddm)
        v.perturb, v.points = ddm.perturb.model_copy(update={"combine": combine}), ddm.points[points]
        return v.attribute(x, y, ["margin"])

    last = slice(-1, None)  # θ_T: the last checkpoint the removal uses
    torch.testing.assert_close(variant("steps", last).logits, variant("outputs", last).logits, atol=1e-5, rtol=0)
    steps = variant("steps")
    assert correlation(example, retrained, steps.scores["margin"]) > 0.55
    assert not torch.allclose(steps.logits, example["answer"].logits, atol=1e-3)  # a different removal


def test_the_removal_can_use_the_first_fifth_of_training_alone(example, retrained):
    """perturb.span 0.2: the same synsets, removed at θ_0 and θ_1 only (the first fifth of θ_0 … θ_5). Measured
    Pearson 0.771 with the true margin drops (0.821 at all six, the default)."""
    ddm = example["ddm"]
    early = DDM(ddm.distill, ddm.perturb.model_copy(update={"span": 0.2}), distiller=lambda *_: ddm.synset)
    early.fit(example["task"])
    starts = [point[0]["1.weight"] for point in early.points]
    assert len(starts) == 2 and all(torch.equal(w, c.state["1.weight"]) for w, c in zip(starts, example["checkpoints"]))
    answer = early.attribute(example["x_test"], example["y_test"], ["margin"])
    assert correlation(example, retrained, answer.scores["margin"]) > 0.65


def test_kernel_lengths_rescale_each_groups_fisher_step(example, retrained):
    """perturb.lengths kernel (the default): each group's Fisher Newton step times c_k, the margin changes on training
    images of TRAK's kernel's removal over the Fisher's. With the Fisher itself as the kernel every c_k is 1 and the
    removal is lengths curvature's; with TRAK's kernel c_k spreads (measured quartiles 0.85 / 1 / 1.18 here) and
    Pearson with the true margin drops rises from 0.807 (lengths curvature) to 0.821."""
    ddm, task, x, y = example["ddm"], example["task"], example["x_test"], example["y_test"]
    q1, q3 = ddm.lengths.quantile(torch.tensor([0.25, 0.75]))
    assert q3 - q1 > 0.2 and float(ddm.lengths.median()) == 1.0
    plain = DDM(ddm.distill, ddm.perturb.model_copy(update={"lengths": "curvature"}), distiller=lambda *_: ddm.synset)
    plain.fit(task)
    fisher = plain.attribute(x, y, ["margin"])
    assert plain.lengths is None
    trajectory = Trajectory.from_checkpoints(ddm.model, task.checkpoints, task.batch_size)
    factors = curvature_factors(ddm.model, trajectory, task.train, ddm.distill.checkpoints, task.seed)[1]
    same = DDM(ddm.distill, ddm.perturb, distiller=lambda *_: ddm.synset, kernel=factors)
    same.fit(task)
    torch.testing.assert_close(same.lengths, torch.ones(30))
    torch.testing.assert_close(same.attribute(x, y, ["margin"]).logits, fisher.logits, atol=1e-5, rtol=0)
    gain = correlation(example, retrained, example["scores"]) - correlation(example, retrained, fisher.scores["margin"])
    assert gain > 0.005
