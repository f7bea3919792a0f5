"""`python -m pipeline ui`: the MLflow UI and the Prefect server answer on loopback and stop cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from conftest import TINY, write_params


def _outside_addresses() -> list[str]:
    """This machine's IPv4 addresses that are not loopback (where a server bound to 0.0.0.0 would also answer)."""
    return [
        a.address
        for addresses in psutil.net_if_addrs().values()
        for a in addresses
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_starts_both_servers_and_stops_them(tmp_path):
    write_params(tmp_path, TINY)
    ports = {"mlflow": _free_port(), "prefect": _free_port()}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "ui",
            "--mlflow-port",
            str(ports["mlflow"]),
            "--prefect-port",
            str(ports["prefect"]),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 180
    while len(lines) < 3 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
    try:
        mlflow_page = f"MLflow: http://127.0.0.1:{ports['mlflow']}/#/experiments?workflowType=machine_learning"
        assert mlflow_page in lines, (
            lines,
            proc.stderr.read() if proc.poll() else "",
        )
        assert f"Prefect: http://127.0.0.1:{ports['prefect']}" in lines
        for url in (f"http://127.0.0.1:{ports['mlflow']}/health", f"http://127.0.0.1:{ports['prefect']}/api/health"):
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
        outside = _outside_addresses()
        if not outside:
            pytest.fail("no non-loopback IPv4 address here to check that the servers do not listen on it")
        for address in outside:
            for port in ports.values():
                with socket.socket() as s:
                    s.settimeout(5)
                    assert s.connect_ex((address, port)) != 0, f"{address}:{port} answers: not loopback only"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped MLflow and Prefect" in out
    for port in ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
