"""The one place that builds task runners and fans per-cluster work out as Prefect tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ddm_ops.config import ExecutionParams


def task_runner(execution: ExecutionParams):
    """The Prefect task runner named by `execution.runner`."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if execution.runner == "process":
        return ProcessPoolTaskRunner(max_workers=execution.workers)
    return ThreadPoolTaskRunner(max_workers=1 if execution.runner == "serial" else execution.workers)


def fan_out(
    fn: Callable[..., Any], items: list[dict[str, Any]], key: str, execution: ExecutionParams, name: str
) -> list[Any]:
    """Run fn(**item) for every item as Prefect tasks on the configured runner; results in item order.

    `key` names the item field that identifies it (e.g. cluster_id); a failure names it.
    """
    import torch
    from prefect import flow, task

    threads = execution.threads_per_worker  # the same for every runner: results must not depend on it
    if execution.runner != "process":
        torch.set_num_threads(threads)
    unit = task(fn, name=name, task_run_name=f"{name}-{key}-{{{key}}}")

    @flow(name=f"{name}-fan-out", task_runner=task_runner(execution), validate_parameters=False)
    def fan_out_flow() -> list[Any]:
        futures = [unit.submit(**item, threads=threads) for item in items]
        results = []
        for item, future in zip(items, futures):
            try:
                results.append(future.result())
            except Exception as err:
                raise RuntimeError(f"{name}: {key} {item[key]} failed: {type(err).__name__}: {err}") from err
        return results

    return fan_out_flow()
