"""What stages share besides their files: the run's dataset and models, the fan-out they are handed (the pipeline
passes Prefect's; used as a library, a stage runs its items here, in turn), and nested results as dotted keys."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

import torch

from ddm_ops.config import Params
from ddm_ops.data import Dataset, load_dataset
from ddm_ops.models import build_model


@lru_cache(maxsize=4)
def dataset(params: Params) -> Dataset:
    """The run's dataset (cached per process: fan-out tasks in one worker load it once)."""
    return load_dataset(params.data)


def new_model(params: Params, ds: Dataset, seed: int | None = None) -> torch.nn.Module:
    return build_model(params.model, ds.image_shape, ds.num_classes, params.base.seed if seed is None else seed)


class FanOut(Protocol):
    """fn(**item) for every item, results in item order; `key` names the field identifying an item (cluster_id, job)
    in errors and progress, `name` the work (distill, retrain)."""

    def __call__(self, fn: Callable[..., Any], items: list[dict[str, Any]], key: str, name: str) -> list[Any]: ...


def in_process(fn: Callable[..., Any], items: list[dict[str, Any]], key: str, name: str) -> list[Any]:
    """Every item in this process, in turn: the fan-out of a stage called without the pipeline."""
    return [fn(**item) for item in items]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
