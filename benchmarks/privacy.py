"""What the synsets reveal: on the digits_k50 run of quality.py, per kind of synset (ddm = the run's synsets,
forward_matching = the classic method's when it has as many images per cluster, init = the real images matching
starts from) the mean L2 / PSNR / SSIM to the nearest training image, the highest SSIM to any, the member /
non-member distance ratio; and the likelihood-ratio membership attack (AUC with its 95% bootstrap interval, true
positives at 1% false positives) on a model trained from each kind of synset, next to its positive controls (the
run's target model; a model trained on the init images) and its negative control (a model that never saw the
attacked images). Writes benchmarks/results/privacy.json.

Targets: the attack works (positive control: the target model's AUC > 0.6); DDM's synsets farther from every real
image than the real images they start from (lower SSIM); a model trained on DDM's synsets no easier to attack than
the negative control (its AUC interval contains the negative control's AUC).

    python benchmarks/privacy.py                # reuses quality.py's digits_k50 run when it is there
"""

from __future__ import annotations

import json

import pandas as pd
from quality import RESULTS, WORK, by_name, run_config

NAME = "digits_k50"

RESULT = RESULTS / "privacy.json"


def main() -> None:
    measured = run_config(NAME)
    kinds = by_name(measured["report"], "privacy")
    attack = kinds.pop("membership")
    table = pd.read_parquet(WORK / NAME / "outputs" / "report" / "privacy.parquet")
    attack = {
        model: {k: v for k, v in row.items() if k != "model"}
        for model, row in pd.read_parquet(WORK / NAME / "outputs" / "report" / "membership.parquet")
        .set_index("model", drop=False)
        .to_dict(orient="index")
        .items()
    }
    result = {
        "config": measured["overrides"],
        "synsets": kinds,
        "membership_attack": attack,
        "per_image_quantiles": {
            f"{kind} q{q:g}": row.to_dict()
            for (kind, q), row in table.groupby("synset")[["ssim", "max_ssim", "distance_ratio"]]
            .quantile([0.1, 0.5, 0.9])
            .iterrows()
        },
        "targets": {
            "attack_works_target_auc_above_0.6": attack["target"]["auc"] > 0.6,
            "ddm_max_ssim_below_init": kinds["ddm"]["max_ssim"] < kinds["init"]["max_ssim"],
            "ddm_attack_interval_contains_negative_control": attack["ddm"]["auc_low"]
            <= attack["unseen"]["auc"]
            <= attack["ddm"]["auc_high"],
        },
    }
    RESULT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(kinds, indent=1), json.dumps(attack, indent=1), json.dumps(result["targets"], indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
