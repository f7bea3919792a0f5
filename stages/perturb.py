"""Stage perturb: remove every cluster from θ_T by n_u SGD steps on its synset; record each θ_{-κ}'s test logits."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from ddm_ops.config import Params
from ddm_ops.devices import resolve_device
from ddm_ops.distill import removal_sign
from ddm_ops.functional import split_state
from ddm_ops.unlearn import unlearn
from stages.common import Paths, dataset, load_tensors, new_model, write_parquet

BASE = -1  # cluster_id of the unperturbed target θ_T in outputs.parquet


def run(params: Params, paths: Paths, out: Path) -> dict:
    ds = dataset(params)
    device = resolve_device(params.base.device)
    model = new_model(params, ds).to(device).eval()
    theta, buffers = split_state(
        model, {k: v.to(device) for k, v in load_tensors(paths.stage("train_target") / "model.pt").items()}
    )
    synset = load_tensors(paths.stage("distill") / "synset.pt")
    x_test = ds.x_test.to(device)
    images, labels = synset["images"].to(device), synset["labels"].to(device)
    sign = removal_sign(synset["direction"])
    unlearn(model, theta, buffers, images[:1], labels[:1], 1, params.perturb.step_size, sign)  # one-off warm-up
    start = time.perf_counter()
    removed = unlearn(model, theta, buffers, images, labels, params.perturb.n_u, params.perturb.step_size, sign)
    removal_seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = [functional_call(model, (theta, buffers), (x_test,))]
        logits += [
            functional_call(model, ({k: v[i] for k, v in removed.items()}, buffers), (x_test,))
            for i in range(len(synset["cluster_ids"]))
        ]
    online_seconds = time.perf_counter() - start
    logits = torch.stack(logits).cpu().numpy()  # (1 + K, M, C)
    ids = np.concatenate([[BASE], synset["cluster_ids"].numpy()])
    k, m, c = logits.shape
    write_parquet(
        pd.DataFrame(
            {
                "cluster_id": np.repeat(ids, m * c),
                "test_index": np.tile(np.repeat(ds.test_index, c), k),
                "class": np.tile(np.arange(c), k * m),
                "logit": logits.reshape(-1),
            }
        ),
        out / "outputs.parquet",
        "Test-set logits of θ_T (cluster_id -1) and of every θ_{-κ} (κ removed by its synset).",
        {
            "cluster_id": "removed cluster, -1 for the unperturbed target",
            "test_index": "position in the dataset's fixed test split",
            "class": "output class",
            "logit": "logit",
        },
    )
    n = len(synset["cluster_ids"])
    return {
        "removal_seconds": removal_seconds,
        "online_seconds": online_seconds,
        "seconds_per_removal": online_seconds / n,
        "n_removals": n,
    }
