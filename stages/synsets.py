"""The synsets: every cluster distilled into a few synthetic images by gradient matching, one task and one folder per
cluster (DDM's offline part through the pipeline's fan-out: the distill stage's, and the baselines' DDM variants')."""

from __future__ import annotations

import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.cluster import nearest_members
from ddm_ops.config import Params
from ddm_ops.curvature import Curvature, damped, stored_factors
from ddm_ops.devices import peak_memory, task_device
from ddm_ops.distill import distill_cluster
from ddm_ops.models import functional_mode
from ddm_ops.trajectory import Trajectory
from stages.artifacts import Paths, load_checkpoints, load_tensors, read_parquet
from stages.common import FanOut, dataset, new_model


@lru_cache(maxsize=2)
def _trajectory(params: Params, root: str, device: torch.device) -> Trajectory:
    """The recorded trajectory on `device`, loaded once per worker process."""
    model = new_model(params, dataset(params))
    return Trajectory.from_checkpoints(
        model, load_checkpoints(Paths(Path(root)).stage("train_target") / "checkpoints"), params.train.batch_size
    ).to(device)


@lru_cache(maxsize=2)
def _curvature(params: Params, root: str, device: torch.device) -> Curvature:
    """The curvature stage's (factors, absolute damping) at each matched checkpoint, on `device`, loaded once per
    worker process."""
    path = Paths(Path(root)).stage("curvature") / "factors.pt"
    index, factors = stored_factors(load_tensors(path)) or (torch.zeros(0, dtype=torch.long), [])
    expected = _trajectory(params, root, device).spread(params.distill.checkpoints)
    if not torch.equal(index, expected):
        raise ValueError(f"{path}: fitted at checkpoints {index.tolist()}, not {expected.tolist()}; rerun curvature")
    return damped(factors, params.perturb.damping, device)


def distill_one(root: str, params: dict, cluster_id: int, work: str) -> dict:
    """Distill one cluster into work/<cluster_id>/ (skipped when already complete); return its summary."""
    folder = Path(work) / f"{cluster_id:05d}"
    done = folder / "synset.pt"
    if not done.is_file():
        p = Params.model_validate(params)
        ds = dataset(p)
        device = task_device(p.base.device)
        assign = read_parquet(Paths(Path(root)).stage("cluster") / "assignments.parquet")
        ids, dist = assign["cluster_id"].to_numpy(), assign["centroid_distance"].to_numpy()
        members = np.flatnonzero(ids == cluster_id)
        init = nearest_members(ids, dist, cluster_id, p.distill.ipc)
        model = functional_mode(new_model(p, ds).to(device), p.distill.batchnorm)
        start = time.perf_counter()
        synset, losses = distill_cluster(
            model,
            _trajectory(p, root, device),
            (ds.x_train[members].to(device), ds.y_train[members].to(device)),
            ds.x_train[init].to(device),
            ds.num_classes,
            p.distill,
            name=f"cluster {cluster_id}",
            curvature=_curvature(p, root, device) if p.distill.metric == "whitened" else None,
        )
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "losses": torch.tensor(losses),
                "seconds": time.perf_counter() - start,
                "init_index": torch.from_numpy(init),
            },
            folder / "matching.pt",
        )
        tmp = folder / "synset.pt.tmp"
        torch.save({"images": synset.images.cpu(), "labels": synset.labels.cpu()}, tmp)
        tmp.rename(done)
    summary = load_tensors(folder / "matching.pt")
    return {
        "cluster_id": cluster_id,
        "seconds": float(summary["seconds"]),
        "loss_first": float(summary["losses"][0]),
        "loss_last": float(summary["losses"][-1]),
    }


def distill_all(params: Params, paths: Paths, work: Path, fan_out: FanOut) -> tuple[dict, pd.DataFrame, dict]:
    """Every cluster's synset, one Prefect task and one folder under `work` per cluster (removed afterwards).

    Returns the stacked synset (images, labels, cluster_ids, init_index, direction), the matching loss table and
    the metrics (wall seconds, peak extra memory, mean seconds and matching loss per cluster).
    """
    clusters = read_parquet(paths.stage("cluster") / "clusters.parquet")
    items = [
        {"root": str(paths.root), "params": params.model_dump(), "cluster_id": int(c), "work": str(work)}
        for c in clusters["cluster_id"]
    ]
    metrics: dict = {}
    start = time.perf_counter()
    with peak_memory(metrics, "distill_peak_memory_mb"):
        summaries = fan_out(distill_one, items, "cluster_id", "distill")
    metrics["distill_seconds"] = time.perf_counter() - start
    parts = [load_tensors(work / f"{s['cluster_id']:05d}" / "synset.pt") for s in summaries]
    matching = [load_tensors(work / f"{s['cluster_id']:05d}" / "matching.pt") for s in summaries]
    synset = {
        "images": torch.stack([p["images"] for p in parts]),
        "labels": torch.stack([p["labels"] for p in parts]),
        "cluster_ids": torch.tensor([s["cluster_id"] for s in summaries]),
        "init_index": torch.stack([m["init_index"] for m in matching]),
        "direction": params.distill.direction,
    }
    losses = pd.concat(
        [
            pd.DataFrame(
                {"cluster_id": s["cluster_id"], "iteration": np.arange(len(m["losses"])), "loss": m["losses"].numpy()}
            )
            for s, m in zip(summaries, matching)
        ],
        ignore_index=True,
    )
    shutil.rmtree(work)
    metrics.update(
        cluster_seconds_mean=float(np.mean([s["seconds"] for s in summaries])),
        matching_loss_first=float(np.mean([s["loss_first"] for s in summaries])),
        matching_loss_last=float(np.mean([s["loss_last"] for s in summaries])),
    )
    return synset, losses, metrics
