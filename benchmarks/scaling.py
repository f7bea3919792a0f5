"""How the per-cluster work scales: distill + perturb wall time by runner and workers, by K, by training-set size.

Runs the default digits params in a fresh project under a temporary folder, stage by stage, and writes
benchmarks/results/scaling.json. Target: the distill stage with 2 workers at least 1.6x faster than with 1 on the
2-core machine. Shared machines are noisy, so every runner / worker configuration runs REPEATS times, interleaved,
and the fastest run counts. Next to it, the machine's own ceiling: the very same per-cluster function in 1 and in 2
plain processes (multiprocessing, no Prefect, no DVC), in the same process as the rest.

    python benchmarks/scaling.py        # ~35 minutes on 2 cores
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "scaling.json"
RUNNERS = [("process", 1), ("process", 2), ("dask", 1), ("dask", 2)]
REPEATS = 2
SWEEP_RUNNER = {"runner": "process", "workers": 2}
DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())  # read once: the copy the run started with
K_PER_CLASS = [1, 2, 5, 10]  # K = 10, 20, 50, 100: clusters are drawn within each of the 10 digit classes
TRAIN_SIZES = [337, 674, 1347]


def project(folder: Path) -> None:
    for name in ("ddm_ops", "stages", "pipeline"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)


def set_params(folder: Path, **blocks: dict) -> None:
    params = {block: dict(values) for block, values in DEFAULTS.items()}
    for block, values in blocks.items():
        params[block] = {**params[block], **values}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages(folder: Path, *names: str) -> dict:
    """Run the stages in order; return {stage: metrics} with the wall time of each stage's process."""
    out = {}
    for name in names:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "run", name], cwd=folder, check=True, capture_output=True)
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
    from pipeline.runners import tune_process
    from stages.distill import distill_one

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


def main() -> None:
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "repeats": REPEATS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        project(folder)
        sys.path.insert(0, str(folder))  # this copy of the code, also in the ceiling's processes
        set_params(folder)
        stages(folder, "train_target", "record_trajectory", "cluster", "ground_truth")
        runs: dict[str, list[dict]] = {f"{r}_{w}": [] for r, w in RUNNERS}
        for repeat in range(REPEATS):
            for runner, workers in RUNNERS:
                set_params(folder, execution={"runner": runner, "workers": workers})
                runs[f"{runner}_{workers}"].append(r := row(stages(folder, "distill", "perturb")))
                print(repeat, runner, workers, r, flush=True)
        result["by_runner"] = {
            name: {
                **min(rows, key=lambda r: r["distill_seconds"]),
                "distill_seconds_all": [r["distill_seconds"] for r in rows],
            }
            for name, rows in runs.items()
        }
        for runner in ("process", "dask"):
            one, two = result["by_runner"][f"{runner}_1"], result["by_runner"][f"{runner}_2"]
            result[f"{runner}_speedup_2_workers"] = one["distill_seconds"] / two["distill_seconds"]
        set_params(folder)
        result["machine_ceiling"] = ceiling(folder)
        print("ceiling", result["machine_ceiling"], flush=True)
        result["by_k"] = {}
        for k in K_PER_CLASS:
            set_params(folder, cluster={"k_per_class": k}, execution=SWEEP_RUNNER)
            result["by_k"][str(10 * k)] = r = row(stages(folder, "cluster", "distill", "perturb"))
            print("K", 10 * k, r, flush=True)
        result["by_train_size"] = {}
        for n in TRAIN_SIZES:
            set_params(folder, data={"subset": {"train": n, "test": None, "seed": 0}}, execution=SWEEP_RUNNER)
            measured = stages(
                folder, "train_target", "record_trajectory", "cluster", "ground_truth", "distill", "perturb"
            )
            result["by_train_size"][str(n)] = r = {
                **row(measured),
                "train_seconds": measured["train_target"]["train_seconds"],
            }
            print("N", n, r, flush=True)
    result["sweeps_runner"] = SWEEP_RUNNER
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
