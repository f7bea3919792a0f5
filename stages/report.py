"""Stage report: metrics.json, a short Markdown report with figures, and the MLflow run of the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.config import Params
from ddm_ops.data import Dataset
from pipeline.tracking import flatten, log_pipeline_run
from stages import STAGES
from stages.common import Paths, dataset, load_tensors, pyplot, read_parquet, save_figure
from stages.quality import figure_quality, quality, quality_table

REAL_PER_ROW = 6
TOP = 3


def _show(ax, image: np.ndarray, title: str = "") -> None:
    ax.imshow(image, cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _pixels(ds: Dataset, x) -> np.ndarray:
    """An image (C, H, W) as imshow takes it: (H, W) for one channel, (H, W, 3) for colour."""
    pixels = ds.denormalise(x)
    return pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()


def figure_synsets(ds: Dataset, synset: dict, assign: pd.DataFrame, path: Path) -> None:
    """One cluster per class: its synset images, then real members nearest the centroid."""
    plt = pyplot()
    ids = synset["cluster_ids"].numpy()
    labels = assign.groupby("cluster_id")["label"].first()
    chosen = [int(ids[labels.loc[ids].to_numpy() == c][0]) for c in sorted(labels.unique())]
    ipc = synset["images"].shape[1]
    fig, axes = plt.subplots(
        len(chosen), ipc + REAL_PER_ROW, figsize=(1.0 * (ipc + REAL_PER_ROW), 1.05 * len(chosen)), squeeze=False
    )
    for row, cid in enumerate(chosen):
        k = int(np.flatnonzero(ids == cid)[0])
        for j in range(ipc):
            _show(axes[row, j], _pixels(ds, synset["images"][k, j]), f"synset {cid}" if row == 0 or j == 0 else "")
        members = assign[assign["cluster_id"] == cid].sort_values("centroid_distance").index[:REAL_PER_ROW]
        for j in range(REAL_PER_ROW):
            ax = axes[row, ipc + j]
            if j < len(members):
                _show(ax, _pixels(ds, ds.x_train[members[j]]), "real" if row == 0 else "")
            else:
                ax.axis("off")
    fig.suptitle("Synset images (left) next to real members of the same cluster (right)", fontsize=9)
    save_figure(fig, path)


def figure_heatmap(
    matrix: np.ndarray, cluster_labels: np.ndarray, test_labels: np.ndarray, objective: str, path: Path
) -> None:
    """Attribution matrix, clusters grouped by class (rows), test samples grouped by class (columns)."""
    plt = pyplot()
    rows, cols = np.argsort(cluster_labels, kind="stable"), np.argsort(test_labels, kind="stable")
    m = matrix[rows][:, cols]
    lim = float(np.quantile(np.abs(m), 0.99)) or 1.0
    fig, ax = plt.subplots(figsize=(10, 4.5))
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    for boundary in np.flatnonzero(np.diff(cluster_labels[rows])) + 0.5:
        ax.axhline(boundary, color="k", lw=0.3)
    for boundary in np.flatnonzero(np.diff(test_labels[cols])) + 0.5:
        ax.axvline(boundary, color="k", lw=0.3)
    ax.set_xlabel("test samples (grouped by class)")
    ax.set_ylabel("clusters (grouped by class)")
    ax.set_title(f"Attribution: drop of the {objective} when the cluster is removed (red = the cluster helps)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    save_figure(fig, path)


def figure_examples(
    ds: Dataset, matrix: np.ndarray, cluster_ids: np.ndarray, assign: pd.DataFrame, examples: np.ndarray, path: Path
) -> None:
    """For each example test sample: the image, its most helpful and most harmful clusters (nearest member)."""
    plt = pyplot()
    representative = assign.groupby("cluster_id")["centroid_distance"].idxmin()  # training position per cluster
    fig, axes = plt.subplots(
        len(examples), 1 + 2 * TOP, figsize=(1.3 * (1 + 2 * TOP), 1.4 * len(examples)), squeeze=False
    )
    for row, j in enumerate(examples):
        _show(axes[row, 0], _pixels(ds, ds.x_test[j]), f"test {ds.test_index[j]} (y={int(ds.y_test[j])})")
        order = np.argsort(-matrix[:, j], kind="stable")
        picks = [(k, "helps") for k in order[:TOP]] + [(k, "hurts") for k in order[::-1][:TOP]]
        for col, (k, kind) in enumerate(picks, start=1):
            cid = int(cluster_ids[k])
            _show(axes[row, col], _pixels(ds, ds.x_train[representative[cid]]), f"{kind} c{cid} {matrix[k, j]:+.3f}")
    fig.suptitle(
        "Most helpful (left) and most harmful (right) clusters, each shown by its member nearest the centroid",
        fontsize=9,
    )
    save_figure(fig, path)


def figure_matching(matching: pd.DataFrame, path: Path) -> None:
    """Matching loss per iteration: median and 10-90% band over clusters."""
    plt = pyplot()
    q = matching.groupby("iteration")["loss"].quantile([0.1, 0.5, 0.9]).unstack()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.fill_between(q.index, q[0.1], q[0.9], alpha=0.3, label="10-90% of clusters")
    ax.plot(q.index, q[0.5], label="median")
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient distance")
    ax.set_title("Reverse gradient matching loss", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def summarise(stage_metrics: dict[str, dict]) -> dict[str, float]:
    """Headline numbers of the run: accuracy, speed of removal against training, cost of distillation."""
    train = stage_metrics["train_target"]["train_seconds"]
    perturb = stage_metrics["perturb"]
    online = perturb["online_seconds"] + stage_metrics["attribute"]["attribute_seconds"]
    retrain = stage_metrics["ground_truth"]["seconds_per_retraining"]
    speed = {"seconds_per_retraining": retrain, "speedup_vs_retraining": retrain / perturb["seconds_per_removal"]}
    return {
        **(speed if retrain else {}),
        "step_size": perturb["step_size"],
        "test_accuracy": stage_metrics["train_target"]["test_accuracy"],
        "train_seconds": train,
        "online_seconds": online,
        "online_fraction_of_training": online / train,
        "seconds_per_removal": perturb["seconds_per_removal"],
        "speedup_per_removal": train / perturb["seconds_per_removal"],
        "distill_seconds": stage_metrics["distill"]["distill_seconds"],
        "distill_overhead": stage_metrics["distill"]["distill_seconds"] / train,
        "matching_loss_first": stage_metrics["distill"]["matching_loss_first"],
        "matching_loss_last": stage_metrics["distill"]["matching_loss_last"],
    }


def _quality_markdown(table: pd.DataFrame) -> list[str]:
    methods = table[table["method"] != "reference"].set_index("method").dropna(axis=1, how="all")
    reference = table[table["method"] == "reference"].set_index("method").dropna(axis=1)
    return [
        "## Quality against retraining",
        "",
        "LOGO: per test sample, Spearman across the evaluation clusters of predicted vs true effect of removing one "
        "cluster (aligned: the exact counterfactual of this model; resampled: mean over fresh seeds). LDS: group-LDS "
        "over random within-class halves of the clusters. `class_margin`: per-class mean margin; `test_loss`: the "
        "whole test set's loss. Removing one small cluster moves a ConvNet less than its training chaos does, so "
        "single-cluster, single-sample numbers are low for every method; the group-level and aggregated rows carry "
        "the signal. `class_indicator` and `input_similarity` are trivial baselines a method must beat.",
        "",
        methods.T.to_markdown(floatfmt=".3f"),
        "",
        "Noise ceiling (one seed's ground truth against another's) and fidelity baselines (Dist1 to the retrained "
        "model):",
        "",
        reference.T.to_markdown(floatfmt=".3f"),
        "",
        "![predicted vs true](figures/predicted_vs_true.png) ![LOGO per test sample](figures/logo_per_test.png)",
        "![fidelity](figures/fidelity.png)",
        "",
    ]


def _markdown(
    params: Params, summary: dict, top: pd.DataFrame, objective: str, k: int, quality: pd.DataFrame | None
) -> str:
    lines = [
        f"# DDM report: {params.data.name}, {params.model.name}, K = {k} clusters",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in summary.items()],
        "",
        f"Scores are drops of the test {objective} when a cluster is removed (positive: the cluster helps).",
        "",
        "## Clusters with the largest total effect on the test set",
        "",
        top.to_markdown(index=False),
        "",
        *(_quality_markdown(quality) if quality is not None else []),
        "## Synsets",
        "",
        "![synsets](figures/synsets.png)",
        "",
        "## Attribution matrix",
        "",
        "![heatmap](figures/heatmap.png)",
        "",
        "## Most helpful and harmful clusters for a few test samples",
        "",
        "![examples](figures/examples.png)",
        "",
        "## Matching",
        "",
        "![matching](figures/matching.png)",
        "",
    ]
    return "\n".join(lines)


def run(params: Params, paths: Paths, out: Path) -> dict:
    ds = dataset(params)
    stage_metrics = {s: json.loads((paths.stage(s) / "metrics.json").read_text()) for s in STAGES if s != "report"}
    summary = summarise(stage_metrics)
    figures = out / "figures"
    figures.mkdir()
    clusters = read_parquet(paths.stage("cluster") / "clusters.parquet").set_index("cluster_id").sort_index()
    evaluated = quality(paths, params, ds)
    table = None
    if evaluated is not None:
        results, truth, found, base = evaluated
        table = quality_table(results)
        summary.update({k: v for k, v in flatten(results).items() if np.isfinite(v)})
        ddm = f"ddm_{params.distill.direction}"
        labels = clusters["label"].to_numpy()
        figure_quality(truth, found, base, ds.y_test.numpy(), labels, results, figures, ddm)
    objective = params.attribute.objectives[0]
    attribution = read_parquet(paths.stage("attribute") / "attribution.parquet")
    attribution = attribution[attribution["objective"] == objective]
    assign = read_parquet(paths.stage("cluster") / "assignments.parquet")
    wide = attribution.pivot(index="cluster_id", columns="test_index", values="score")
    matrix, cluster_ids = wide.to_numpy(), wide.index.to_numpy()
    synset = load_tensors(paths.stage("distill") / "synset.pt")

    figure_synsets(ds, synset, assign, figures / "synsets.png")
    figure_heatmap(
        matrix, clusters.loc[cluster_ids, "label"].to_numpy(), ds.y_test.numpy(), objective, figures / "heatmap.png"
    )
    examples = np.linspace(0, len(ds.x_test) - 1, params.report.n_examples).round().astype(int)
    figure_examples(ds, matrix, cluster_ids, assign, examples, figures / "examples.png")
    figure_matching(read_parquet(paths.stage("distill") / "matching.parquet"), figures / "matching.png")

    total = pd.DataFrame(
        {
            "cluster_id": cluster_ids,
            "label": clusters.loc[cluster_ids, "label"].to_numpy(),
            "size": clusters.loc[cluster_ids, "size"].to_numpy(),
            "total_score": matrix.sum(1),
        }
    )
    top = pd.concat([total.nlargest(5, "total_score"), total.nsmallest(5, "total_score")])
    (out / "report.md").write_text(_markdown(params, summary, top, objective, len(cluster_ids), table))
    log_pipeline_run(
        paths.root,
        params,
        stage_metrics,
        summary,
        [
            out / "report.md",
            figures,
            paths.stage("attribute") / "attribution.parquet",
            paths.stage("cluster") / "assignments.parquet",
            paths.stage("cluster") / "clusters.parquet",
        ],
    )
    return summary
