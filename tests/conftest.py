"""Shared test set-up: offline tools, a tiny params file, one Prefect test server per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import PACKAGES

os.environ.update(
    {
        "DO_NOT_TRACK": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TQDM_DISABLE": "1",
    }
)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "base": {"seed": 0, "device": "cpu"},
    "data": {"name": "digits", "subset": {"train": 200, "test": 60, "seed": 0}},
    "model": {"name": "convnet", "width": 8, "depth": 2},
    "train": {"epochs": 4, "batch_size": 32, "lr": 0.2, "checkpoint_every": 1},
    "cluster": {"k_per_class": 2},
    "distill": {"ipc": 1, "iterations": 5},
    "execution": {"runner": "serial", "items_per_task": 1},
    "perturb": {"step_size": 0.02},
    "report": {"n_examples": 2},
}


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One temporary Prefect server for the whole session, for this process and, through PREFECT_API_URL, for every
    stage a test runs with dvc: each would otherwise start its own (~15 s, measured). test_interrupt takes the
    variable away: it checks Ctrl-C with the stage's own temporary server, the user's default."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        before = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield
        if before is None:
            del os.environ["PREFECT_API_URL"]
        else:
            os.environ["PREFECT_API_URL"] = before


def make_project(folder: Path, params: dict) -> Path:
    """A git + DVC project in `folder` with this repository's code, dvc.yaml and the given params.yaml."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    write_params(folder, params)
    shutil.copy(ROOT / ".gitignore", folder / ".gitignore")  # outputs: only metrics and plot files are tracked
    run = lambda *cmd: subprocess.run(cmd, cwd=folder, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "project")
    return folder


def write_params(folder: Path, params: dict) -> None:
    """params.yaml with every block present (DVC requires each declared block), `params` over the defaults."""
    from ddm_ops.config import parse_params

    full = json.loads(parse_params({}).model_dump_json())
    for block, values in params.items():
        full[block] = {**full[block], **values} if isinstance(values, dict) else values
    (folder / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))


def dvc(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run dvc in `folder` with this interpreter's environment first on PATH (stages call `python`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=folder, capture_output=True, text=True, env=env)


def reproduced(folder: Path, params: dict, *targets: str) -> Path:
    """A project made by make_project after a successful `dvc repro` (of `targets`, or of everything)."""
    make_project(folder, params)
    result = dvc(folder, "repro", *targets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


SLOWEST_FIRST = [
    "test_quality",
    "test_runners",
    "test_pipeline",
    "test_audit",
    "test_interrupt",
    "test_architectures",
    "test_flow",
]


def pytest_collection_modifyitems(config, items):
    """The slowest modules first (so that two xdist workers finish together); GPU tests only where CUDA is."""
    import torch

    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def chromium(*flags: str):
    """Headless Chromium driven by Debian's chromedriver (.ci/run installs both; skips the test without them)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        if os.environ.get("DDM_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        *flags,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)
