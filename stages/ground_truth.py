"""Stage ground_truth: retrain without each cluster and without random halves, aligned and resampled.

Aligned: the target's seed and batches with the removed samples dropped (the exact counterfactual of this
model). Resampled: fresh seeds (the effect in expectation), plus the full data for each seed (noise floor).
Every retraining is one Prefect task and one cached result keyed by everything it depends on, so a failed or
repeated stage redoes only the retrainings it lacks. Disabled (the default), the stage writes empty tables.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ddm_ops
from ddm_ops.config import Params
from ddm_ops.groundtruth import calibration_clusters, within_class_subsets
from ddm_ops.train import predict, train
from pipeline.runners import fan_out, task_device
from stages.common import Paths, concat_or_empty, dataset, new_model, read_parquet, write_parquet

CACHE = Path(".ddm_cache") / "retrain"  # under the project, or under $DDM_CACHE_DIR (shared between projects)
LIBRARY = Path(ddm_ops.__file__).parent  # every module of it enters the key

RETRAIN_COLUMNS = {
    "flavour": "aligned (target's seed and batches) or resampled (fresh seed)",
    "removal": "cluster (one cluster removed), subset (only the subset's clusters kept) or full (nothing removed)",
    "cluster_id": "removed cluster, -1 otherwise",
    "subset_id": "subset (row of masks.parquet), -1 otherwise",
    "seed": "training seed",
    "test_index": "position in the dataset's fixed test split",
    "class": "output class",
    "logit": "logit of the retrained model",
}
RETRAIN_DTYPES = {
    "flavour": "str",
    "removal": "str",
    "cluster_id": "int64",
    "subset_id": "int64",
    "seed": "int64",
    "test_index": "int64",
    "class": "int64",
    "logit": "float32",
}
TIMING_COLUMNS = {
    "job": "retraining name",
    "seconds": "wall time of the retraining when it ran",
    "cached": "true when reused from .ddm_cache",
}


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
    torch threads of a task, and the bytes of every ddm_ops module and of the user's own data / model modules."""
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
    for path in sorted(LIBRARY.glob("*.py")) + _user_modules(params):
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


def _jobs(params: Params, cluster_ids: np.ndarray, masks: np.ndarray) -> list[dict]:
    """(name, removed clusters, seed, flavour, removal, cluster_id, subset_id) of every retraining."""
    seed = params.base.seed
    jobs = []
    seeds = [("aligned", seed)] + [("resampled", seed + r) for r in range(1, params.ground_truth.seeds + 1)]
    for flavour, s in seeds:
        jobs.append(
            {
                "job": f"{flavour}-s{s}-full",
                "removed": [],
                "seed": s,
                "flavour": flavour,
                "removal": "full",
                "cluster_id": -1,
                "subset_id": -1,
            }
        )
        for k in cluster_ids:
            jobs.append(
                {
                    "job": f"{flavour}-s{s}-c{k}",
                    "removed": [int(k)],
                    "seed": s,
                    "flavour": flavour,
                    "removal": "cluster",
                    "cluster_id": int(k),
                    "subset_id": -1,
                }
            )
        for i, mask in enumerate(masks):
            jobs.append(
                {
                    "job": f"{flavour}-s{s}-m{i}",
                    "removed": [int(k) for k in cluster_ids[~mask]],
                    "seed": s,
                    "flavour": flavour,
                    "removal": "subset",
                    "cluster_id": -1,
                    "subset_id": i,
                }
            )
    return jobs


def run(params: Params, paths: Paths, out: Path) -> dict:
    ds = dataset(params)
    clusters = read_parquet(paths.stage("cluster") / "clusters.parquet")
    cluster_ids, labels = clusters["cluster_id"].to_numpy(), clusters["label"].to_numpy()
    gt = params.ground_truth
    masks = (
        within_class_subsets(labels, gt.subsets, gt.keep_fraction, params.base.seed)
        if gt.enabled
        else np.zeros((0, len(cluster_ids)), dtype=bool)
    )
    calibration = calibration_clusters(labels, gt.calibration_clusters, params.base.seed) if gt.enabled else []
    write_parquet(
        pd.DataFrame(
            {
                "subset_id": np.repeat(np.arange(len(masks)), len(cluster_ids)),
                "cluster_id": np.tile(cluster_ids, len(masks)),
                "kept": masks.reshape(-1),
            }
        ),
        out / "masks.parquet",
        "Which clusters each random within-class subset kept.",
        {"subset_id": "subset", "cluster_id": "cluster", "kept": "true when the subset kept the cluster"},
    )
    write_parquet(
        pd.DataFrame(
            {
                "cluster_id": cluster_ids,
                "role": np.where(np.isin(cluster_ids, cluster_ids[calibration]), "calibration", "evaluation"),
            }
        ),
        out / "roles.parquet",
        "Clusters whose retraining calibrates removal step sizes are left out of the evaluation.",
        {"cluster_id": "cluster", "role": "calibration or evaluation"},
    )
    jobs = _jobs(params, cluster_ids, masks) if gt.enabled else []
    start = time.perf_counter()
    items = [
        {
            "root": str(paths.root),
            "params": params.model_dump(),
            "job": j["job"],
            "removed": j["removed"],
            "seed": j["seed"],
        }
        for j in jobs
    ]
    done = fan_out(retrain_one, items, "job", params.execution, "retrain", params.base.device) if items else []
    wall = time.perf_counter() - start
    frames, timings = [], []
    m, c = len(ds.test_index), ds.num_classes
    for j, d in zip(jobs, done):
        saved = torch.load(d["path"], weights_only=True)
        frames.append(
            pd.DataFrame(
                {
                    "flavour": j["flavour"],
                    "removal": j["removal"],
                    "cluster_id": j["cluster_id"],
                    "subset_id": j["subset_id"],
                    "seed": j["seed"],
                    "test_index": np.repeat(ds.test_index, c),
                    "class": np.tile(np.arange(c), m),
                    "logit": saved["logits"].numpy().reshape(-1),
                }
            )
        )
        timings.append({"job": j["job"], "seconds": float(saved["seconds"]), "cached": d["cached"]})
    write_parquet(
        concat_or_empty(frames, RETRAIN_DTYPES),
        out / "retrain.parquet",
        "Test-set logits of every retrained model.",
        RETRAIN_COLUMNS,
    )
    write_parquet(
        pd.DataFrame(timings, columns=list(TIMING_COLUMNS)),
        out / "timings.parquet",
        "Wall time of every retraining.",
        TIMING_COLUMNS,
    )
    seconds = [t["seconds"] for t in timings]
    return {
        "enabled": int(gt.enabled),
        "n_retrainings": len(jobs),
        "wall_seconds": wall,
        "seconds_per_retraining": float(np.mean(seconds)) if seconds else 0.0,
        "n_cached": sum(t["cached"] for t in timings),
    }
