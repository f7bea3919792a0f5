"""DDM next to the field: every method of `baselines.methods` on the digits config and on the Fashion-MNIST subset
config (when Debian's dataset-fashion-mnist is installed), the same clusters, ground truth and metrics: the same
projects as quality.py's (benchmarks/.work/<config>), so whichever of the two runs second recomputes nothing.

Writes benchmarks/results/peers.json (per config: one row per method with LOGO Spearman, group-LDS, fidelity,
offline / online seconds and peak memory, plus the reference row), then renders docs/results.md from it.
Needs the peers extra (`pip install -c constraints.txt -e '.[peers]'`; `make setup` installs it).

    python benchmarks/peers.py                  # digits_k50 and fashion_k100 (hours on 2 cores)
    python benchmarks/peers.py digits_k50       # one of them
"""

from __future__ import annotations

import json
import sys

import pandas as pd
from quality import RESULTS, WORK, config, run_config

from ddm_ops.config import BASELINES
from ddm_ops.data import DEBIAN_FASHION_MNIST
from ddm_ops.peers import PEERS
from pipeline import docs

CONFIGS = ["digits_k50", "fashion_k100"]
RESULT = RESULTS / "peers.json"


def run(name: str) -> dict:
    """The config's run with its peer methods; the same project as quality.py's, so one of the two computes it."""
    methods = config(name).get("baselines", {}).get("methods", ())
    if not set(PEERS) & set(methods):
        raise SystemExit(f"benchmarks/configs/{name}.yaml: baselines.methods {methods} lacks the peer methods")
    measured = run_config(name)
    table = pd.read_parquet(WORK / name / "outputs" / "report" / "methods.parquet")
    report = measured["report"]
    reference = {k.removeprefix("reference."): v for k, v in report.items() if k.startswith("reference.")}
    return {
        "overrides": measured["overrides"],
        "methods": table.to_dict(orient="records"),
        "not_run": sorted(set(BASELINES) - set(table["method"])),  # the config says why
        "reference": reference,
    }


def main(names: list[str]) -> None:
    results = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    for name in names or CONFIGS:
        if name.startswith("fashion") and not DEBIAN_FASHION_MNIST.is_dir():
            print(f"skipping {name}: Fashion-MNIST is not installed (make data)")
            continue
        print(f"== {name}", flush=True)
        results[name] = run(name)
        RESULT.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULT}")
    docs.main([])  # docs/results.md and the README's table, from the JSON


if __name__ == "__main__":
    main(sys.argv[1:])
