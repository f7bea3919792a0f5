"""Per-cluster distillation gives the same synsets on every task runner (serial, thread, process)."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import TINY, dvc, make_project, write_params


def test_runners_give_identical_synsets(tmp_path):
    folder = make_project(tmp_path / "proj", TINY)
    result = dvc(folder, "repro", "distill")
    assert result.returncode == 0, result.stdout + result.stderr
    reference = torch.load(folder / "outputs/distill/synset.pt", weights_only=True)
    for runner in ("thread", "process"):
        write_params(folder, {**TINY, "execution": {"runner": runner, "workers": 2}})
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "distill"], cwd=folder, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        synset = torch.load(folder / "outputs/distill/synset.pt", weights_only=True)
        assert torch.equal(synset["images"], reference["images"]), runner
        assert torch.equal(synset["labels"], reference["labels"]), runner
