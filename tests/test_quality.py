"""The evaluation branch end to end on a small config: ground truth, calibration, baselines, quality metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, reproduced

SMALL = {
    **TINY,
    "data": {"name": "digits", "subset": {"train": 300, "test": 100, "seed": 0}},
    "model": {"name": "convnet", "width": 16, "depth": 2},
    "train": {"epochs": 15, "batch_size": 32, "lr": 0.05, "checkpoint_every": 1},
    "distill": {"ipc": 4, "iterations": 60, "checkpoints": 3},
    "ground_truth": {"enabled": True, "subsets": 8, "seeds": 2, "calibration_clusters": 2},
    "baselines": {
        "enabled": True,
        "methods": [
            "ddm_paper",
            "first_order",
            "gradient_ascent",
            "forward_matching",
            "tracin",
            "trak",
            "trak_ensemble",
            "ekfac",
            "ekfac_ensemble",
        ],
        "trak_models": 3,
        "ekfac_models": 3,
    },
    "perturb": {"step_size": "auto"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return reproduced(tmp_path_factory.mktemp("quality"), SMALL)


def test_ground_truth_tables(project):
    out = project / "outputs" / "ground_truth"
    retrain = pd.read_parquet(out / "retrain.parquet")
    assert list(pq.read_schema(out / "retrain.parquet").names) == [
        "flavour",
        "removal",
        "cluster_id",
        "subset_id",
        "seed",
        "test_index",
        "class",
        "logit",
    ]
    jobs = retrain.groupby(["flavour", "removal", "seed"])[["cluster_id", "subset_id"]].nunique()
    assert jobs.loc[("aligned", "cluster", 0), "cluster_id"] == 20
    assert jobs.loc[("resampled", "subset", 2), "subset_id"] == 8
    assert sorted(retrain["seed"].unique()) == [0, 1, 2]
    masks = pd.read_parquet(out / "masks.parquet")
    clusters = pd.read_parquet(project / "outputs/cluster/clusters.parquet")
    kept = masks[masks["kept"]].merge(clusters, on="cluster_id").groupby(["subset_id", "label"]).size()
    assert (kept == 1).all()  # every class keeps one of its two clusters in every subset
    roles = pd.read_parquet(out / "roles.parquet")
    assert (roles["role"] == "calibration").sum() == 2
    # the aligned full-data retraining is the target itself
    target = pd.read_parquet(project / "outputs/perturb/outputs.parquet").query("cluster_id == -1")
    full = retrain.query("flavour == 'aligned' and removal == 'full'")
    assert (full["logit"].to_numpy() == target["logit"].to_numpy()).all()


def test_ground_truth_on_the_thread_runner_equals_the_serial_one(project, tmp_path, monkeypatch):
    """The default runner retrains two models at once in two threads: its retrain.parquet is the serial one's, bit
    for bit (the project's ground truth ran on the serial runner), and nothing came from a cache."""
    from ddm_ops.config import load_params
    from pipeline.runners import executor
    from stages import ground_truth
    from stages.artifacts import Paths

    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path / "fresh"))
    params = load_params(project / "params.yaml")
    threaded = params.execution.model_copy(update={"runner": "thread", "workers": 2, "items_per_task": 1})
    out = tmp_path / "ground_truth"
    out.mkdir()
    threads = torch.get_num_threads()
    metrics = ground_truth.run(
        params.model_copy(update={"execution": threaded}), Paths(project), out, executor(threaded)
    )
    torch.set_num_threads(threads)
    assert metrics["n_cached"] == 0 and metrics["n_retrainings"] == 3 * (1 + 20 + 8)
    serial = pd.read_parquet(project / "outputs/ground_truth/retrain.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(out / "retrain.parquet"), serial, check_exact=True)


def test_cache_key_changes_with_everything_that_changes_a_retraining(tmp_path, monkeypatch):
    import shutil

    from ddm_ops.config import Params
    from stages import retraining

    params = Params.model_validate(TINY)
    keep, cpu = np.ones(200, dtype=bool), torch.device("cpu")

    def key(p=params, seed=0, keep=keep, device=cpu, **blocks):
        for block, update in blocks.items():
            p = p.model_copy(update={block: getattr(p, block).model_copy(update=update)})
        return retraining.cache_key(p, seed, keep, device)

    base = key()
    assert key(execution={"runner": "thread", "workers": 2}) == base  # the runner does not change a retraining
    library = tmp_path / "ddm_ops"
    shutil.copytree(retraining.LIBRARY, library, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(retraining, "LIBRARY", library)
    assert key() == base
    user = tmp_path / "user"
    user.mkdir()
    (user / "mynet.py").write_text("from ddm_ops.models import MLP as Net\n")
    monkeypatch.syspath_prepend(str(user))
    mine = Params.model_validate({**TINY, "model": {**TINY["model"], "name": "mynet:Net"}})
    own = key(p=mine)
    changed = {
        "seed": key(seed=1),
        "kept samples": key(keep=np.r_[False, keep[1:]]),
        "data": key(data={"test_fraction": 0.3}),
        "model": key(model={"width": 9}),
        "train": key(train={"lr": 0.1}),
        "threads per task": key(execution={"threads_per_worker": 2}),
        "device": key(device=torch.device("meta")),
        "user model": own,
    }
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.0")
        changed["torch version"] = key()
    (library / "train.py").write_text((library / "train.py").read_text() + "\n# changed\n")
    changed["ddm_ops code"] = key()
    (library / "train.py").write_text((library / "train.py").read_text().removesuffix("\n# changed\n"))
    assert key() == base
    (library / "objectives.py").write_text((library / "objectives.py").read_text() + "\n# changed\n")
    changed["ddm_ops code training imports"] = key()
    (library / "objectives.py").write_text((library / "objectives.py").read_text().removesuffix("\n# changed\n"))
    (library / "distill.py").write_text((library / "distill.py").read_text() + "\n# changed\n")
    assert key() == base  # the method's code does not change a retraining
    (library / "config.py").write_text((library / "config.py").read_text() + "\n# changed\n")
    assert key() == base  # nor do the params' definitions: their values are in the key
    (user / "mynet.py").write_text("from ddm_ops.models import MLP as Net  # changed\n")
    changed["user module code"] = key(p=mine)
    assert base not in changed.values() and len(set(changed.values())) == len(changed), changed


def test_ground_truth_is_deterministic(project, tmp_path, monkeypatch):
    """Retraining again from scratch (a fresh cache), as a fan-out task does, gives byte-identical logits."""
    from ddm_ops.config import load_params
    from pipeline.runners import run_items
    from stages.retraining import retrain_one

    retrain = pd.read_parquet(project / "outputs/ground_truth/retrain.parquet")
    assert len(retrain) == 3 * (1 + 20 + 8) * 100 * 10
    masks = pd.read_parquet(project / "outputs/ground_truth/masks.parquet")
    params = load_params(project / "params.yaml").model_dump()
    monkeypatch.setenv("DDM_CACHE_DIR", str(tmp_path / "fresh"))
    jobs = {  # one retraining of each kind: without one cluster (aligned), with one subset (resampled seed)
        "flavour == 'aligned' and cluster_id == 3": ("c3", [3], 0),
        "seed == 1 and subset_id == 2": ("m2", masks.query("subset_id == 2 and not kept")["cluster_id"].tolist(), 1),
    }
    items = [{"root": str(project), "params": params, "job": j, "removed": r, "seed": s} for j, r, s in jobs.values()]
    threads = torch.get_num_threads()
    done = run_items(retrain_one, items, "job", threads=1, label="again")
    torch.set_num_threads(threads)
    for query, d in zip(jobs, done):
        assert not d["cached"]
        logits = torch.load(d["path"], weights_only=True)["logits"].numpy().reshape(-1)
        expected = retrain.query(query).sort_values(["test_index", "class"])["logit"].to_numpy()
        assert np.array_equal(logits, expected), query  # identical, bit for bit


def test_quality_metrics_and_regression(project):
    report = json.loads((project / "outputs/report/metrics.json").read_text())
    for method in ("ddm", "first_order", "gradient_ascent", "class_indicator", "input_similarity"):
        assert f"{method}.logo_margin_aligned" in report
    assert report["step_size"] > 0
    assert report["reference.fidelity_do_nothing"] > 0 and report["reference.fidelity_seed_noise"] > 0
    assert "reference.ceiling_lds_margin" in report
    # speed is measured by benchmarks/ (timed tests are not honest on shared cores); here only its definition
    assert report["speedup_vs_retraining"] == pytest.approx(
        report["seconds_per_retraining"] / report["seconds_per_removal"]
    )
    print({k: round(v, 3) for k, v in report.items() if k.startswith(("ddm", "reference", "speedup"))})
    # regression thresholds, measured on this config: LOGO 0.188 (DDM), 0.387 (noise ceiling); the within-class
    # halves leave the class indicator without any group-LDS signal (a constant prediction)
    assert report["ddm.logo_margin_aligned"] >= 0.12
    assert report["reference.ceiling_logo_margin"] >= 0.3
    assert "class_indicator.lds_margin_aligned" not in report
    md = (project / "outputs/report/report.md").read_text()
    assert "## Quality against retraining" in md
    for figure in ("predicted_vs_true", "logo_per_test", "fidelity"):
        assert (project / "outputs/report/figures" / f"{figure}.png").stat().st_size > 1000


def test_one_row_per_method_with_quality_and_costs(project):
    methods = pd.read_parquet(project / "outputs/report/methods.parquet").set_index("method")
    expected = {"ddm", "ddm_paper", "first_order", "gradient_ascent", "forward_matching", "tracin", "trak"}
    assert expected | {"trak_ensemble", "ekfac", "ekfac_ensemble", "input_similarity", "class_indicator"} == set(
        methods.index
    )
    lds = methods["group-LDS"]
    # group-LDS over 8 subsets, measured: DDM 0.434, the paper's DDM 0.183, gradient ascent 0.015, EK-FAC 0.562
    assert methods["LOGO Spearman"].notna().all() and lds["ddm"] > 0.3 and lds["ddm"] > lds["ddm_paper"] + 0.1, lds
    assert lds["gradient_ascent"] < 0.2 and np.isnan(lds["class_indicator"])  # constant within every class
    assert methods.loc[["ddm", "ddm_paper", "gradient_ascent", "forward_matching"], "fidelity Dist1"].notna().all()
    assert (methods["online_seconds"] > 0).all() and (
        methods.loc[["ddm", "trak", "ekfac"], "offline_seconds"] > 0
    ).all()
    assert methods.loc["ddm", "online_seconds_per_query"] == pytest.approx(methods.loc["ddm", "online_seconds"] / 100)
    synset = torch.load(project / "outputs/baselines/forward_synset.pt", weights_only=True)
    assert synset["direction"] == "forward" and synset["images"].shape == (20, 2, 1, 8, 8)
    privacy = pd.read_parquet(project / "outputs/report/privacy.parquet")
    assert set(privacy["synset"]) == {"ddm", "init"}  # forward_matching's 2 images per cluster: not comparable
    print(methods.round(4).to_string())


def test_the_mlflow_run_holds_every_method_and_its_quality(project, tmp_path):
    """What the README promises of the MLflow run with ground truth: methods.json (one row per method) and the
    quality metrics, read back through MLflow's client."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddm").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    logged = json.loads(Path(client.download_artifacts(parent.info.run_id, "methods.json", str(tmp_path))).read_text())
    methods = pd.DataFrame(logged["data"], columns=logged["columns"])
    expected = pd.read_parquet(project / "outputs/report/methods.parquet")
    assert sorted(methods["method"]) == sorted(expected["method"])
    report = json.loads((project / "outputs/report/metrics.json").read_text())
    assert parent.data.metrics["ddm.lds_margin_aligned"] == pytest.approx(report["ddm.lds_margin_aligned"])
