"""The one place that builds task runners, places tasks on devices, and fans per-cluster work out as Prefect tasks.

serial / thread: threads of this process; process: a local process pool; dask: a local Dask cluster of
`workers` processes, or the scheduler at `address`; ray: a local Ray instance, or the cluster at `address`
(needs the `ray` extra). Every task pins torch to `threads_per_worker` threads, so results are byte-identical
whatever the runner; every per-cluster seed comes from the run's seed and the cluster id, never from the order
in which tasks run.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from ddm_ops.config import ExecutionParams, ParamsError
from ddm_ops.devices import resolve_device, tune_process

log = logging.getLogger(__name__)
RUNNING: list[str] = []  # ids of the fan-out flow runs in progress in this process


class _PrefectChatter(logging.Filter):
    """Prefect's per-run lines when its server is the temporary one a stage starts: its run links ("View at
    http://127.0.0.1:…") die with the stage, and a "Finished in state Completed()" per task says less than the
    fan-out's own progress lines. Warnings, errors and everything else pass."""

    NOISE = (
        "View at ",
        "Finished in state Completed()",
        "Beginning flow run",
        "Starting temporary server",
        "Stopping temporary server",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.getMessage().startswith(self.NOISE)


def quiet_prefect() -> None:
    """Drop Prefect's per-run chatter unless a Prefect server of your own (PREFECT_API_URL) keeps the runs."""
    if os.environ.get("PREFECT_API_URL"):
        return
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PrefectChatter) for f in logger.filters):
            logger.addFilter(_PrefectChatter())


def cancel_running_flow(timeout: float = 5.0) -> None:
    """Mark the fan-out flow runs in progress Cancelled on the Prefect server (best effort: at most `timeout`)."""
    from prefect import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True, httpx_settings={"timeout": timeout}) as client:
            for run_id in list(RUNNING):
                client.set_flow_run_state(run_id, Cancelled(message="interrupted (Ctrl-C)"), force=True)
    except Exception as err:  # the server may be gone too: the interrupt must still end the stage
        print(f"could not mark the flow run cancelled: {type(err).__name__}", file=sys.stderr)


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


class TaskFailed(RuntimeError):
    """A per-cluster item failed; the message names it."""


def run_items(fn: Callable[..., Any], items: list[dict[str, Any]], key: str, threads: int, label: str) -> list[Any]:
    """One Prefect task (`label` is its name in the UI): fn(**item) for each item in turn, in a tuned process."""
    tune_process(threads)
    if multiprocessing.parent_process() is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a worker process: the stage's own process handles Ctrl-C
    results = []
    for item in items:
        try:
            results.append(fn(**item))
        except Exception as err:
            raise TaskFailed(f"{key} {item[key]} failed: {type(err).__name__}: {err}") from err
    return results


def running_api_url() -> str | None:
    """The Prefect API this process talks to: the configured one, or the temporary server it started."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    server = SubprocessASGIServer._instances.get(None)
    return server.api_url if server is not None and server.running else None


@contextmanager
def shared_prefect_api() -> Iterator[None]:
    """One Prefect API for this process and every worker process it starts.

    Without a configured PREFECT_API_URL each process pool or Dask worker would start a temporary server of its own
    (seconds of start-up and a busy core each, measured); a temporary server is started here instead, once, and its
    address is passed to the workers through their environment.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = running_api_url()
    if url is None:  # stopped at exit, after the last logs are sent
        server = SubprocessASGIServer()
        server.start()
        url = server.api_url
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def chunked(items: list[Any], execution: ExecutionParams) -> list[list[Any]]:
    """Items grouped into tasks: `items_per_task` each, or ("auto") about four balanced tasks per worker."""
    if execution.items_per_task == "auto":
        edges = np.linspace(0, len(items), min(len(items), 4 * execution.workers) + 1).round().astype(int)
        return [items[a:b] for a, b in zip(edges[:-1], edges[1:])]
    size = execution.items_per_task
    return [items[i : i + size] for i in range(0, len(items), size)]


class Progress:
    """Items done in a fan-out: a bar in a terminal, else a log line at every tenth of the work (DVC's logs, CI);
    and a Prefect progress artifact on the flow run, which the Prefect UI shows."""

    def __init__(self, name: str, total: int, unit: str):
        from prefect.artifacts import create_progress_artifact
        from tqdm import tqdm

        self.name, self.total, self.unit, self.done = name, total, unit, 0
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=name, unit=unit, disable=not self.terminal)
        self.artifact = create_progress_artifact(0.0, key=f"{name}-progress", description=self._text())
        self.start, self.logged = time.perf_counter(), 0

    def _text(self) -> str:
        return f"{self.name}: {self.done} of {self.total} {self.unit}s done"

    def advance(self, n: int) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += n
        self.bar.update(n)
        update_progress_artifact(self.artifact, 100.0 * self.done / self.total, description=self._text())
        if not self.terminal and (10 * self.done // self.total > 10 * self.logged // self.total):
            self.logged = self.done
            log.info("%s in %.0f s", self._text(), time.perf_counter() - self.start)

    def close(self) -> None:
        self.bar.close()


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
    name: str,
    execution: ExecutionParams,
    device: str = "cpu",
) -> list[Any]:
    """Run fn(**item) for every item as Prefect tasks on the configured runner; results in item order.

    Items are grouped into tasks by `chunked` ("auto": about four balanced tasks per worker, which keeps Prefect's
    per-task cost small next to the work). `key` names the item field that identifies it (e.g.
    cluster_id): an item that still fails after `execution.retries` retries of its task fails the whole fan-out
    with that id in the error; a retried task redoes its items (fn skips the ones it already finished).
    """
    from prefect import flow, task

    chunks = chunked(items, execution)
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
        from prefect.futures import as_completed
        from prefect.runtime import flow_run

        RUNNING.append(flow_run.id)

        with _placement(execution, device):
            futures = [unit.submit(fn, chunk, key, threads, label(chunk)) for chunk in chunks]
        position = {id(f): i for i, f in enumerate(futures)}
        results: dict[int, list[Any]] = {}
        progress = Progress(name, len(items), key.removesuffix("_id"))
        try:
            for future in as_completed(futures):
                i = position[id(future)]
                try:
                    results[i] = future.result()
                except TaskFailed as err:
                    raise RuntimeError(f"{name}: {err}") from err
                progress.advance(len(chunks[i]))
        finally:
            progress.close()
            RUNNING.remove(flow_run.id)
        return [r for i in range(len(chunks)) for r in results[i]]

    if execution.runner in ("serial", "thread"):
        tune_process(threads)
    quiet_prefect()
    with shared_prefect_api():
        return fan_out_flow()


def executor(execution: ExecutionParams, device: str = "cpu") -> Callable[..., list[Any]]:
    """The fan-out a stage is handed (`stages.common.FanOut`): Prefect tasks on the runner `execution` names."""
    return functools.partial(fan_out, execution=execution, device=device)
