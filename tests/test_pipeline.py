"""End to end in a temporary git + DVC project: dvc repro, caching, params, experiments, MLflow, Prefect."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, TINY, chromium, dvc, make_project, write_params

from stages import STAGES

SCHEMAS = {
    "cluster/assignments.parquet": ["train_index", "label", "cluster_id", "centroid_distance", "is_noisy"],
    "cluster/clusters.parquet": ["cluster_id", "label", "size"],
    "train_target/history.parquet": ["epoch", "step", "lr", "loss", "test_accuracy"],
    "record_trajectory/trajectory.parquet": [
        "checkpoint",
        "epoch",
        "step",
        "lr",
        "epochs",
        "path",
        "param_norm",
        "distance_to_final",
    ],
    "distill/matching.parquet": ["cluster_id", "iteration", "loss"],
    "perturb/outputs.parquet": ["cluster_id", "test_index", "class", "logit"],
    "attribute/attribution.parquet": ["cluster_id", "test_index", "objective", "score", "dist1", "dist2", "dist3"],
}


def ran(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stdout + result.stderr
    return re.findall(r"Running stage '(\w+)'", result.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_project(tmp_path_factory.mktemp("proj"), TINY)
    assert ran(dvc(folder, "repro")) == list(STAGES)
    return folder


def test_repro_writes_every_artifact_with_its_schema(project):
    out = project / "outputs"
    for rel, columns in SCHEMAS.items():
        table = pq.read_table(out / rel)
        assert table.column_names == columns, rel
        assert b"description" in table.schema.metadata, rel
    assign = pd.read_parquet(out / "cluster/assignments.parquet")
    assert len(assign) == 200 and assign.groupby("cluster_id")["label"].nunique().max() == 1
    assert assign["cluster_id"].nunique() == 20
    attribution = pd.read_parquet(out / "attribute/attribution.parquet")
    assert len(attribution) == 20 * 60 * 3 and set(attribution["objective"]) == {"margin", "loss", "probability"}
    assert attribution["score"].abs().sum() > 0 and (attribution["dist1"] >= 0).all()
    assert ((attribution["dist3"] > 0) & (attribution["dist3"] <= 1)).all()
    outputs = pd.read_parquet(out / "perturb/outputs.parquet")
    assert sorted(outputs["cluster_id"].unique()) == [-1, *range(20)]
    synset = torch.load(out / "distill/synset.pt", weights_only=True)
    assert synset["images"].shape == (20, 1, 1, 8, 8) and synset["labels"].shape == (20, 1, 10)
    assert torch.allclose(synset["labels"].sum(-1), torch.ones(20, 1))
    assert len(list((out / "train_target/checkpoints").glob("ckpt_*.pt"))) == 5
    for stage in STAGES:
        assert json.loads((out / stage / "metrics.json").read_text())["stage_seconds"] > 0
    report = (out / "report/report.md").read_text()
    assert "![heatmap](figures/heatmap.png)" in report and (out / "report/figures/heatmap.png").stat().st_size > 1000
    assert not list(out.glob(".*staging"))


def test_second_repro_runs_nothing_and_a_param_reruns_exactly_its_stages(project):
    assert ran(dvc(project, "repro")) == []
    params = copy.deepcopy(TINY)
    params["perturb"]["step_size"] = 0.002
    write_params(project, params)
    # data_quality ranks the data by DDM's attribution, so it follows the removal step too (a second when disabled);
    # baselines copies the whole perturb block into its DDM variants, so dvc.yaml declares it (tests/test_layers.py)
    assert ran(dvc(project, "repro")) == ["perturb", "attribute", "baselines", "data_quality", "report"]
    params["execution"]["runner"] = "thread"  # how work is spread is not a dependency
    write_params(project, params)
    assert ran(dvc(project, "repro")) == []


def test_dvc_experiments_compare_metrics_and_plots_across_commits(project):
    """The user's sequence: run, commit, `dvc exp run -S`, then exp show / metrics diff / plots diff."""
    git = lambda *a: subprocess.run(["git", *a], cwd=project, check=True, capture_output=True, text=True)  # noqa: E731
    git("add", "-A")
    git("commit", "-qm", "lock")
    tracked = set(git("ls-files", "outputs").stdout.split())
    small = {f"outputs/{s}/metrics.json" for s in STAGES} | {
        "outputs/train_target/history.csv",
        "outputs/distill/matching_curve.csv",
        "outputs/report/methods.csv",
        "outputs/report/cluster_effects.csv",
    }
    assert tracked == small  # git holds the metrics and plot files, DVC's cache everything else
    # forward matching (baselines) distils with DDM's distill params, for a like-for-like comparison
    expected = ["distill", "perturb", "attribute", "baselines", "data_quality", "report"]
    assert ran(dvc(project, "exp", "run", "-S", "distill.ipc=2", "-n", "ipc2")) == expected
    synset = torch.load(project / "outputs/distill/synset.pt", weights_only=True)
    assert synset["images"].shape[1] == 2
    shown = dvc(project, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    baseline = next(r for r in json.loads(shown.stdout) if r["rev"] != "workspace")
    experiment = baseline["experiments"][0]["revs"][0]
    assert experiment["name"] == "ipc2"
    losses = [
        rev["data"]["metrics"]["outputs/report/metrics.json"]["data"]["matching_loss_last"]
        for rev in (baseline, experiment)
    ]
    assert losses[0] != losses[1]  # both runs' metrics, and they differ
    diff = dvc(project, "metrics", "diff", "HEAD", "ipc2", "--json")
    assert diff.returncode == 0, diff.stderr
    assert "matching_loss_last" in json.loads(diff.stdout)["outputs/distill/metrics.json"]
    plots = dvc(project, "plots", "diff", "HEAD", "ipc2", "--json")
    assert plots.returncode == 0, plots.stderr
    for name, (plot,) in json.loads(plots.stdout)["data"].items():
        assert plot["revisions"] == ["HEAD", "ipc2"], name
        assert len({v["rev"] for v in plot["content"]["data"]["values"]}) == 2, name
    # back to the committed params: DVC may restore stages from its run cache, never the report, which logs its run
    assert ran(dvc(project, "exp", "run", "-S", "distill.ipc=1", "-n", "ipc1-again"))[-1] == "report"
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddm").experiment_id])
    assert {"ipc2", "ipc1-again"} <= {r.info.run_name for r in runs}


def test_every_pipeline_run_is_an_mlflow_run_with_nested_stage_runs(project):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddm")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 1
    first = parents[0]
    assert 0.5 < first.data.metrics["test_accuracy"] <= 1.0
    assert first.data.metrics["online_seconds"] > 0 and first.data.params["distill.ipc"] == "1"
    assert first.data.tags["dataset"] == "digits"
    artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"attribution.parquet", "assignments.parquet", "report.md", "figures"} <= artifacts
    figures = {a.path for a in client.list_artifacts(first.info.run_id, "figures")}
    assert {"figures/heatmap.png", "figures/synsets.png"} <= figures
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(s for s in STAGES if s != "report")
    assert [d.dataset.name for d in first.inputs.dataset_inputs] == ["attribution"]
    assert "attribution_margin.json" in artifacts and "methods.json" not in artifacts  # no ground truth: no methods
    distill = next(r for r in children if r.data.tags["stage"] == "distill")
    assert distill.data.params["distill.pairing"] == "checkpoint" and "train.lr" not in distill.data.params
    assert distill.data.metrics["distill_seconds"] > 0
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    history = pd.read_csv(project / "outputs/train_target/history.csv")
    trained = next(r for r in children if r.data.tags["stage"] == "train_target")
    for run_id, key in ((first.info.run_id, "train_target/loss"), (trained.info.run_id, "loss")):
        losses = client.get_metric_history(run_id, key)
        assert [m.step for m in losses] == [0, 1, 2, 3] and [m.value for m in losses] == pytest.approx(history["loss"])
    matching = client.get_metric_history(distill.info.run_id, "loss_median")
    assert [m.step for m in matching] == list(range(5))  # distill.iterations
    assert len(client.get_metric_history(first.info.run_id, "distill/loss_median")) == 5
    seconds = {r.data.tags["stage"]: r.data.metrics["stage_seconds"] for r in children}
    spans = {r.data.tags["stage"]: (r.info.end_time - r.info.start_time) / 1000 for r in children}
    assert spans == pytest.approx(seconds, abs=0.002)  # each stage's run lasts its stage's seconds
    assert (first.info.end_time - first.info.start_time) / 1000 >= sum(seconds.values())  # the parent spans them


def test_bad_params_fail_before_training_and_leave_no_output(tmp_path):
    params = copy.deepcopy(TINY)
    params["cluster"]["k_per_class"] = 50  # the tiny subset has ~20 samples per class
    folder = make_project(tmp_path / "bad", params)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "train_target"], cwd=folder, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "cluster.k_per_class = 50: must be at most the smallest class's training size" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (folder / "outputs" / "train_target").exists()
    params["distill"]["pairing"] = "fifo"
    write_params(folder, params)
    result = dvc(folder, "repro")
    assert result.returncode != 0 and "distill.pairing = 'fifo'" in result.stderr + result.stdout
    assert not (folder / "outputs" / "train_target").exists()


def test_explain_one_test_sample(project):
    index = int(pd.read_parquet(project / "outputs/attribute/attribution.parquet")["test_index"].iloc[0])
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "explain", "--test-index", str(index), "--top", "3"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"test sample {index}: class" in done.stdout and "predicted" in done.stdout
    helpful = done.stdout.split("most helpful clusters:")[1].split("most harmful clusters:")[0]
    assert len([line for line in helpful.strip().splitlines()[1:] if line.strip()]) == 3
    assert (project / f"outputs/explain/test-{index}.png").stat().st_size > 5000
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "explain", "--test-index", "99999"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--test-index 99999: not among this run's 60 test samples" in bad.stderr


def test_dvc_plots_each_once_none_empty_and_the_page_renders_offline(project, tmp_path):
    done = dvc(project, "plots", "show", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)["data"]
    assert sorted(shown) == [
        "Gradient matching loss (median over clusters)",
        "Total effect of each cluster on the test set",
        "Training of the target",
    ]
    for name, plots in shown.items():
        assert len(plots) == 1 and len(plots[0]["content"]["data"]["values"]) >= 4, name
    history = pd.read_csv(project / "outputs/train_target/history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3] and history["loss"].iloc[-1] < history["loss"].iloc[0]
    template = ROOT / ".dvc" / "plots_template.html"
    assert template.is_file(), "make setup writes .dvc/plots_template.html (python -m pipeline.vega)"
    shutil.copy(template, project / ".dvc" / "plots_template.html")
    assert dvc(project, "config", "--local", "plots.html_template", "plots_template.html").returncode == 0
    page = tmp_path / "plots"
    assert dvc(project, "plots", "show", "-o", str(page)).returncode == 0
    text = (page / "index.html").read_text()
    assert "<script src" not in text  # nothing loaded from elsewhere
    browser = chromium("--proxy-server=127.0.0.1:9")  # no network
    try:
        browser.get((page / "index.html").as_uri())
        browser.set_window_size(1000, 1600)
        drawn = browser.execute_script("return document.querySelectorAll('.vega-embed canvas').length")
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        shot = ROOT / "outputs" / "screenshots" / "dvc_plots.png"  # kept as a CI artifact
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert drawn == 3 and not errors, (drawn, errors)
