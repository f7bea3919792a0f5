"""Ctrl-C in the middle of a fan-out, as a terminal sends it (SIGINT to dvc's whole process group): the stage ends
within seconds on every runner, prints one line, keeps no output and exits non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY, dvc, make_project, write_params

SLOW = {**TINY, "distill": {"ipc": 1, "iterations": 400}}  # ~2 s a cluster, 20 clusters: interrupted long before


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_project(tmp_path_factory.mktemp("interrupt"), SLOW)
    done = dvc(folder, "repro", "cluster")  # everything before the fan-out
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


@pytest.mark.parametrize("runner", ["serial", "thread", "process", "dask"])
def test_ctrl_c_ends_a_fan_out_within_seconds(project, runner):
    write_params(project, {**SLOW, "execution": {"runner": runner, "workers": 2, "items_per_task": 1}})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL")  # the stage starts its own temporary server, as it does for a user (conftest)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "distill"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("distill: " in line and " clusters done" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.2)  # until the fan-out is under way: Prefect's server up, the first clusters distilled
    assert proc.poll() is None, "".join(lines)[-3000:]
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=60)
    seconds = time.monotonic() - sent
    reader.join(timeout=5)
    text = "".join(lines)
    assert proc.returncode != 0 and seconds < 10, (seconds, text[-3000:])
    assert text.count("distill: interrupted") == 1 and "Traceback" not in text, text[-3000:]
    out = project / "outputs"
    assert not (out / "distill").exists() and not (out / ".distill.staging").exists()
