"""Stage baselines: reference methods next to DDM on the same clusters (class indicator, input similarity,
first-order trajectory estimate, gradient ascent on the real cluster). Disabled, it writes empty tables."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops.attribution import scores
from ddm_ops.baselines import class_indicator, first_order_scores, gradient_ascent_outputs, input_similarity
from ddm_ops.calibration import calibrate_step
from ddm_ops.config import Params
from ddm_ops.devices import resolve_device
from ddm_ops.functional import split_state
from ddm_ops.models import functional_mode
from ddm_ops.trajectory import Trajectory
from ddm_ops.unlearn import outputs_of
from stages.common import (
    Paths,
    concat_or_empty,
    dataset,
    load_checkpoints,
    load_ground_truth,
    load_tensors,
    new_model,
    read_parquet,
    write_parquet,
)

SCORE_COLUMNS = {
    "method": "class_indicator, input_similarity, first_order or gradient_ascent",
    "cluster_id": "removed cluster",
    "test_index": "position in the dataset's fixed test split",
    "objective": "margin, loss or probability (as in attribution.parquet)",
    "score": "predicted drop of the objective when the cluster is removed (positive = the cluster helps)",
}
SCORE_DTYPES = {"method": "str", "cluster_id": "int64", "test_index": "int64", "objective": "str", "score": "float64"}
OUTPUT_COLUMNS = {
    "method": "method that produced the removed model",
    "cluster_id": "removed cluster",
    "test_index": "position in the dataset's fixed test split",
    "class": "output class",
    "logit": "logit of the removed model",
}


OUTPUT_DTYPES = {"method": "str", "cluster_id": "int64", "test_index": "int64", "class": "int64", "logit": "float32"}


def _long(method: str, matrix: np.ndarray, cluster_ids: np.ndarray, test_index: np.ndarray, objective: str):
    return pd.DataFrame(
        {
            "method": method,
            "cluster_id": np.repeat(cluster_ids, len(test_index)),
            "test_index": np.tile(test_index, len(cluster_ids)),
            "objective": objective,
            "score": matrix.reshape(-1).astype(np.float64),
        }
    )


def run(params: Params, paths: Paths, out: Path) -> dict:
    frames, outputs, metrics = [], [], {"enabled": int(params.baselines.enabled)}
    if params.baselines.enabled:
        ds = dataset(params)
        device = resolve_device(params.base.device)
        clusters = read_parquet(paths.stage("cluster") / "clusters.parquet")
        cluster_ids, labels = clusters["cluster_id"].to_numpy(), clusters["label"].to_numpy()
        ids = read_parquet(paths.stage("cluster") / "assignments.parquet")["cluster_id"].to_numpy()
        x, y = ds.x_train.to(device), ds.y_train.to(device)
        members = [(x[ids == k], y[ids == k]) for k in cluster_ids]
        x_test, y_test, test_labels = ds.x_test.to(device), ds.y_test.to(device), ds.y_test.numpy()
        model = functional_mode(new_model(params, ds).to(device), params.distill.batchnorm)
        objectives = params.attribute.objectives

        start = time.perf_counter()
        trivial = {
            "class_indicator": class_indicator(labels, test_labels),
            "input_similarity": input_similarity(ds.x_train, ids, labels, ds.x_test, test_labels),
        }
        metrics["trivial_seconds"] = time.perf_counter() - start
        for method, matrix in trivial.items():
            frames += [_long(method, matrix, cluster_ids, ds.test_index, o) for o in objectives]

        trajectory = Trajectory.from_checkpoints(
            model, load_checkpoints(paths.stage("train_target") / "checkpoints"), params.train.batch_size
        ).to(device)
        start = time.perf_counter()
        for o in objectives:
            frames.append(
                _long(
                    "first_order",
                    first_order_scores(model, trajectory, members, x_test, y_test, o),
                    cluster_ids,
                    ds.test_index,
                    o,
                )
            )
        metrics["first_order_seconds"] = time.perf_counter() - start

        state = {k: v.to(device) for k, v in load_tensors(paths.stage("train_target") / "model.pt").items()}
        theta, buffers = split_state(model, state)
        steps = params.baselines.gradient_ascent_steps
        gt = load_ground_truth(paths, params)
        truth = torch.from_numpy(gt.cluster[gt.aligned_seed][gt.calibration]).to(device)
        calib = [members[k] for k in gt.calibration]
        step, _ = calibrate_step(
            lambda s: gradient_ascent_outputs(model, theta, buffers, calib, steps, s, x_test, ds.num_classes), truth
        )
        start = time.perf_counter()
        logits = gradient_ascent_outputs(model, theta, buffers, members, steps, step, x_test, ds.num_classes)
        metrics.update(gradient_ascent_seconds=time.perf_counter() - start, gradient_ascent_step_size=step)
        base = outputs_of(model, {k: v[None] for k, v in theta.items()}, buffers, x_test)[0]
        for o in objectives:
            frames.append(
                _long("gradient_ascent", scores(base, logits, y_test, o).cpu().numpy(), cluster_ids, ds.test_index, o)
            )
        k, m, c = logits.shape
        outputs.append(
            pd.DataFrame(
                {
                    "method": "gradient_ascent",
                    "cluster_id": np.repeat(cluster_ids, m * c),
                    "test_index": np.tile(np.repeat(ds.test_index, c), k),
                    "class": np.tile(np.arange(c), k * m),
                    "logit": logits.cpu().numpy().reshape(-1),
                }
            )
        )
    write_parquet(
        concat_or_empty(frames, SCORE_DTYPES),
        out / "baselines.parquet",
        "Scores of the reference methods, in attribution.parquet's layout plus `method`.",
        SCORE_COLUMNS,
    )
    write_parquet(
        concat_or_empty(outputs, OUTPUT_DTYPES),
        out / "outputs.parquet",
        "Test logits of the reference methods that produce a removed model.",
        OUTPUT_COLUMNS,
    )
    return metrics
