"""Quality of the run's attribution against the ground truth, for DDM and the reference methods (used by report)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.config import Params
from ddm_ops.data import Dataset
from ddm_ops.evaluation import Method, Truth, evaluate
from stages.artifacts import BASE, COST_COLUMNS, Paths, RunTables, logits_table, read_parquet, score_matrix
from stages.reporting.figures import pyplot, save_figure
from stages.retraining import load_ground_truth

DDM = "ddm"  # the run's own method in every table; ddm_paper is the paper's DDM as a reference method


def _matrices(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """{objective: (K, M) score matrix} from a long scores table, clusters and test samples in ascending order."""
    return {o: score_matrix(part).to_numpy() for o, part in table.groupby("objective")}


def methods(tables: RunTables, params: Params) -> tuple[dict[str, Method], np.ndarray]:
    """DDM (the run's own, named `ddm`) and every reference method present; and θ_T's test logits."""
    ids, _, logits = logits_table(tables.outputs)
    assert ids[0] == BASE
    found = {DDM: Method(_matrices(tables.attribution), logits[1:].numpy().astype(np.float64))}
    outputs = tables.baseline_outputs
    for name, table in tables.baselines.groupby("method"):
        made = outputs[outputs["method"] == name].drop(columns="method")
        found[name] = Method(_matrices(table), logits_table(made)[2].numpy().astype(np.float64) if len(made) else None)
    return found, logits[0].numpy().astype(np.float64)


def quality(
    tables: RunTables, paths: Paths, params: Params, ds: Dataset
) -> tuple[dict, Truth, dict[str, Method], np.ndarray] | None:
    """The evaluation of the run, or None when the ground truth is disabled."""
    truth = load_ground_truth(paths, params)
    if not truth.enabled:
        return None
    found, base = methods(tables, params)
    labels = tables.clusters["label"].to_numpy()
    return evaluate(found, base, ds.y_test.numpy(), labels, truth), truth, found, base


def quality_table(results: dict) -> pd.DataFrame:
    """One row per method, one column per metric (the reference row holds the ceiling and fidelity baselines)."""
    return pd.DataFrame(results).T.rename_axis("method").reset_index()


HEADLINE = {
    "lds_margin_aligned": "group-LDS",
    "logo_margin_aligned": "LOGO Spearman",
    "fidelity_dist1": "fidelity Dist1",
}
METHOD_COLUMNS = {
    "method": "method",
    **{label: f"{key} in metrics.json (against the aligned ground truth)" for key, label in HEADLINE.items()},
    **{k: v for k, v in COST_COLUMNS.items() if k != "method"},
}


def methods_table(results: dict, paths: Paths, stage_metrics: dict, ddm: str) -> pd.DataFrame:
    """One row per method: headline quality against the aligned ground truth, offline and online seconds, peak
    memory. DDM's costs are its distill and curvature stages and the perturb stage's fit (the step's calibration)
    (offline), and the perturb stage's removals and the attribute stage (online)."""
    costs = read_parquet(paths.stage("baselines") / "costs.parquet").set_index("method")
    distill, perturb = stage_metrics["distill"], stage_metrics["perturb"]
    online = perturb["online_seconds"] + stage_metrics["attribute"]["attribute_seconds"]
    costs.loc[ddm] = {
        "offline_seconds": distill["distill_seconds"]
        + stage_metrics["curvature"].get("curvature_seconds", 0.0)
        + perturb.get("fit_seconds", 0.0),
        "online_seconds": online,
        "online_seconds_per_query": online / stage_metrics["attribute"]["n_test"],
        "peak_memory_mb": max(
            distill.get("distill_peak_memory_mb", np.nan), perturb.get("online_peak_memory_mb", np.nan)
        ),
    }
    rows = []
    for method in [ddm, *[m for m in results if m not in (ddm, "reference")]]:
        row = {"method": method, **{label: results[method].get(key, np.nan) for key, label in HEADLINE.items()}}
        rows.append({**row, **(costs.loc[method].to_dict() if method in costs.index else {})})
    return pd.DataFrame(rows, columns=list(METHOD_COLUMNS))


def figure_quality(
    truth: Truth,
    found: dict[str, Method],
    base: np.ndarray,
    test_labels: np.ndarray,
    cluster_labels: np.ndarray,
    results: dict,
    folder: Path,
    ddm: str,
) -> list[Path]:
    """Predicted vs true margin drop; LOGO Spearman per test sample; fidelity per cluster next to baselines."""
    import torch

    from ddm_ops.calibration import dist1_to
    from ddm_ops.metrics import logo_spearman
    from ddm_ops.objectives import margin

    plt = pyplot()
    labels = torch.from_numpy(test_labels)
    m = lambda logits: margin(torch.from_numpy(logits), labels.expand(*logits.shape[:-2], -1)).numpy()  # noqa: E731
    ev = truth.evaluation
    true = (m(truth.full[truth.aligned_seed])[None] - m(truth.cluster[truth.aligned_seed]))[ev]
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    pred = found[ddm].scores["margin"][ev]
    colours = np.broadcast_to(cluster_labels[ev][:, None], pred.shape)
    sc = ax.scatter(true.ravel(), pred.ravel(), c=colours.ravel(), cmap="tab10", s=3, alpha=0.5)
    ax.axhline(0, color="k", lw=0.3)
    ax.axvline(0, color="k", lw=0.3)
    ax.set_xlabel("true margin drop (aligned retraining without the cluster)")
    ax.set_ylabel(f"predicted margin drop ({ddm})")
    ax.set_title("Predicted vs true effect of removing one cluster (colour: cluster's class)", fontsize=8)
    fig.colorbar(sc, ax=ax, fraction=0.04, label="class")
    paths.append(save_figure(fig, folder / "predicted_vs_true.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(-1, 1, 41)
    for name, method in found.items():
        if "margin" in method.scores:
            per = logo_spearman(method.scores["margin"][ev], true)[1]
            ax.hist(per[~np.isnan(per)], bins=bins, histtype="step", lw=1.5 if name == ddm else 0.8, label=name)
    ax.set_xlabel("LOGO Spearman of one test sample (across clusters)")
    ax.set_ylabel("test samples")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, folder / "logo_per_test.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    aligned = torch.from_numpy(truth.cluster[truth.aligned_seed][ev])
    nothing = dist1_to(aligned, torch.from_numpy(base).expand_as(aligned)).numpy()
    order = np.argsort(nothing)
    ax.plot(nothing[order], "k-", label="do nothing (θ_T)")
    for name, method in found.items():
        if method.logits is not None:
            ax.plot(dist1_to(aligned, torch.from_numpy(method.logits[ev])).numpy()[order], ".", label=name)
    if "fidelity_seed_noise" in results["reference"]:
        ax.axhline(results["reference"]["fidelity_seed_noise"], color="grey", ls="--", label="seed-noise floor")
    ax.set_yscale("log")
    ax.set_xlabel("evaluation clusters (sorted by the do-nothing distance)")
    ax.set_ylabel("Dist1 to the retrained model")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, folder / "fidelity.png"))
    return paths
