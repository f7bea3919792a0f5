"""How the per-cluster work scales: distill + perturb wall time by runner and workers, by K, by training-set size.

Runs the default digits params in a fresh project under a temporary folder, stage by stage, and writes
benchmarks/results/scaling.json. Target: the distill stage with 2 workers at least 1.6x faster than with 1 on the
2-core machine. Shared machines are noisy, so every runner / worker configuration runs REPEATS times, interleaved,
and the fastest run counts; once with each stage starting a temporary Prefect server of its own, once reporting to
a running `prefect server start` (PREFECT_API_URL, as a team runs it). Next to it, the machine's own ceiling: the
very same per-cluster function in 1 and in 2 plain processes (multiprocessing, no Prefect, no DVC).

    python benchmarks/scaling.py                 # every section, ~50 minutes on 2 cores
    python benchmarks/scaling.py server ceiling  # some of runners, server, ceiling, sweeps (merged into the JSON)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline import PACKAGES

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "scaling.json"
RUNNERS = [("process", 1), ("process", 2), ("dask", 1), ("dask", 2)]
REPEATS = 2
SWEEP_RUNNER = {"runner": "process", "workers": 2}
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())  # read once: the copy the run started with
K_PER_CLASS = [1, 2, 5, 10]  # K = 10, 20, 50, 100: clusters are drawn within each of the 10 digit classes
TRAIN_SIZES = [337, 674, 1347]


def project(folder: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)


def set_params(folder: Path, **blocks: dict) -> None:
    params = {block: dict(values) for block, values in DEFAULTS.items()}
    for block, values in blocks.items():
        params[block] = {**params[block], **values}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages(folder: Path, *names: str, env: dict | None = None) -> dict:
    """Run the stages in order; return {stage: metrics} with the wall time of each stage's process."""
    out = {}
    for name in names:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pipeline", "run", name]
        subprocess.run(cmd, cwd=folder, check=True, capture_output=True, env=env)
        metrics = json.loads((folder / "outputs" / name / "metrics.json").read_text())
        out[name] = {**metrics, "process_seconds": time.perf_counter() - start}
    return out


def row(measured: dict) -> dict:
    d, p = measured["distill"], measured["perturb"]
    return {
        "distill_seconds": d["distill_seconds"],
        "distill_stage_seconds": d["stage_seconds"],
        "distill_process_seconds": d["process_seconds"],
        "cluster_seconds_mean": d["cluster_seconds_mean"],
        "perturb_online_seconds": p["online_seconds"],
        "perturb_stage_seconds": p["stage_seconds"],
        "n_clusters": p["n_removals"],
    }


def _distill_items(folder: Path, work: Path) -> list[dict]:
    from ddm_ops.config import load_params

    params = load_params(folder / "params.yaml")
    k = 10 * params.cluster.k_per_class
    return [{"root": str(folder), "params": params.model_dump(), "cluster_id": c, "work": str(work)} for c in range(k)]


def _one(item: dict) -> float:
    from ddm_ops.devices import tune_process
    from stages.synsets import distill_one

    tune_process(1)
    return distill_one(**item)["seconds"]


def ceiling(folder: Path) -> dict:
    """The distill work of every cluster in 1 and in 2 plain processes: what the machine allows without Prefect."""
    out = {}
    ctx = multiprocessing.get_context("spawn")
    for workers in (1, 2):
        work = folder / f".ceiling-{workers}"
        items = _distill_items(folder, work)
        with ctx.Pool(workers, initializer=sys.path.insert, initargs=(0, str(folder))) as pool:
            pool.map(_one, items[:workers], chunksize=1)  # warm-up: imports, data and trajectory loaded
            shutil.rmtree(work)
            start = time.perf_counter()
            seconds = pool.map(_one, items, chunksize=1)
            out[f"processes_{workers}"] = {
                "wall_seconds": time.perf_counter() - start,
                "cluster_seconds_mean": sum(seconds) / len(seconds),
            }
        shutil.rmtree(work)
    out["speedup_2_processes"] = out["processes_1"]["wall_seconds"] / out["processes_2"]["wall_seconds"]
    return out


def by_runner(folder: Path, env: dict | None = None) -> dict:
    """Distill + perturb on every runner / worker count, REPEATS times interleaved; the fastest run of each."""
    runs: dict[str, list[dict]] = {f"{r}_{w}": [] for r, w in RUNNERS}
    for repeat in range(REPEATS):
        for runner, workers in RUNNERS:
            set_params(folder, execution={"runner": runner, "workers": workers})
            runs[f"{runner}_{workers}"].append(r := row(stages(folder, "distill", "perturb", env=env)))
            print(repeat, runner, workers, r, flush=True)
    out: dict = {
        name: {
            **min(rows, key=lambda r: r["distill_seconds"]),
            "distill_seconds_all": [r["distill_seconds"] for r in rows],
        }
        for name, rows in runs.items()
    }
    for runner in ("process", "dask"):
        out[f"{runner}_speedup_2_workers"] = (
            out[f"{runner}_1"]["distill_seconds"] / out[f"{runner}_2"]["distill_seconds"]
        )
    return out


@contextmanager
def prefect_server(port: int = 4299):
    """A `prefect server start` on loopback for the duration (what a team runs, instead of a temporary one)."""
    home = tempfile.mkdtemp()
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield {**os.environ, "PREFECT_API_URL": url}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def sweeps(folder: Path) -> dict:
    """How distill + perturb grow with the number of clusters K and with the training-set size N."""
    out: dict = {"by_k": {}, "by_train_size": {}, "sweeps_runner": SWEEP_RUNNER}
    for k in K_PER_CLASS:
        set_params(folder, cluster={"k_per_class": k}, execution=SWEEP_RUNNER)
        out["by_k"][str(10 * k)] = r = row(stages(folder, "cluster", "distill", "perturb"))
        print("K", 10 * k, r, flush=True)
    for n in TRAIN_SIZES:
        set_params(folder, data={"subset": {"train": n, "test": None, "seed": 0}}, execution=SWEEP_RUNNER)
        measured = stages(folder, "train_target", "record_trajectory", "cluster", "ground_truth", "distill", "perturb")
        out["by_train_size"][str(n)] = r = {**row(measured), "train_seconds": measured["train_target"]["train_seconds"]}
        print("N", n, r, flush=True)
    return out


SECTIONS = ("runners", "server", "ceiling", "sweeps")


def main(sections: list[str]) -> None:
    result = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result.update(machine={"cpus": os.cpu_count(), "platform": platform.platform()}, repeats=REPEATS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        project(folder)
        sys.path.insert(0, str(folder))  # this copy of the code, also in the ceiling's processes
        set_params(folder)
        stages(folder, "train_target", "record_trajectory", "cluster", "ground_truth")
        if "runners" in sections:  # each stage starts a temporary Prefect server of its own
            result["by_runner"] = by_runner(folder)
        if "server" in sections:  # the stages report to a running Prefect server (PREFECT_API_URL)
            with prefect_server() as env:
                result["by_runner_with_server"] = by_runner(folder, env)
        if "ceiling" in sections:
            set_params(folder)
            result["machine_ceiling"] = ceiling(folder)
            print("ceiling", result["machine_ceiling"], flush=True)
        if "sweeps" in sections:
            result.update(sweeps(folder))
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(SECTIONS)
    if set(chosen) - set(SECTIONS):
        sys.exit(f"sections are {', '.join(SECTIONS)}; got {' '.join(chosen)}")
    main(chosen)
