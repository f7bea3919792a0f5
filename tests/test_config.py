"""Bad parameters fail before any work, naming the key, the value and what is allowed."""

import pytest
import yaml

from ddm_ops.config import Params, ParamsError, load_params, parse_params
from ddm_ops.data import load_dataset
from pipeline.stage import check_params_against_data


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"name": "imagenet-1k"}}, ["data.name", "'imagenet-1k'", "'digits'"]),
        ({"model": {"name": "transformer"}}, ["model.name", "'transformer'", "'convnet'", "'mlp'"]),
        ({"train": {"epochs": 0}}, ["train.epochs", "0", "greater than 0"]),
        ({"train": {"batch_size": -3}}, ["train.batch_size", "-3", "greater than 0"]),
        ({"distill": {"pairing": "fifo"}}, ["distill.pairing", "'fifo'", "'checkpoint'", "'mirrored'", "'lifo'"]),
        ({"distill": {"direction": "sideways"}}, ["distill.direction", "'sideways'", "'reverse'", "'forward'"]),
        ({"execution": {"runner": "slurm"}}, ["execution.runner", "'slurm'", "'serial'", "'thread'", "'process'"]),
        ({"distill": {"ipcc": 3}}, ["unknown key", "distill.ipcc"]),
        ({"base": {"device": "tpu"}}, ["base.device", "'tpu'", "auto, cpu, cuda, cuda:N"]),
        ({"perturb": {"update": "adam"}}, ["perturb.update", "'adam'", "'ekfac'", "'sgd'"]),
        ({"train": {"momentum": 0.9}}, ["train.momentum = 0.9", "allowed: 0", "plain SGD"]),
        ({"train": {"weight_decay": 5e-4}}, ["train.weight_decay = 0.0005", "allowed: 0"]),
        ({"distill": {"checkpoints": "every"}}, ["distill.checkpoints", "'every'", "'all'"]),
        ({"perturb": {"span": 1.5}}, ["perturb.span = 1.5", "less than or equal to 1"]),
        (
            {"distill": {"checkpoints": 1}, "perturb": {"span": 0.2}},
            ["perturb.span = 0.2", "distill.checkpoints of at least 2", "θ_T alone"],
        ),
        (
            {"distill": {"metric": "layerwise", "labels": "solved"}},
            ["distill.labels = 'solved'", "'layerwise'", "labels learned"],
        ),
    ],
)
def test_bad_params_name_key_value_and_allowed(raw, expected):
    with pytest.raises(ParamsError) as err:
        parse_params(raw, "params.yaml")
    for part in expected:
        assert part in str(err.value)


def test_defaults_are_the_shipped_params_file():
    from conftest import ROOT

    assert load_params(ROOT / "params.yaml") == Params()
    # every block and key written out: DVC needs each block a stage declares, and users read the file
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert {block: set(values) for block, values in shipped.items()} == {
        block: set(values) for block, values in Params().model_dump().items()
    }


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: parameters file not found"):
        load_params(tmp_path / "nope.yaml")


def test_k_per_class_larger_than_a_class_is_rejected():
    p = parse_params({"data": {"subset": {"train": 50, "test": 20}}, "cluster": {"k_per_class": 6}})
    ds = load_dataset(p.data)
    with pytest.raises(ParamsError, match=r"cluster.k_per_class = 6: must be at most .* \(5 samples of class"):
        check_params_against_data(p, ds)
