"""What the synsets reveal: on the digits_k50 run of quality.py (it has forward-matched synsets, which need the
ground truth for their removal step), per kind of synset (reverse = DDM, forward = forward gradient matching, init
= the real images matching starts from) the mean L2 / PSNR / SSIM to the nearest training image, the highest
SSIM to any, the member / non-member distance ratio, and the membership-inference AUC. Writes
benchmarks/results/privacy.json.

Targets: reverse-matched synsets farther from every real image than forward-matched ones (lower SSIM), and
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
            "reverse_max_ssim_below_forward": kinds["reverse"]["max_ssim"] < kinds["forward"]["max_ssim"],
            "membership_auc_at_most_0.55": kinds["reverse"]["membership_auc"] <= 0.55,
        },
    }
    RESULT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(kinds, indent=1), json.dumps(result["targets"], indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
