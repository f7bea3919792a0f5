"""The one place that builds task runners, places tasks on devices, and fans per-cluster work out as Prefect tasks.

serial / thread: threads of this process; process: a local process pool; dask: a local Dask cluster of
`workers` processes, or the scheduler at `address`; ray: a local Ray instance, or the cluster at `address`
(needs the `ray` extra). Every task pins torch to `threads_per_worker` threads, so results are byte-identical
whatever the runner; every per-cluster seed comes from the run's seed and the cluster id, never from the order
in which tasks run.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from ddm_ops.config import ExecutionParams, ParamsError
from ddm_ops.devices import resolve_device

M_TRIM_THRESHOLD, M_TOP_PAD = -1, -2  # glibc mallopt parameters


def _gpu_tasks(device: str) -> bool:
    return resolve_device(device).type == "cuda"


def task_runner(execution: ExecutionParams, device: str = "cpu"):
    """The Prefect task runner named by `execution.runner` (with one GPU per worker when `device` is CUDA)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if execution.runner == "process":
        return ProcessPoolTaskRunner(max_workers=execution.workers)
    if execution.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if execution.address:
            return DaskTaskRunner(address=execution.address)
        resources = {"resources": {"GPU": 1}} if _gpu_tasks(device) else {}
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": execution.workers,
                "threads_per_worker": 1,
                "processes": True,
                "host": "127.0.0.1",
                "dashboard_address": "127.0.0.1:0",
                **resources,
            },
        )
    if execution.runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise ParamsError("execution.runner = 'ray' needs the ray extra: pip install -e '.[ray]'") from err
        if execution.address:
            return RayTaskRunner(address=execution.address)
        return RayTaskRunner(
            init_kwargs={"num_cpus": execution.workers, "include_dashboard": False, "log_to_driver": False}
        )
    return ThreadPoolTaskRunner(max_workers=1 if execution.runner == "serial" else execution.workers)


def worker_slot() -> int:
    """A number identifying the worker running this task: the Dask worker's name, else the process id."""
    try:
        from distributed import get_worker

        name = get_worker().name
        return int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        return os.getpid() if multiprocessing.parent_process() is not None else 0


def task_device(spec: str) -> torch.device:
    """The device of a per-cluster task: with several GPUs and no index given, one GPU per worker."""
    device = resolve_device(spec)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return torch.device("cuda", worker_slot() % torch.cuda.device_count())
    return device


def tune_process(threads: int) -> None:
    """Pin torch to `threads` threads and stop glibc's heap from shrinking and growing around every small tensor.

    Dask workers start with MALLOC_TRIM_THRESHOLD_=65536, which made this project's small-tensor work 2.7x
    slower in them than in a plain process (measured); raising the trim threshold and the top pad undoes it.
    No effect on results; nothing happens where the C library is not glibc.
    """
    torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_TOP_PAD, 64 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


class TaskFailed(RuntimeError):
    """A per-cluster item failed; the message names it."""


def run_items(fn: Callable[..., Any], items: list[dict[str, Any]], key: str, threads: int, label: str) -> list[Any]:
    """One Prefect task (`label` is its name in the UI): fn(**item) for each item in turn, in a tuned process."""
    tune_process(threads)
    results = []
    for item in items:
        try:
            results.append(fn(**item))
        except Exception as err:
            raise TaskFailed(f"{key} {item[key]} failed: {type(err).__name__}: {err}") from err
    return results


def _placement(execution: ExecutionParams, device: str):
    """Context in which tasks are submitted: ask Dask/Ray for one GPU per task when running on CUDA."""
    if not _gpu_tasks(device):
        return nullcontext()
    if execution.runner == "dask":
        import dask

        return dask.annotate(resources={"GPU": 1})
    if execution.runner == "ray":
        from prefect_ray.context import remote_options

        return remote_options(num_gpus=1)
    return nullcontext()


def fan_out(
    fn: Callable[..., Any],
    items: list[dict[str, Any]],
    key: str,
    execution: ExecutionParams,
    name: str,
    device: str = "cpu",
) -> list[Any]:
    """Run fn(**item) for every item as Prefect tasks on the configured runner; results in item order.

    Items are grouped `execution.items_per_task` to a task ("auto": about four tasks per worker, which keeps
    Prefect's per-task cost small next to the work). `key` names the item field that identifies it (e.g.
    cluster_id): an item that still fails after `execution.retries` retries of its task fails the whole fan-out
    with that id in the error; a retried task redoes its items (fn skips the ones it already finished).
    """
    from prefect import flow, task

    size = execution.items_per_task
    if size == "auto":
        size = max(1, math.ceil(len(items) / (4 * execution.workers)))
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    unit = task(
        run_items,
        name=name,
        task_run_name="{label}",
        retries=execution.retries,
        retry_delay_seconds=execution.retry_delay_seconds,
    )
    threads = execution.threads_per_worker  # the same for every runner: results must not depend on it

    def label(chunk: list[dict[str, Any]]) -> str:
        ids = f"{chunk[0][key]}" if len(chunk) == 1 else f"{chunk[0][key]}..{chunk[-1][key]}"
        return f"{name}-{key}-{ids}"

    @flow(name=f"{name}-fan-out", task_runner=task_runner(execution, device), validate_parameters=False)
    def fan_out_flow() -> list[Any]:
        with _placement(execution, device):
            futures = [unit.submit(fn, chunk, key, threads, label(chunk)) for chunk in chunks]
        results = []
        for future in futures:
            try:
                results.extend(future.result())
            except TaskFailed as err:
                raise RuntimeError(f"{name}: {err}") from err
        return results

    if execution.runner in ("serial", "thread"):
        tune_process(threads)
    return fan_out_flow()
