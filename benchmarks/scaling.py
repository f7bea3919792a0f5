"""How the per-cluster work scales: distill + perturb wall time by runner and workers, by K, by training-set size.

Runs the default digits params in a fresh project (git + DVC) under a temporary folder, stage by stage, and
writes benchmarks/results/scaling.json. Target: the distill stage with 2 workers at least 1.6x faster than
with 1 on the 2-core machine.

    python benchmarks/scaling.py        # ~15 minutes on 2 cores
"""

from __future__ import annotations

import json
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
K_PER_CLASS = [1, 2, 5, 10]  # K = 10, 20, 50, 100 on the 10 digit classes
TRAIN_SIZES = [337, 674, 1347]


def project(folder: Path) -> None:
    for name in ("ddm_ops", "stages", "pipeline"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)


def set_params(folder: Path, **blocks: dict) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
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
        "cluster_seconds_mean": d["cluster_seconds_mean"],
        "perturb_online_seconds": p["online_seconds"],
        "perturb_stage_seconds": p["stage_seconds"],
        "n_clusters": p["n_removals"],
    }


def main() -> None:
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        project(folder)
        set_params(folder)
        stages(folder, "train_target", "record_trajectory", "cluster", "ground_truth")
        result["by_runner"] = {}
        for runner, workers in RUNNERS:
            set_params(folder, execution={"runner": runner, "workers": workers})
            result["by_runner"][f"{runner}_{workers}"] = r = row(stages(folder, "distill", "perturb"))
            print(runner, workers, r, flush=True)
        for runner in ("process", "dask"):
            one, two = result["by_runner"][f"{runner}_1"], result["by_runner"][f"{runner}_2"]
            result[f"{runner}_speedup_2_workers"] = one["distill_seconds"] / two["distill_seconds"]
        result["by_k"] = {}
        for k in K_PER_CLASS:
            set_params(folder, cluster={"k_per_class": k}, execution={"runner": "dask", "workers": 2})
            result["by_k"][str(10 * k)] = r = row(stages(folder, "cluster", "distill", "perturb"))
            print("K", 10 * k, r, flush=True)
        result["by_train_size"] = {}
        for n in TRAIN_SIZES:
            set_params(
                folder,
                data={"subset": {"train": n, "test": None, "seed": 0}},
                execution={"runner": "dask", "workers": 2},
            )
            measured = stages(
                folder, "train_target", "record_trajectory", "cluster", "ground_truth", "distill", "perturb"
            )
            result["by_train_size"][str(n)] = r = {
                **row(measured),
                "train_seconds": measured["train_target"]["train_seconds"],
            }
            print("N", n, r, flush=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
