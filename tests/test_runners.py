"""Fan-out on every runner: identical results, retries, and a clear failure that leaves no output behind."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, dvc, make_project, reproduced, write_params

from ddm_ops.config import ExecutionParams
from pipeline.runners import fan_out


def _run(folder: Path, stage: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", stage], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return reproduced(tmp_path_factory.mktemp("runners"), TINY, "attribute")


def _same_results_on(folder: Path, runner: str) -> None:
    synset = (folder / "outputs/distill/synset.pt").read_bytes()
    reference = torch.load(folder / "outputs/distill/synset.pt", weights_only=True)
    attribution = (folder / "outputs/attribute/attribution.parquet").read_bytes()
    write_params(folder, {**TINY, "execution": {"runner": runner, "workers": 2}})
    for stage in ("distill", "perturb", "attribute"):
        _run(folder, stage)
    again = torch.load(folder / "outputs/distill/synset.pt", weights_only=True)
    for part in ("images", "labels", "cluster_ids", "init_index"):
        assert torch.equal(again[part], reference[part]), (runner, part)
    assert (folder / "outputs/distill/synset.pt").read_bytes() == synset, runner
    assert (folder / "outputs/attribute/attribution.parquet").read_bytes() == attribution, runner


@pytest.mark.parametrize("runner", ["process", "dask"])
def test_runners_give_byte_identical_synsets_and_attribution(project, runner):
    _same_results_on(project, runner)


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("prefect_ray") is None, reason="the ray extra is not installed")
def test_ray_gives_byte_identical_results(project):
    _same_results_on(project, "ray")


def flaky(marker: str, cluster_id: int) -> int:
    """Fails the first time it runs for a cluster (state in a file, so it survives process boundaries)."""
    path = Path(marker) / f"{cluster_id}"
    if not path.exists():
        path.write_text("failed once")
        raise OSError(f"transient failure of cluster {cluster_id}")
    return cluster_id * 10


async def _artifacts(key):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )


def test_a_task_that_fails_once_is_retried(tmp_path):
    items = [{"marker": str(tmp_path), "cluster_id": c} for c in range(3)]
    out = fan_out(flaky, items, "cluster_id", "flaky", ExecutionParams(runner="thread", retries=1))
    assert out == [0, 10, 20] and sorted(p.name for p in tmp_path.iterdir()) == ["0", "1", "2"]
    progress = asyncio.run(_artifacts("flaky-progress"))  # the Prefect UI's progress bar of the fan-out
    assert progress[0].type == "progress" and progress[0].data == 100.0
    assert progress[0].description == "flaky: 3 of 3 clusters done"
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(RuntimeError, match=r"flaky: cluster_id (\d) failed: OSError: transient failure of cluster \1$"):
        fan_out(flaky, items, "cluster_id", "flaky", ExecutionParams(runner="thread", retries=0))


def test_a_task_that_always_fails_fails_the_stage_naming_the_cluster(tmp_path):
    folder = make_project(tmp_path / "diverges", {**TINY, "distill": {"ipc": 1, "iterations": 5, "lr": 1e30}})
    result = dvc(folder, "repro", "distill")
    assert result.returncode != 0
    pattern = r"distill: cluster_id \d+ failed: DivergenceError: distill cluster \d+: matching loss is"
    assert re.search(pattern, result.stdout + result.stderr)
    assert not (folder / "outputs/distill").exists() and not list((folder / "outputs").glob(".distill*"))
    assert (folder / "outputs/cluster/assignments.parquet").is_file()  # earlier stages stay valid


def test_a_removal_that_overflows_stops_perturb_naming_the_cluster(tmp_path):
    folder = make_project(tmp_path / "overflows", {**TINY, "perturb": {"step_size": 1e30}})
    result = dvc(folder, "repro", "perturb")
    assert result.returncode != 0
    pattern = r"perturb: the model with cluster \d+ removed has non-finite test outputs .*step_size 1e\+30"
    assert re.search(pattern, result.stdout + result.stderr), result.stderr[-2000:]
    assert "raise perturb.damping" in result.stderr
    assert not (folder / "outputs/perturb").exists() and (folder / "outputs/distill/synset.pt").is_file()
