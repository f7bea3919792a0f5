"""`python -m pipeline ui` (`make ui`): the MLflow UI and the Prefect server on loopback, their addresses printed
once both answer, and both stopped cleanly on Ctrl-C (or SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ddm_ops.config import load_params
from pipeline.tracking import tracking_uri

START_TIMEOUT = 120  # seconds for both servers to answer (Prefect's migrations take a while on first start)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _experiment_path(store: str, name: str) -> str:
    """`/<id>` of the project's experiment, so the printed address opens its runs; empty before the first run."""
    import mlflow

    found = mlflow.MlflowClient(store).get_experiment_by_name(name)
    return f"/{found.experiment_id}" if found else ""


def serve_uis(root: Path, host: str = "127.0.0.1", mlflow_port: int = 5000, prefect_port: int = 4200) -> int:
    """Run both servers until interrupted; return 0 when stopped by a signal, 1 when a server failed."""
    params = load_params(root / "params.yaml")
    store = tracking_uri(params, root)
    servers = {
        "MLflow": (
            [
                sys.executable,
                "-m",
                "mlflow",
                "ui",
                "--host",
                host,
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                store,
            ],
            f"http://{host}:{mlflow_port}/#/experiments{_experiment_path(store, params.report.experiment)}"
            "?workflowType=machine_learning",  # MLflow 3 opens on its GenAI views otherwise
            f"http://{host}:{mlflow_port}/health",
        ),
        "Prefect": (
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(prefect_port)],
            f"http://{host}:{prefect_port}",
            f"http://{host}:{prefect_port}/api/health",
        ),
    }
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    logs = root / "outputs" / "ui"
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for name, (cmd, _, _) in servers.items():
        log = (logs / f"{name.lower()}.log").open("w")
        processes.append(
            subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = dict(servers)
        while waiting and not stopping:
            for name in [n for n, (_, _, health) in waiting.items() if _answers(health)]:
                print(f"{name}: {waiting.pop(name)[1]}", flush=True)
            if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                print(f"error: {', '.join(waiting) or 'a server'} did not start; see {logs}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        if not stopping:
            print(
                f"Prefect API for flows: PREFECT_API_URL=http://{host}:{prefect_port}/api   (Ctrl-C stops both)",
                flush=True,
            )
        while not stopping:
            if any(p.poll() is not None for p in processes):
                print(f"error: a server stopped; see {logs}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        _stop(processes)
        print("stopped MLflow and Prefect", flush=True)
