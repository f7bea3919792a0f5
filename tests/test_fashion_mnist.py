"""The whole pipeline (dvc repro) on a small stratified subset of the real Fashion-MNIST (Debian's package)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from conftest import TINY, reproduced

from ddm_ops.data import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir() and not os.environ.get("DDM_REQUIRE_FASHION_MNIST"),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)

FASHION = {
    **TINY,
    "data": {"name": "fashion-mnist", "subset": {"train": 300, "test": 100, "seed": 0}},
    "model": {"name": "convnet", "width": 8, "depth": 3},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05, "checkpoint_every": 1},
    "distill": {"ipc": 1, "iterations": 5, "checkpoints": 2},
}


def test_pipeline_on_a_fashion_mnist_subset(tmp_path):
    folder = reproduced(tmp_path / "fashion", FASHION)
    out = folder / "outputs"
    assign = pd.read_parquet(out / "cluster/assignments.parquet")
    assert len(assign) == 300 and assign["train_index"].max() < 60000
    assert assign.groupby("label").size().tolist() == [30] * 10  # stratified subset of the real training split
    metrics = json.loads((out / "train_target/metrics.json").read_text())
    assert metrics["n_train"] == 300 and metrics["n_test"] == 100 and metrics["test_accuracy"] > 0.4
    synset = torch.load(out / "distill/synset.pt", weights_only=True)
    assert synset["images"].shape == (20, 1, 1, 28, 28)
    attribution = pd.read_parquet(out / "attribute/attribution.parquet")
    assert attribution["test_index"].max() < 10000 and attribution["score"].abs().sum() > 0
    assert (out / "report/report.md").read_text().startswith("# DDM report: fashion-mnist, convnet, K = 20")
