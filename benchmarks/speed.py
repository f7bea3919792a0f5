"""Speed of the default pipeline on digits: `dvc repro` wall time, distill by runner, and the online part against
one training.

Runs the default params in a fresh copy of the project (git + DVC); then, in one process and on that project's
outputs, times the pipeline's own functions side by side: the target's training, the removal of every cluster by
its synset with the removed models' test outputs, and the attribution. Writes benchmarks/results/speed.json.

    python benchmarks/speed.py            # ~10 minutes on 2 cores
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddm_ops.config import load_params  # noqa: E402
from ddm_ops.ddm import DDM  # noqa: E402
from pipeline import PACKAGES  # noqa: E402
from stages import attribute, train_target  # noqa: E402
from stages.artifacts import Paths, load_tensors  # noqa: E402
from stages.common import dataset  # noqa: E402
from stages.task import load_factors, run_task  # noqa: E402


def fresh_project(folder: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, folder / name)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=folder, check=True)


def pipeline_run(folder: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=folder, check=True, env=env)
    wall = time.perf_counter() - start
    stages = {}
    for metrics in sorted((folder / "outputs").glob("*/metrics.json")):
        stages[metrics.parent.name] = json.loads(metrics.read_text())
    return {
        "dvc_repro_seconds": wall,
        "stage_seconds": {s: m["stage_seconds"] for s, m in stages.items()},
        "summary": stages["report"],
    }


def distill_by_runner(folder: Path) -> dict:
    """Wall time of the distill stage on each runner (same synsets: the runner is not a dependency)."""
    import yaml

    original = (folder / "params.yaml").read_text()
    times = {}
    for runner, workers in (("serial", 1), ("thread", 2), ("process", 2)):
        params = yaml.safe_load(original)
        params["execution"].update(runner=runner, workers=workers)
        (folder / "params.yaml").write_text(yaml.safe_dump(params))
        subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "distill"], cwd=folder, check=True, capture_output=True
        )
        metrics = json.loads((folder / "outputs/distill/metrics.json").read_text())
        times[f"{runner}_{workers}"] = {
            "distill_seconds": metrics["distill_seconds"],
            "stage_seconds": metrics["stage_seconds"],
        }
        print(runner, workers, times[f"{runner}_{workers}"], flush=True)
    (folder / "params.yaml").write_text(original)
    return times


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def online_vs_training(folder: Path, repeats: int = 3) -> dict:
    """The pipeline's own functions side by side, warm, in this one process (median of `repeats` each): the target's
    training (`stages.train_target.run`), the removal of every cluster with its removed model's test logits
    (`DDM.attribute` fitted as the perturb stage fits it, which times its own online part after a warm-up) and
    the scores and distances (`stages.attribute.run`). Each runs with the threads the pipeline gives it."""
    params = load_params(folder / "params.yaml")
    paths = Paths(folder)
    synset = load_tensors(paths.stage("distill") / "synset.pt")
    step = json.loads((paths.stage("perturb") / "metrics.json").read_text())["step_size"]
    perturb = params.perturb.model_copy(update={"step_size": step})
    kernel = load_factors(paths, "kernel")
    ddm = DDM(
        params.distill,
        perturb,
        distiller=lambda task, distill, curvature: synset,
        factors=load_factors(paths),
        kernel=kernel and kernel[1],
    )
    ddm.fit(run_task(params, paths, calibrate=False))
    ds = dataset(params)
    x, y = ds.x_test.to(ddm.images.device), ds.y_test.to(ddm.images.device)
    threads = torch.get_num_threads()
    trainings, removals, online, scoring = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            out = Path(tmp) / f"train_{r}"
            out.mkdir()
            trainings.append(train_target.run(params, paths, out)["train_seconds"])  # pins threads_per_worker
        torch.set_num_threads(threads)  # as the perturb and attribute stages run
        for r in range(repeats):
            removal = ddm.attribute(x, y, [])
            removals.append(removal.details["removal_seconds"])
            online.append(removal.online_seconds)
            out = Path(tmp) / f"attribute_{r}"
            out.mkdir()
            scoring.append(attribute.run(params, paths, out)["attribute_seconds"])
    k = len(synset["cluster_ids"])
    train_s, online_s, removal_s, scoring_s = map(_median, (trainings, online, removals, scoring))
    return {
        "update": params.perturb.update,
        "step_size": step,
        "n_clusters": k,
        "train_seconds": train_s,
        "online_seconds": online_s,
        "removal_seconds": removal_s,
        "attribute_seconds": scoring_s,
        "seconds_per_removal": online_s / k,
        "speedup_per_removal": train_s / (online_s / k),
        "online_fraction_of_training": (online_s + scoring_s) / train_s,
        "removal_fraction_of_training": removal_s / train_s,
        "train_threads": params.execution.threads_per_worker,
        "online_threads": threads,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fresh_project(folder)
        run = pipeline_run(folder)
        print(json.dumps(run, indent=1), flush=True)
        runners = distill_by_runner(folder)
        online = online_vs_training(folder)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "default_run": run,
        "distill_by_runner": runners,
        "online_vs_training": online,
    }
    out = ROOT / "benchmarks" / "results" / "speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
