"""One retraining without some clusters (or training positions), cached under a key of everything that changes
its logits: what the ground truth and the removal curve are made of."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import ddm_ops
from ddm_ops.config import Params
from ddm_ops.devices import task_device
from ddm_ops.evaluation import Truth
from ddm_ops.train import predict, train
from stages.artifacts import Paths, read_parquet
from stages.common import dataset, new_model

CACHE = Path(".ddm_cache") / "retrain"  # under the project, or under $DDM_CACHE_DIR (shared between projects)


LIBRARY = Path(ddm_ops.__file__).parent
TRAINING = ("data", "models", "train")  # the ddm_ops modules a retraining runs; they and their imports enter the key


def _training_modules() -> list[Path]:
    """The files of TRAINING and every ddm_ops module they import, directly or not (read from their source), so
    that a change to the method (distillation, curvature, attribution) keeps the cached retrainings."""
    seen, todo = set(), list(TRAINING)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((LIBRARY / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "ddm_ops":
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddm_ops."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("ddm_ops.")]
    seen.discard("config")  # the params enter the key by value: editing config.py keeps the cached retrainings
    return [LIBRARY / f"{name}.py" for name in sorted(seen)]


def _user_modules(params: Params) -> list[Path]:
    """The files of the user's own dataset and model modules (`module:name` in data.name / model.name)."""
    files = []
    for spec in (params.data.name, params.model.name):
        if ":" in spec:
            found = importlib.util.find_spec(spec.partition(":")[0])
            if found is not None and found.origin and Path(found.origin).is_file():
                files.append(Path(found.origin))
    return files


def cache_key(params: Params, seed: int, keep: np.ndarray, device: torch.device) -> str:
    """The name of a retraining in the cache: everything that changes its logits. The data, model and training
    params, the seed, which training samples are kept, the torch version, the device (and the GPU's name), the
    torch threads of a task, and the bytes of the ddm_ops modules training runs and of the user's own data / model
    modules."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [
                params.data.model_dump(mode="json"),
                params.model.model_dump(mode="json"),
                params.train.model_dump(mode="json"),
                seed,
                torch.__version__,
                device.type,
                torch.cuda.get_device_name(device) if device.type == "cuda" else "",
                params.execution.threads_per_worker,
            ]
        ).encode()
    )
    h.update(np.packbits(keep).tobytes())
    for path in _training_modules() + _user_modules(params):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:24]


def cache_dir(root: str | Path) -> Path:
    """Where retrainings are kept: $DDM_CACHE_DIR/retrain when set (shared between projects), else
    <project>/.ddm_cache/retrain."""
    return Path(os.environ["DDM_CACHE_DIR"]) / "retrain" if os.environ.get("DDM_CACHE_DIR") else Path(root) / CACHE


def retrain_one(root: str, params: dict, job: str, removed: list[int], seed: int, dropped: list[int] = ()) -> dict:
    """Train without the `removed` clusters and the `dropped` training positions with `seed` (cached); return the
    job with its logits file."""
    p = Params.model_validate(params)
    ds = dataset(p)
    ids = read_parquet(Paths(Path(root)).stage("cluster") / "assignments.parquet")["cluster_id"].to_numpy()
    keep = ~np.isin(ids, removed)
    keep[list(dropped)] = False
    device = task_device(p.base.device)
    path = cache_dir(root) / f"{cache_key(p, seed, keep, device)}.pt"
    cached = path.is_file()
    if not cached:
        model = new_model(p, ds, seed=seed).to(device)
        start = time.perf_counter()
        train(
            model,
            ds.x_train.to(device),
            ds.y_train.to(device),
            p.train,
            seed,
            keep=torch.from_numpy(keep),
            label=f"ground_truth {job}",
        )
        seconds = time.perf_counter() - start
        logits = predict(model, ds.x_test.to(device)).cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"logits": logits, "seconds": seconds}, tmp)
        tmp.rename(path)
    return {"job": job, "path": str(path), "cached": cached}


def load_ground_truth(paths: Paths, params: Params) -> Truth:
    folder = paths.stage("ground_truth")
    retrain = read_parquet(folder / "retrain.parquet")
    roles = read_parquet(folder / "roles.parquet").sort_values("cluster_id")
    masks = read_parquet(folder / "masks.parquet").sort_values(["subset_id", "cluster_id"])
    k = len(roles)
    m = masks["subset_id"].nunique()
    full, cluster, subset = {}, {}, {}
    for seed, part in retrain.groupby("seed"):
        part = part.sort_values(["removal", "cluster_id", "subset_id", "test_index", "class"])
        c = part["class"].max() + 1
        for removal, rows in part.groupby("removal"):
            logits = rows["logit"].to_numpy(np.float32, copy=True).reshape(-1, rows["test_index"].nunique(), c)
            {"full": full, "cluster": cluster, "subset": subset}[removal][int(seed)] = (
                logits[0] if removal == "full" else logits
            )
    seeds = sorted(full)
    return Truth(
        enabled=bool(len(retrain)),
        aligned_seed=params.base.seed,
        resampled_seeds=[s for s in seeds if s != params.base.seed],
        full=full,
        cluster=cluster,
        subset=subset,
        masks=masks["kept"].to_numpy().reshape(m, k),
        calibration=np.flatnonzero(roles["role"] == "calibration"),
        evaluation=np.flatnonzero(roles["role"] == "evaluation"),
    )
