"""Stage train_target: train the target ConvNet with SGD and save its trajectory θ_0 … θ_T with learning rates."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from ddm_ops.config import Params
from ddm_ops.devices import resolve_device, tune_process
from ddm_ops.train import accuracy, train
from stages.artifacts import Paths, save_checkpoint, write_parquet
from stages.common import FanOut, dataset, in_process, new_model


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    device = resolve_device(params.base.device)
    tune_process(params.execution.threads_per_worker)  # as every retraining: floating-point sums agree
    model = new_model(params, ds).to(device)
    (out / "checkpoints").mkdir()
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    test = (ds.x_test.to(device), ds.y_test.to(device))
    start = time.perf_counter()
    history = train(
        model,
        x,
        y,
        params.train,
        params.base.seed,
        test=test,
        label="train_target",
        progress=True,
        on_checkpoint=lambda c: save_checkpoint(out / "checkpoints" / f"ckpt_{c.index:04d}.pt", c),
    )
    seconds = time.perf_counter() - start
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    write_parquet(
        pd.DataFrame(history),
        out / "history.parquet",
        "Training history of the target, one row per epoch.",
        {
            "epoch": "epoch (0-based)",
            "step": "SGD steps taken by the end of the epoch",
            "lr": "learning rate",
            "loss": "mean training cross-entropy over the epoch",
            "test_accuracy": "accuracy on the test split",
        },
    )
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)  # for `dvc plots`
    return {
        "test_accuracy": accuracy(model, *test),
        "train_accuracy": accuracy(model, x, y),
        "train_seconds": seconds,
        "n_train": len(ds.x_train),
        "n_test": len(ds.x_test),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }
