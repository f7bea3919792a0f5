"""What stages read and write: project paths, atomic stage outputs, Parquet with described columns, tensors,
checkpoints, and the long tables of scores and logits in the shapes the code uses."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddm_ops.train import Checkpoint


@dataclass(frozen=True)
class Paths:
    """The project's folders: every stage writes only into outputs/<stage>/."""

    root: Path

    def stage(self, name: str) -> Path:
        return self.root / "outputs" / name


@contextmanager
def staged_output(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `final` only if the block succeeds.

    On any error the staging folder and whatever was left at `final` are removed, so a failed stage never leaves
    outputs that a later run could take as valid.
    """
    tmp = final.with_name(f".{final.name}.staging")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def write_parquet(df: pd.DataFrame, path: Path, description: str, columns: dict[str, str]) -> None:
    """Write `df` with the meaning of the table and of each column (in that order) in the Parquet schema metadata."""
    missing = set(columns) ^ set(df.columns)
    if missing:
        raise ValueError(f"{path.name}: columns {sorted(missing)} are not both described and present")
    table = pa.Table.from_pandas(df[list(columns)], preserve_index=False)  # columns in the described order
    meta = {b"description": description.encode(), b"columns": json.dumps(columns).encode()}
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), path)


def concat_or_empty(frames: list[pd.DataFrame], dtypes: dict[str, str]) -> pd.DataFrame:
    """The frames concatenated, or an empty table with these columns and types (a disabled stage's output)."""
    if frames:
        return pd.concat(frames, ignore_index=True)
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


def read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing input; run the stage that writes it (dvc repro)")
    return pd.read_parquet(path)


@dataclass(frozen=True)
class RunTables:
    """The upstream tables the report reads, each read once: the attribution (every objective), the clusters
    (by cluster_id) and their members, θ_T's and the removed models' test outputs, the reference methods' scores
    and outputs, and the removal curve."""

    attribution: pd.DataFrame
    clusters: pd.DataFrame
    assignments: pd.DataFrame
    outputs: pd.DataFrame
    baselines: pd.DataFrame
    baseline_outputs: pd.DataFrame
    removal_curve: pd.DataFrame

    @classmethod
    def read(cls, paths: Paths) -> RunTables:
        return cls(
            attribution=read_parquet(paths.stage("attribute") / "attribution.parquet"),
            clusters=read_parquet(paths.stage("cluster") / "clusters.parquet").sort_values("cluster_id"),
            assignments=read_parquet(paths.stage("cluster") / "assignments.parquet"),
            outputs=read_parquet(paths.stage("perturb") / "outputs.parquet"),
            baselines=read_parquet(paths.stage("baselines") / "baselines.parquet"),
            baseline_outputs=read_parquet(paths.stage("baselines") / "outputs.parquet"),
            removal_curve=read_parquet(paths.stage("data_quality") / "removal_curve.parquet"),
        )


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_tensors(path: Path) -> Any:
    """torch.load restricted to tensors and plain containers (never arbitrary pickles)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing input; run the stage that writes it (dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, c: Checkpoint) -> None:
    torch.save(
        {"index": c.index, "epoch": c.epoch, "step": c.step, "lr": c.lr, "epochs": c.epochs, "state": c.state}, path
    )


def load_checkpoints(folder: Path) -> list[Checkpoint]:
    files = sorted(folder.glob("ckpt_*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no checkpoints; run train_target (dvc repro)")
    return [Checkpoint(**load_tensors(f)) for f in files]


BASE = -1  # cluster_id of the unperturbed target θ_T in outputs.parquet


def logits_table(outputs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(cluster_ids, test_index, logits (n_models, M, C)) from a long outputs table, sorted by ids."""
    outputs = outputs.sort_values(["cluster_id", "test_index", "class"])
    ids = outputs["cluster_id"].unique()
    tests = np.sort(outputs["test_index"].unique())
    logits = torch.from_numpy(outputs["logit"].to_numpy(np.float32, copy=True).reshape(len(ids), len(tests), -1))
    return ids, tests, logits


COST_COLUMNS = {
    "method": "method",
    "offline_seconds": "work that needs no test sample (gradients, factors, synsets, step calibration)",
    "online_seconds": "work that answers the queries: the (K, M) matrix for the M test samples",
    "online_seconds_per_query": "online seconds per test sample",
    "peak_memory_mb": "peak extra resident memory of the method (MiB)",
}


def long_scores(matrix: np.ndarray, cluster_ids: np.ndarray, test_index: np.ndarray) -> pd.DataFrame:
    """A (K, M) score matrix as a long table: one row (cluster_id, test_index, score) per cluster and test sample."""
    return pd.DataFrame(
        {
            "cluster_id": np.repeat(cluster_ids, len(test_index)),
            "test_index": np.tile(test_index, len(cluster_ids)),
            "score": matrix.reshape(-1),
        }
    )


def score_matrix(scores: pd.DataFrame) -> pd.DataFrame:
    """A long score table (one objective) as the wide (K, M) matrix: clusters in rows, test samples in columns, both
    ascending (the inverse of `long_scores`)."""
    return scores.pivot(index="cluster_id", columns="test_index", values="score").sort_index().sort_index(axis=1)


def long_logits(logits: np.ndarray, cluster_ids: np.ndarray, test_index: np.ndarray) -> pd.DataFrame:
    """Logits (K, M, C) of K models as a long table: one row (cluster_id, test_index, class, logit) per model, test
    sample and class (the inverse of `logits_table`)."""
    k, m, c = logits.shape
    return pd.DataFrame(
        {
            "cluster_id": np.repeat(cluster_ids, m * c),
            "test_index": np.tile(np.repeat(test_index, c), k),
            "class": np.tile(np.arange(c), k * m),
            "logit": logits.reshape(-1),
        }
    )
