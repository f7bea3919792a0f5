"""Stage report: metrics.json, a short Markdown report with figures, and the MLflow run of the pipeline."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.config import Params
from ddm_ops.methods import METHODS
from stages import STAGES
from stages.artifacts import Paths, RunTables, load_tensors, read_parquet, score_matrix, write_json, write_parquet
from stages.common import FanOut, dataset, flatten, in_process
from stages.reporting.audit import (
    MEMBERSHIP_COLUMNS,
    PRIVACY_COLUMNS,
    RANKING_COLUMNS,
    data_quality,
    membership_attack,
    privacy_report,
    synsets,
)
from stages.reporting.figures import (
    figure_examples,
    figure_heatmap,
    figure_matching,
    figure_synsets,
    figure_thumbnail,
)
from stages.reporting.quality import DDM, METHOD_COLUMNS, figure_quality, methods_table, quality, quality_table

log = logging.getLogger(__name__)


def summarise(stage_metrics: dict[str, dict]) -> dict[str, float]:
    """Headline numbers of the run: accuracy, speed of removal against training, cost of distillation."""
    train = stage_metrics["train_target"]["train_seconds"]
    perturb = stage_metrics["perturb"]
    online = perturb["online_seconds"] + stage_metrics["attribute"]["attribute_seconds"]
    retrain = stage_metrics["ground_truth"]["seconds_per_retraining"]
    curvature = stage_metrics["curvature"].get("curvature_seconds", 0.0)
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
        "curvature_seconds": curvature,
        "offline_overhead": (stage_metrics["distill"]["distill_seconds"] + curvature) / train,
        "matching_loss_first": stage_metrics["distill"]["matching_loss_first"],
        "matching_loss_last": stage_metrics["distill"]["matching_loss_last"],
    }


HEADLINE = {  # summary key: (what it is, format)
    "test_accuracy": ("test accuracy of the trained model", "{:.1%}"),
    "train_seconds": ("seconds to train the model once", "{:.1f} s"),
    "seconds_per_removal": ("seconds to remove one cluster with its synset (a real model with outputs)", "{:.4f} s"),
    "speedup_per_removal": ("how many removals fit in one training of the model", "{:.0f}×"),
    "seconds_per_retraining": (
        "mean seconds of a ground-truth retraining (one cluster or half of them left out)",
        "{:.1f} s",
    ),
    "speedup_vs_retraining": ("that mean over one removal's seconds", "{:.0f}×"),
    "online_seconds": ("seconds to attribute every test sample to every cluster", "{:.2f} s"),
    "online_fraction_of_training": ("those seconds as a share of one training", "{:.2f}×"),
    "distill_seconds": ("seconds to distil every cluster's synset (offline, once)", "{:.0f} s"),
    "distill_overhead": ("distillation in trainings of the model", "{:.1f} trainings"),
    "curvature_seconds": ("seconds to fit the curvature used by the removal (offline, once)", "{:.1f} s"),
    "offline_overhead": ("all offline work in trainings of the model", "{:.1f} trainings"),
    "step_size": ("removal step size (perturb.step_size, or calibrated on retrainings)", "{:.3g}"),
    "matching_loss_first": ("gradient-matching loss, median over clusters, first iteration", "{:.3g}"),
    "matching_loss_last": ("the same at the last iteration (lower: the synsets imitate their clusters)", "{:.3g}"),
}


def _headline(summary: dict) -> list[str]:
    """The run's headline numbers with what each means and its unit (raw keys are in metrics.json)."""
    rows = ["| | value | key in metrics.json |", "|---|---|---|"]
    for key, value in summary.items():
        if "." in key:  # the rest: in their sections
            continue
        what, fmt = HEADLINE.get(key, (key, "{:.4g}"))
        rows.append(f"| {what} | {fmt.format(value)} | `{key}` |")
    return rows


def _quality_markdown(table: pd.DataFrame, side_by_side: pd.DataFrame, undefined: list[str]) -> list[str]:
    methods = table[table["method"] != "reference"].set_index("method").dropna(axis=1, how="all")
    reference = table[table["method"] == "reference"].set_index("method").dropna(axis=1)
    return [
        "## Quality against retraining",
        "",
        "Every method on the same clusters, against the aligned ground truth; offline: work that needs no test "
        "sample; online: the attribution of the test samples; memory: peak extra resident memory.",
        "",
        side_by_side.set_index("method").to_markdown(floatfmt=".4g"),
        "",
        *(f"- `{m}`: {METHODS[m].description}" for m in side_by_side["method"] if m in METHODS),
        "",
        "All metrics:",
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
        *(
            [
                "Undefined here (a correlation with a constant prediction or truth), so left out of metrics.json and "
                "MLflow: " + ", ".join(f"`{k}`" for k in undefined) + ".",
                "",
            ]
            if undefined
            else []
        ),
        "![predicted vs true](figures/predicted_vs_true.png) ![LOGO per test sample](figures/logo_per_test.png)",
        "![fidelity](figures/fidelity.png)",
        "",
    ]


def _audit_markdown(
    summary: dict, ranking: pd.DataFrame, privacy: pd.DataFrame, membership: pd.DataFrame, curve: bool
) -> list[str]:
    lines = []
    if len(ranking):
        detected = {k.removeprefix("data_quality."): v for k, v in summary.items() if k.startswith("data_quality.")}
        lines += [
            "## Data quality",
            "",
            "Clusters ranked by their effect on the test loss (negative: removing the cluster lowers the loss, the "
            "cluster hurts), each next to its standard error over the test samples; only a `harmful` verdict (more "
            "than two standard errors below 0) is a reason to look at a cluster's data, `within noise` is not. "
            f"{(ranking['verdict'] == 'harmful').sum()} of {len(ranking)} clusters are harmful by that test. The "
            "full ranking is in `data_quality.parquet`.",
            "",
            ranking.head(10).to_markdown(index=False, floatfmt=".4g"),
            "",
        ]
        if detected:
            table = pd.Series(detected).rename_axis("metric").reset_index()
            table[["method", "metric"]] = table["metric"].str.rsplit(".", n=1, expand=True)
            wide = table.pivot(index="method", columns="metric", values=0)
            lines += [
                "Finding the flipped labels (AUC over samples scored by their cluster; found_at_x: share of the "
                "flipped labels in the first x% of the data, most harmful clusters first; at random x%):",
                "",
                wide.to_markdown(floatfmt=".3f"),
                "",
            ]
        lines += ["![harmful clusters](figures/harmful_clusters.png)", ""]
        if curve:
            lines += ["![removal curve](figures/removal_curve.png)", ""]
    means = privacy.groupby("synset")[["l2", "psnr", "ssim", "max_ssim", "distance_ratio"]].mean()
    lines += [
        "## Privacy",
        "",
        "Per synset image, its nearest training image (L2 in [0, 1] pixels): PSNR and SSIM to it, the highest SSIM to "
        "any training image, and the distance to the nearest training image over that to the nearest held-out image "
        "(about 1: nothing learnt about the training set). `init` are the real images matching starts from.",
        "",
        means.to_markdown(floatfmt=".3f"),
        "",
        "![privacy](figures/privacy.png)",
        "",
    ]
    if len(membership):
        lines += [
            "Membership attack (likelihood ratio against reference models that never saw the attacked images, "
            "Carlini et al. 2022) on a model trained from each kind of synset. Attacked: the real images matching "
            "starts from against as many held-out images. AUC 0.5 and a true-positive rate of 0.01 at 1% false "
            "positives mean the model gives nothing away; the positive controls show what the attack finds when "
            "there is something to find.",
            "",
            membership.to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    return lines


def _markdown(
    params: Params,
    summary: dict,
    top: pd.DataFrame,
    objective: str,
    k: int,
    quality: pd.DataFrame | None,
    side_by_side: pd.DataFrame,
    undefined: list[str],
    audit: list[str],
    run: dict[str, str],
    n_test: int,
) -> str:
    lines = [
        f"# DDM report: {params.data.name}, {params.model.name}, K = {k} clusters",
        "",
        f"Run `{run['name']}` (MLflow experiment `{run['experiment']}`), git commit `{run['commit']}`, {run['date']}.",
        "",
        f"This page says which groups of training images (K = {k} clusters, each within one class) made the model "
        "predict what it predicts on the test images. Each cluster was distilled into a few synthetic images; "
        "removing a cluster from the trained model means a few update steps with them, and its **score** on a test "
        f"image is how much the test {objective} drops when it is removed: positive, the cluster helps that "
        "prediction; negative, it hurts it; near 0, it does not matter. Scores add up over test images to a "
        "cluster's total effect. "
        + (
            "The quality section measures every score against retraining the model without each cluster."
            if quality is not None
            else "Set ground_truth.enabled to measure them against retraining without each cluster."
        ),
        "",
        *_headline(summary),
        "",
        "## Clusters with the largest total effect on the test set",
        "",
        f"The five most helpful clusters, then the five least helpful (most harmful first): their scores summed "
        f"over the {n_test} test images; each with its first synset image and four real members.",
        "",
        top.rename(
            columns={"cluster_id": "cluster", "label": "class", "size": "training images", "total_score": "total score"}
        ).to_markdown(index=False, floatfmt=("g", "g", "g", ".3f", "")),
        "",
        *(_quality_markdown(quality, side_by_side, undefined) if quality is not None else []),
        *audit,
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


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.8em; overflow-x: auto; }
"""


def render_html(text: str, folder: Path, params: Params) -> str:
    """The Markdown report as one self-contained HTML page: every figure embedded, the run's params at the end."""
    import base64
    import html
    import re

    import markdown
    import yaml

    body = markdown.markdown(text, extensions=["tables"])

    def embed(match: re.Match) -> str:
        data = base64.b64encode((folder / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[\w.-]+\.png)"', embed, body)
    settings = html.escape(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    title = html.escape(text.splitlines()[0].lstrip("# "))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n"
        f"<h2>Parameters</h2>\n<details open><summary>params.yaml of this run</summary><pre>{settings}</pre></details>"
        "\n</body></html>\n"
    )


def run(params: Params, paths: Paths, out: Path, fan_out: FanOut = in_process) -> dict:
    ds = dataset(params)
    stage_metrics = upstream_metrics(paths)
    summary = summarise(stage_metrics)
    figures = out / "figures"
    figures.mkdir()
    tables = RunTables.read(paths)
    clusters = tables.clusters.set_index("cluster_id")
    if params.ground_truth.enabled:
        log.info("quality of every method against the retrainings")
    evaluated = quality(tables, paths, params, ds)
    table, side_by_side, undefined = None, pd.DataFrame(columns=list(METHOD_COLUMNS)), []
    if evaluated is not None:
        results, truth, found, base = evaluated
        table = quality_table(results)
        flat = flatten(results)
        summary.update({k: v for k, v in flat.items() if np.isfinite(v)})
        undefined = sorted(k for k, v in flat.items() if not np.isfinite(v))
        if undefined:
            log.info("%d metrics undefined (a constant prediction or truth), named in report.md", len(undefined))
        ddm = DDM
        side_by_side = methods_table(results, paths, stage_metrics, ddm)
        labels = clusters["label"].to_numpy()
        figure_quality(truth, found, base, ds.y_test.numpy(), labels, results, figures, ddm)
    side_by_side.to_csv(out / "methods.csv", index=False)  # tracked by git: `dvc plots diff`, `dvc exp show`
    write_parquet(
        side_by_side,
        out / "methods.parquet",
        "One row per method against the aligned ground truth (empty without ground truth).",
        METHOD_COLUMNS,
    )
    objective = params.attribute.objectives[0]
    every_objective, assign = tables.attribution, tables.assignments
    attribution = every_objective[every_objective["objective"] == objective]
    wide = score_matrix(attribution)
    matrix, cluster_ids = wide.to_numpy(), wide.index.to_numpy()
    synset = load_tensors(paths.stage("distill") / "synset.pt")

    figure_synsets(ds, synset, assign, figures / "synsets.png")
    figure_heatmap(
        matrix, clusters.loc[cluster_ids, "label"].to_numpy(), ds.y_test.numpy(), objective, figures / "heatmap.png"
    )
    examples = np.linspace(0, len(ds.x_test) - 1, params.report.n_examples).round().astype(int)
    figure_examples(ds, matrix, cluster_ids, assign, synset, examples, figures / "examples.png")
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
    for cid in top["cluster_id"]:
        figure_thumbnail(ds, synset, assign, int(cid), figures / f"cluster_{cid}.png")
    top["synset, then real members"] = [f"![cluster {c}](figures/cluster_{c}.png)" for c in top["cluster_id"]]
    total.assign(cluster=[f"{k} (class {c})" for k, c in zip(total["cluster_id"], total["label"])])[
        ["cluster", "total_score"]
    ].to_csv(out / "cluster_effects.csv", index=False)  # tracked by git: `dvc plots diff` across experiments
    ranking, found = data_quality(params, tables, ds, figures)
    write_parquet(
        ranking, out / "data_quality.parquet", "Clusters from the most harmful to the most helpful.", RANKING_COLUMNS
    )
    found_synsets = synsets(synset, paths, ds)
    leakage, measured = privacy_report(ds, found_synsets, figures)
    write_parquet(
        leakage, out / "privacy.parquet", "What every synset image reveals of the training set.", PRIVACY_COLUMNS
    )
    membership, attacked = membership_attack(params, paths, ds, synset, found_synsets[0])
    write_parquet(
        membership,
        out / "membership.parquet",
        "A membership attack on models trained from each kind of synset, with its controls.",
        MEMBERSHIP_COLUMNS,
    )
    summary.update({**found, **measured, **attacked})
    audit = _audit_markdown(summary, ranking, leakage, membership, len(tables.removal_curve) > 0)
    run = {
        "name": run_name(),
        "experiment": params.report.experiment,
        "commit": (git_commit(paths.root) or "none")[:10],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    markdown = _markdown(
        params, summary, top, objective, len(cluster_ids), table, side_by_side, undefined, audit, run, len(ds.x_test)
    )
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(render_html(markdown, out, params))
    write_json(out / "run.json", run)  # the MLflow run the pipeline logs this report as
    return summary


def run_name() -> str:
    """The MLflow run's name: the DVC experiment's, else the time."""
    return os.environ.get("DVC_EXP_NAME") or time.strftime("ddm-%Y%m%d-%H%M%S")


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def upstream_metrics(paths: Paths) -> dict[str, dict[str, float]]:
    """Every stage's metrics.json but the report's, by stage: what the report summarises and MLflow logs."""
    return {s: json.loads((paths.stage(s) / "metrics.json").read_text()) for s in STAGES if s != "report"}
