"""Stage record_trajectory: the trajectory table, and the train-set features that clustering uses."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ddm_ops.config import Params
from ddm_ops.models import penultimate_features
from stages.artifacts import Paths, load_checkpoints, write_parquet
from stages.common import FanOut, dataset, in_process, new_model


def _flat(state: dict[str, torch.Tensor], names: set[str]) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in state.items() if k in names])


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    folder = paths.stage("train_target") / "checkpoints"
    checkpoints = load_checkpoints(folder)
    model = new_model(params, ds)
    names = {n for n, _ in model.named_parameters()}
    final = _flat(checkpoints[-1].state, names)
    rows = []
    for c, f in zip(checkpoints, sorted(folder.glob("ckpt_*.pt"))):
        theta = _flat(c.state, names)
        rows.append(
            {
                "checkpoint": c.index,
                "epoch": c.epoch,
                "step": c.step,
                "lr": c.lr,
                "epochs": c.epochs,
                "path": str(f.relative_to(paths.root)),
                "param_norm": theta.norm().item(),
                "distance_to_final": (theta - final).norm().item(),
            }
        )
    write_parquet(
        pd.DataFrame(rows),
        out / "trajectory.parquet",
        "The target's SGD trajectory: checkpoint t starts segment t, trained with lr for `epochs` epochs.",
        {
            "checkpoint": "checkpoint index t",
            "epoch": "epochs done before θ_t",
            "step": "SGD steps done before θ_t",
            "lr": "mean learning rate of segment t (0 for θ_T)",
            "epochs": "epochs in segment t (0 for θ_T)",
            "path": "checkpoint file, relative to the project",
            "param_norm": "L2 norm of θ_t",
            "distance_to_final": "L2 distance |θ_t - θ_T|",
        },
    )
    if params.record_trajectory.features == "pixels":
        features = ds.x_train.flatten(1)
    else:
        model.load_state_dict(checkpoints[-1].state)
        features = penultimate_features(model, ds.x_train)
    torch.save(
        {"features": features.contiguous(), "train_index": torch.from_numpy(ds.train_index)}, out / "features.pt"
    )
    return {
        "n_checkpoints": len(checkpoints),
        "feature_dim": features.shape[1],
        "path_length": sum(abs(a["distance_to_final"] - b["distance_to_final"]) for a, b in zip(rows, rows[1:])),
    }
