"""Attribution quality against retraining for every config in benchmarks/configs/ (or those named).

Each config (params overrides on top of params.yaml's defaults) runs as its own git + DVC project under
benchmarks/.work/<config>/ with `dvc repro`; retrainings are shared between configs through one cache
(DDM_CACHE_DIR=benchmarks/.cache), so configs that differ only in distillation retrain nothing new.
Writes benchmarks/results/quality.json: per config, the overrides, every quality metric, speed and timings.

    python benchmarks/quality.py                     # all configs (hours on 2 cores: a Fashion-MNIST one ~1.5 h)
    python benchmarks/quality.py digits_k20          # one config
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline import PACKAGES, docs
from pipeline.docs import ddm_key

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
WORK = ROOT / "benchmarks" / ".work"
RESULTS = ROOT / "benchmarks" / "results"
RESULT = RESULTS / "quality.json"


def params_for(overrides: dict) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for block, values in overrides.items():
        params[block] = {**params[block], **values} if isinstance(values, dict) else values
    return params


def config(name: str) -> dict:
    """The overrides of benchmarks/configs/<name>.yaml."""
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


CACHE = ROOT / "benchmarks" / ".cache"


def run_config(name: str, overrides: dict | None = None, folder: Path | None = None, cache: Path = CACHE) -> dict:
    """`dvc repro` of benchmarks/configs/<name>.yaml (or of `overrides`) in its own project (.work/<name>, or
    `folder`), retrainings kept in `cache`.

    The project is kept between runs with this repository's current code and the params, so DVC reruns only the
    stages whose code or params changed (scripts that read the same config share its outputs).
    """
    overrides = config(name) if overrides is None else overrides
    folder = WORK / name if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    for part in PACKAGES:
        shutil.rmtree(folder / part, ignore_errors=True)
        shutil.copytree(ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", folder / "dvc.yaml")
    (folder / "params.yaml").write_text(yaml.safe_dump(params_for(overrides), sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DDM_CACHE_DIR": str(cache),
    }
    if not (folder / ".dvc").is_dir():
        for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
            subprocess.run(cmd, cwd=folder, check=True, env=env)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=folder, check=True, env=env)
    wall = time.perf_counter() - start
    stages = {p.parent.name: json.loads(p.read_text()) for p in sorted((folder / "outputs").glob("*/metrics.json"))}
    return {"overrides": overrides, "dvc_repro_seconds": wall, "report": stages.pop("report"), "stages": stages}


def by_name(report: dict, prefix: str) -> dict[str, dict[str, float]]:
    """The report's `<prefix>.<name>.<metric>` keys as {name: {metric: value}}."""
    grouped: dict[str, dict[str, float]] = {}
    for key, value in report.items():
        if key.startswith(prefix + "."):
            _, name, metric = key.split(".", 2)
            grouped.setdefault(name, {})[metric] = value
    return grouped


def main(names: list[str]) -> None:
    names = names or sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    results = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    for name in names:
        print(f"== {name}", flush=True)
        results[name] = run_config(name)
        report = results[name]["report"]
        ddm = ddm_key(report)
        for key in sorted(k for k in report if k.startswith(ddm) and ("lds_" in k or "logo_margin_aligned" in k)):
            print(f"  {key}: {report[key]:.3f}", flush=True)
        RESULT.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULT}")
    docs.main([])  # docs/results.md and the README's table, from the JSON


if __name__ == "__main__":
    main(sys.argv[1:])
