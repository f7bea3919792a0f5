"""The Prefect flow: one task per DVC stage, read from dvc.yaml's own stage graph, each running dvc repro."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from graphlib import TopologicalSorter
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from ddm_ops.config import load_params
from pipeline.runners import running_api_url

FLOW_NAME = "ddm-pipeline"


def stage_graph(root: Path) -> dict[str, list[str]]:
    """{stage: [stages it depends on]} for the stages of dvc.yaml, from DVC's own index."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edge (a, b): stage a depends on stage b
        names = {s: s.name for s in graph.nodes if getattr(s, "cmd", None)}
        return {names[s]: sorted(names[d] for d in graph.successors(s) if d in names) for s in names}


DVC_HINTS = (  # what DVC says after every repro, seven times in a flow; the user commits once, at the end
    "To track the changes with git",
    "git add dvc.lock",
    "To enable auto staging",
    "dvc config core.autostage",
    "Use `dvc push`",
)


@task(name="dvc-repro", task_run_name="{stage}")
def repro_stage(stage: str, root: str) -> str:
    """`dvc repro --single-item <stage>`, with its output in the task's log; raises with the tail on failure."""
    logger = get_run_logger()
    env = dict(os.environ)
    api = running_api_url()
    if api:  # the per-cluster fan-out inside the stage then reports to the same server
        env["PREFECT_API_URL"] = api
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # stages call `python`
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tail: deque[str] = deque(maxlen=20)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        if line.strip() and not line.strip().startswith(DVC_HINTS):
            logger.info("%s", line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"stage {stage} failed (dvc repro exit {proc.returncode}):\n" + "\n".join(tail))
    return stage


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=1))  # DVC runs one stage at a time
def ddm_pipeline(root: str = ".") -> list[str]:
    """Run the DVC DAG stage by stage as Prefect tasks; return the stages in the order they ran."""
    project = Path(root).resolve()
    load_params(project / "params.yaml")  # bad params fail here, before any stage
    graph = stage_graph(project)
    futures = {}
    for stage in TopologicalSorter(graph).static_order():
        futures[stage] = repro_stage.submit(stage, str(project), wait_for=[futures[d] for d in graph[stage]])
    return [f.result() for f in futures.values()]


def deployment(cron: str, root: Path, name: str = "ddm"):
    """The scheduled deployment of the flow (what `serve` registers)."""
    return ddm_pipeline.to_deployment(name=name, cron=cron, parameters={"root": str(root.resolve())})


def deploy_to_pool(pool: str, root: Path, name: str = "ddm", cron: str | None = None):
    """Register the flow with a Prefect work pool (e.g. of GPU hosts that see `root` on a shared filesystem).

    The workers load the flow from `root` (pipeline/flow.py) and run the DAG there; returns the deployment id.
    """
    root = root.resolve()
    source = ddm_pipeline.from_source(source=str(root), entrypoint="pipeline/flow.py:ddm_pipeline")
    return source.deploy(
        name=name,
        work_pool_name=pool,
        cron=cron,
        parameters={"root": str(root)},
        build=False,
        push=False,
        print_next_steps=False,
    )
