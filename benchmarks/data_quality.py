"""Finding harmful data: digits (K = 50) with 10% of the training labels flipped at random; detection AUC and the
share of flipped labels in the first 5 / 10 / 20% of the data inspected (most harmful clusters first) for DDM,
first-order and the peer methods, and the removal curve (retraining without the least useful x% by DDM's
ranking, next to removing as much at random). Writes benchmarks/results/data_quality.json.

No ground truth here (it would cost 284 retrainings): the removal step is the one calibrated on the clean
digits_k50 run, and the methods that need a calibrated step of their own (the paper's DDM, gradient ascent,
forward matching) are left out.

Targets: detection AUC >= 0.9 and >= 70% of the flipped labels in the first 20%; removing the 10% least useful
data does not lower the test accuracy while random removal does.

    python benchmarks/data_quality.py           # ~8 minutes on 2 cores
"""

from __future__ import annotations

import json

import pandas as pd
from quality import RESULTS, WORK, by_name, config, run_config

from ddm_ops.config import BASELINES, CALIBRATED

NAME = "digits_k50_noise10"
RESULT = RESULTS / "data_quality.json"


def noisy() -> dict:
    """digits_k50 with 10% label noise and the removal curve; the step of the clean run, no ground truth."""
    overrides = config("digits_k50")
    overrides["data"] = {"label_noise": {"fraction": 0.1, "mode": "uniform", "seed": 0}}
    overrides["data_quality"] = {"enabled": True}
    overrides["ground_truth"] = {"enabled": False}
    calibrated = WORK / "digits_k50" / "outputs" / "perturb" / "metrics.json"
    if not calibrated.is_file():
        raise SystemExit(f"{calibrated} is missing: run `python benchmarks/quality.py digits_k50` first (its step)")
    clean = json.loads(calibrated.read_text())
    overrides["perturb"] = {"step_size": clean["step_size"]}
    overrides["baselines"] = {"enabled": True, "methods": [m for m in BASELINES if m not in CALIBRATED]}
    return overrides


def main() -> None:
    measured = run_config(NAME, noisy())
    detection = by_name(measured["report"], "data_quality")
    curve = pd.read_parquet(WORK / NAME / "outputs" / "data_quality" / "removal_curve.parquet")
    mean = curve.groupby(["strategy", "percent"])[["test_accuracy", "removed_fraction"]].mean().reset_index()
    ddm = detection["ddm"]
    accuracy = {(r.strategy, r.percent): r.test_accuracy for r in mean.itertuples()}
    result = {
        "config": measured["overrides"],
        "noisy_fraction": measured["stages"]["cluster"]["noisy_fraction"],
        "detection": detection,
        "removal_curve": mean.to_dict(orient="records"),
        "targets": {
            "auc_at_least_0.9": ddm["auc"] >= 0.9,
            "found_at_20_at_least_0.7": ddm["found_at_20"] >= 0.7,
            "ddm_removal_10_keeps_accuracy": accuracy[("ddm", 10.0)] >= accuracy[("ddm", 0.0)],
            "random_removal_10_lowers_accuracy": accuracy[("random", 10.0)] < accuracy[("random", 0.0)],
        },
    }
    RESULT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result["detection"], indent=1), json.dumps(result["targets"], indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
