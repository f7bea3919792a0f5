"""Stage distill: every cluster's synset by reverse gradient matching, one Prefect task and folder per cluster."""

from __future__ import annotations

from pathlib import Path

import torch

from ddm_ops.config import Params
from stages.artifacts import Paths, write_parquet
from stages.common import FanOut, in_process
from stages.synsets import distill_all

MATCHING_COLUMNS = {
    "cluster_id": "cluster",
    "iteration": "optimisation step of the synset",
    "loss": "mean over the matched checkpoints of the gradient distance (distill.metric)",
}


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    synset, losses, metrics = distill_all(params, paths, out / "clusters", fan_out)
    torch.save(synset, out / "synset.pt")
    write_parquet(
        losses,
        out / "matching.parquet",
        "Reverse gradient matching loss of every cluster's synset per iteration.",
        MATCHING_COLUMNS,
    )
    curve = losses.groupby("iteration")["loss"].quantile([0.1, 0.5, 0.9]).unstack()
    curve.columns = ["loss_q10", "loss_median", "loss_q90"]
    curve.reset_index().to_csv(out / "matching_curve.csv", index=False)  # for `dvc plots`
    return metrics
