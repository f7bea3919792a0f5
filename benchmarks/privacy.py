"""What the synsets reveal: on the digits_k50 run of quality.py, per kind of synset (ddm = the run's synsets,
forward_matching = the classic method's when it has as many images per cluster, init = the real images matching
starts from) the mean L2 / PSNR / SSIM to the nearest training image, the highest SSIM to any, the member /
non-member distance ratio, and the membership-inference AUC. Writes benchmarks/results/privacy.json.

Targets: DDM's synsets farther from every real image than the real images they start from (lower SSIM), and
membership-inference AUC <= 0.55.

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
    table = pd.read_parquet(WORK / NAME / "outputs" / "report" / "privacy.parquet")
    result = {
        "config": measured["overrides"],
        "synsets": kinds,
        "per_image_quantiles": {
            f"{kind} q{q:g}": row.to_dict()
            for (kind, q), row in table.groupby("synset")[["ssim", "max_ssim", "distance_ratio"]]
            .quantile([0.1, 0.5, 0.9])
            .iterrows()
        },
        "targets": {
            "ddm_max_ssim_below_init": kinds["ddm"]["max_ssim"] < kinds["init"]["max_ssim"],
            "membership_auc_at_most_0.55": kinds["ddm"]["membership_auc"] <= 0.55,
        },
    }
    RESULT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(kinds, indent=1), json.dumps(result["targets"], indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
