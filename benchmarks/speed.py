"""Speed of the default pipeline on digits: `dvc repro` wall time, and the online part against one training.

Runs the default params in a fresh copy of the project (git + DVC), then, in one process, trains the target for
several lengths and times the online part (removal of every cluster by its synset + test-set outputs +
attribution) next to it. Writes benchmarks/results/speed.json.

    python benchmarks/speed.py            # ~5 minutes on 2 cores
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

from ddm_ops.attribution import distances, scores  # noqa: E402
from ddm_ops.config import load_params  # noqa: E402
from ddm_ops.data import load_dataset  # noqa: E402
from ddm_ops.functional import split_state  # noqa: E402
from ddm_ops.models import build_model  # noqa: E402
from ddm_ops.train import train  # noqa: E402
from ddm_ops.unlearn import unlearn  # noqa: E402
from pipeline import PACKAGES  # noqa: E402

EPOCHS = (30, 100, 200)


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


def _median_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def online_vs_training(folder: Path) -> list[dict]:
    """Train the target for several lengths; time the online part for all clusters with the run's synsets.

    Both sides run warm in this one process: the online part is the median of 3 repeats of removal of every
    cluster + test-set logits of every removed model + scores and distances.
    """
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params(folder / "params.yaml")
    ds = load_dataset(params.data)
    synset = torch.load(folder / "outputs/distill/synset.pt", weights_only=True)
    images, labels = synset["images"], synset["labels"]
    n_u, step = params.perturb.n_u, params.perturb.step_size
    warm = build_model(params.model, ds.image_shape, ds.num_classes, params.base.seed)
    train(warm, ds.x_train, ds.y_train, params.train.model_copy(update={"epochs": 1}), params.base.seed)
    rows = []
    for epochs in EPOCHS:
        model = build_model(params.model, ds.image_shape, ds.num_classes, params.base.seed)
        start = time.perf_counter()
        train(model, ds.x_train, ds.y_train, params.train.model_copy(update={"epochs": epochs}), params.base.seed)
        train_seconds = time.perf_counter() - start
        model.eval()
        theta, buffers = split_state(model, model.state_dict())
        unlearn(model, theta, buffers, images[:1], labels[:1], 1, step)  # warm-up

        def online_part(model=model, theta=theta, buffers=buffers) -> None:
            removed = unlearn(model, theta, buffers, images, labels, n_u, step)
            with torch.no_grad():
                base = torch.func.functional_call(model, (theta, buffers), (ds.x_test,))
                out = torch.stack(
                    [
                        torch.func.functional_call(
                            model, ({k: v[i] for k, v in removed.items()}, buffers), (ds.x_test,)
                        )
                        for i in range(len(images))
                    ]
                )
                scores(base, out, ds.y_test)
                distances(base, out)

        online = _median_seconds(online_part)
        removal = _median_seconds(lambda m=model, t=theta, b=buffers: unlearn(m, t, b, images, labels, n_u, step))
        rows.append(
            {
                "epochs": epochs,
                "train_seconds": train_seconds,
                "online_seconds": online,
                "removal_only_seconds": removal,
                "online_fraction_of_training": online / train_seconds,
                "removal_fraction_of_training": removal / train_seconds,
                "n_clusters": len(images),
                "n_test": len(ds.x_test),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fresh_project(folder)
        run = pipeline_run(folder)
        print(json.dumps(run, indent=1), flush=True)
        runners = distill_by_runner(folder)
        sweep = online_vs_training(folder)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "default_run": run,
        "distill_by_runner": runners,
        "online_vs_training_length": sweep,
    }
    out = ROOT / "benchmarks" / "results" / "speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
