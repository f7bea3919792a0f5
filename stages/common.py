"""What stages share: project paths, atomic stage outputs, Parquet with described columns, checkpoints, metrics."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ddm_ops.config import Params, ParamsError
from ddm_ops.data import Dataset, load_dataset
from ddm_ops.evaluation import Truth
from ddm_ops.models import build_model, check_model_fits
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


@contextmanager
def peak_memory(record: dict[str, float], key: str, interval: float = 0.1) -> Iterator[None]:
    """record[key] = peak extra resident memory (MiB) of this process and its child processes during the block.

    Sampled every `interval` seconds (torch's CPU allocator is invisible to Python's tracemalloc), the list of child
    processes refreshed every second; on CUDA, also the peak of torch's GPU allocations under `<key>_gpu`.
    """
    import threading

    import psutil

    me = psutil.Process()
    family = [me]

    def resident() -> int:
        total = 0
        for p in family:
            try:
                total += p.memory_info().rss
            except psutil.Error:  # ended meanwhile
                pass
        return total

    base = resident()
    peak, done = [base], threading.Event()

    def sample() -> None:
        ticks = 0
        while not done.wait(interval):
            if ticks % round(1 / interval) == 0:
                family[:] = [me, *me.children(recursive=True)]
            ticks += 1
            peak[0] = max(peak[0], resident())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        done.set()
        sampler.join()
        record[key] = (max(peak[0], resident()) - base) / 2**20
        if torch.cuda.is_available():
            record[f"{key}_gpu"] = torch.cuda.max_memory_allocated() / 2**20


def write_parquet(df: pd.DataFrame, path: Path, description: str, columns: dict[str, str]) -> None:
    """Write `df` with the meaning of the table and of each column in the Parquet schema metadata."""
    missing = set(columns) ^ set(df.columns)
    if missing:
        raise ValueError(f"{path.name}: columns {sorted(missing)} are not both described and present")
    table = pa.Table.from_pandas(df, preserve_index=False)
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


@lru_cache(maxsize=4)
def dataset(params: Params) -> Dataset:
    """The run's dataset (cached per process: fan-out tasks in one worker load it once)."""
    return load_dataset(params.data)


def check_params_against_data(params: Params, ds: Dataset) -> None:
    """Checks that need the data: raise ParamsError before any training."""
    counts = np.bincount(ds.y_train.numpy(), minlength=ds.num_classes)
    if params.cluster.k_per_class > counts.min():
        raise ParamsError(
            f"cluster.k_per_class = {params.cluster.k_per_class}: must be at most the smallest class's training "
            f"size ({counts.min()} samples of class {counts.argmin()})"
        )
    k, ipc = params.cluster.k_per_class * ds.num_classes, params.distill.ipc
    if params.report.membership_references and k * ipc >= len(ds.y_train):
        raise ParamsError(
            f"report.membership_references = {params.report.membership_references}: the attack's reference models "
            f"train on the images no synset starts from, and {k} clusters x distill.ipc {ipc} use all "
            f"{len(ds.y_train)} training images; set it to 0 or lower distill.ipc"
        )
    check_model_fits(params.model, ds.image_shape)


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


def new_model(params: Params, ds: Dataset, seed: int | None = None) -> torch.nn.Module:
    return build_model(params.model, ds.image_shape, ds.num_classes, params.base.seed if seed is None else seed)


def save_checkpoint(path: Path, c: Checkpoint) -> None:
    torch.save(
        {"index": c.index, "epoch": c.epoch, "step": c.step, "lr": c.lr, "epochs": c.epochs, "state": c.state}, path
    )


def load_checkpoints(folder: Path) -> list[Checkpoint]:
    files = sorted(folder.glob("ckpt_*.pt"))
    if not files:
        raise FileNotFoundError(f"{folder}: no checkpoints; run train_target (dvc repro)")
    return [Checkpoint(**load_tensors(f)) for f in files]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_pixels(ax, pixels: torch.Tensor, title: str = "") -> None:
    """An image (C, H, W) in [0, 1] without axes: grey (dark ink on white) for one channel, else in colour."""
    image = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    ax.imshow(image, cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def nearest_members(assign: pd.DataFrame, cluster_id: int, n: int) -> pd.Index:
    """Training positions of the cluster's `n` members nearest its centroid (assignments.parquet as `assign`)."""
    return assign[assign["cluster_id"] == cluster_id].sort_values("centroid_distance").index[:n]


def show_image(ax, ds: Dataset, x: torch.Tensor, title: str = "") -> None:
    """A normalised image (C, H, W) of the dataset, de-normalised, without axes."""
    show_pixels(ax, ds.denormalise(x), title)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a figure; return its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
