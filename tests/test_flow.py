"""The Prefect flow: one task per DVC stage, from dvc.yaml's graph; per-cluster tasks; the scheduled deployment."""

from __future__ import annotations

import asyncio

import pytest
from conftest import TINY, make_project

from stages import STAGES


async def _task_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


async def _flow_runs_named_during(name, flow_run_id):
    """Flow runs of flow `name` that started while the flow run `flow_run_id` ran (other tests share the server)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        outer = await client.read_flow_run(flow_run_id)
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    return [r for r in runs if r.start_time and outer.start_time <= r.start_time <= outer.end_time]


async def _log_lines(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_flow_runs_one_task_per_dvc_stage(tmp_path):
    from pipeline.flow import ddm_pipeline, stage_graph

    folder = make_project(tmp_path / "proj", TINY)
    graph = stage_graph(folder)
    assert graph["distill"] == ["cluster", "curvature", "train_target"] and graph["train_target"] == []
    assert set(graph) == set(STAGES)
    state = ddm_pipeline(str(folder), return_state=True)
    assert state.is_completed(), state.message
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert sorted(r.name for r in runs) == sorted(STAGES)
    assert all(r.state.is_completed() for r in runs)
    order = [r.name for r in sorted(runs, key=lambda r: r.start_time)]
    assert order.index("train_target") < order.index("distill") < order.index("perturb") < order.index("report")
    # the stage's per-cluster fan-out reported to the same server: TINY asks for one cluster per task
    fan_out = asyncio.run(_flow_runs_named_during("distill-fan-out", state.state_details.flow_run_id))
    assert len(fan_out) == 1, "the distill stage's flow did not report to the flow's server"
    tasks = asyncio.run(_task_runs(fan_out[0].id))
    assert sorted(t.name for t in tasks) == sorted(f"distill-cluster_id-{c}" for c in range(20))
    assert (folder / "outputs/attribute/attribution.parquet").is_file()
    lines = asyncio.run(_log_lines(state.state_details.flow_run_id))  # each stage's output, without DVC's hints
    assert "Running stage 'distill':" in lines and not any("git add dvc.lock" in line for line in lines)


def test_bad_params_fail_the_flow_before_any_stage(tmp_path):
    from ddm_ops.config import ParamsError
    from pipeline.flow import ddm_pipeline

    folder = make_project(tmp_path / "bad", {**TINY, "distill": {"direction": "backwards"}})
    with pytest.raises(ParamsError, match="distill.direction = 'backwards'"):
        ddm_pipeline(str(folder))
    assert not (folder / "outputs").exists()


def test_serve_registers_a_cron_deployment(tmp_path):
    from prefect import get_client

    from pipeline.flow import deployment

    deployment_id = deployment("0 3 * * *", tmp_path, name="nightly").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    d = asyncio.run(read())
    assert d.name == "nightly" and d.parameters == {"root": str(tmp_path.resolve())}
    assert [s.schedule.cron for s in d.schedules] == ["0 3 * * *"]


def test_deploy_registers_the_flow_with_a_work_pool(tmp_path):
    from conftest import ROOT
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from pipeline.flow import deploy_to_pool

    async def create_pool():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="gpu-hosts", type="process"))

    asyncio.run(create_pool())
    deployment_id = deploy_to_pool("gpu-hosts", ROOT, name="on-gpus", cron="0 4 * * *")

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    d = asyncio.run(read())
    assert d.work_pool_name == "gpu-hosts" and d.entrypoint == "pipeline/flow.py:ddm_pipeline"
    assert d.parameters == {"root": str(ROOT)} and [s.schedule.cron for s in d.schedules] == ["0 4 * * *"]
