"""Does a committed benchmark reproduce? Reruns benchmarks/configs/<name>.yaml from scratch (a fresh project and an
empty retraining cache) and compares every number of its report that is not a time or a memory size with
benchmarks/results/quality.json. Writes benchmarks/results/reproduce.json.

    python benchmarks/reproduce.py digits_k50        # ~30 minutes on 2 cores
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from quality import RESULT, RESULTS, ROOT, WORK, run_config

MEASURES_TIME = ("seconds", "speedup", "overhead", "fraction_of_training", "memory")
OUT = RESULTS / "reproduce.json"


def compare(committed: dict, fresh: dict) -> dict:
    """Every deterministic number of `committed` against `fresh`: how many are identical, and those that are not."""
    keys = sorted(k for k in committed if not any(word in k for word in MEASURES_TIME))
    differing = {
        k: [committed[k], fresh.get(k)]
        for k in keys
        if k not in fresh or not math.isclose(committed[k], fresh[k], rel_tol=0, abs_tol=1e-9)
    }
    return {"compared": len(keys), "identical": len(keys) - len(differing), "differing": differing}


def main(name: str) -> None:
    committed = json.loads(RESULT.read_text())[name]["report"]
    folder = WORK / f"{name}-reproduce"
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory() as cache:
        fresh = run_config(name, folder=folder, cache=Path(cache))["report"]
    shutil.rmtree(folder)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result[name] = {"commit": commit, **compare(committed, fresh)}
    OUT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result[name], indent=1))
    if result[name]["differing"]:
        raise SystemExit(f"{name}: {len(result[name]['differing'])} numbers differ from {RESULT}")


if __name__ == "__main__":
    main(sys.argv[1])
