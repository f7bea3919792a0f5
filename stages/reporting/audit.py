"""The data-quality and privacy parts of the report: clusters ranked from most harmful to most helpful, how well
each method finds corrupted labels, the removal curve, what the synsets reveal of the training images, and a
membership attack on models trained from them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ddm_ops import privacy
from ddm_ops.config import Params
from ddm_ops.data import Dataset
from ddm_ops.data_quality import accuracy_effects, cluster_effects, detection, effect_errors, harmful_first
from ddm_ops.train import predict, train
from stages.artifacts import Paths, RunTables, load_tensors, logits_table, score_matrix
from stages.common import new_model
from stages.reporting.figures import closest_members, pyplot, save_figure, show_image, show_pixels
from stages.reporting.quality import DDM

RANKING_COLUMNS = {
    "rank": "1 = the most harmful cluster",
    "cluster_id": "cluster",
    "label": "class of its members (as the model saw them)",
    "size": "training samples",
    "noisy": "members whose label data.label_noise flipped",
    "loss_effect": "rise of the mean test loss when the cluster is removed (negative: removing it helps)",
    "loss_effect_se": "standard error of loss_effect over the test samples",
    "verdict": "harmful or helpful when loss_effect is more than two standard errors from 0, else within noise",
    "accuracy_effect": "drop of the test accuracy when the cluster is removed (negative: removing it helps)",
}
PRIVACY_COLUMNS = {
    "synset": "ddm (the run's synsets), forward_matching (the baseline's) or init (the real images matching starts "
    "from)",
    "cluster_id": "cluster",
    "image": "image of the cluster's synset",
    "nearest_train_index": "position in the training split of the nearest training image (L2)",
    "l2": "L2 distance to it, pixels in [0, 1]",
    "psnr": "PSNR to it (dB)",
    "ssim": "SSIM to it",
    "max_ssim": "highest SSIM to any training image",
    "distance_ratio": "distance to the nearest training image / to the nearest held-out image (about 1: no leakage)",
}
MEMBERSHIP_COLUMNS = {
    "model": "what the attacked model was trained on: a kind of synset (ddm, forward_matching, init), the real "
    "training set (target: the run's model) or none of the attacked images (unseen)",
    "role": "synset, positive control (trained on the attacked members: the attack must find them) or negative "
    "control (never saw them: about 0.5)",
    "auc": "membership AUC of the likelihood-ratio attack (0.5: the model gives nothing away)",
    "auc_low": "2.5% bootstrap quantile of the AUC",
    "auc_high": "97.5% bootstrap quantile of the AUC",
    "tpr_at_1pct_fpr": "share of members found while calling 1% of the non-members members (0.01: chance)",
}
GRID = 8  # members shown per harmful cluster
log = logging.getLogger(__name__)


def _loss_scores(table: pd.DataFrame) -> np.ndarray:
    loss = table[table["objective"] == "loss"]
    return score_matrix(loss).to_numpy()


def data_quality(params: Params, tables: RunTables, ds: Dataset, figures: Path) -> tuple[pd.DataFrame, dict]:
    """The ranking of the clusters (empty without the loss objective), detection metrics when labels were
    corrupted (DDM and every method with loss scores), the removal curve's summary; figures into `figures`."""
    if "loss" not in set(tables.attribution["objective"]):
        return pd.DataFrame(columns=list(RANKING_COLUMNS)), {}
    assign, clusters = tables.assignments, tables.clusters
    ids, noisy = assign["cluster_id"].to_numpy(), assign["is_noisy"].to_numpy()
    scores = _loss_scores(tables.attribution)
    effects, errors = cluster_effects(scores), effect_errors(scores)
    verdict = np.where(effects < -2 * errors, "harmful", np.where(effects > 2 * errors, "helpful", "within noise"))
    _, _, logits = logits_table(tables.outputs)
    order = harmful_first(effects)
    ranking = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "cluster_id": clusters["cluster_id"].to_numpy()[order],
            "label": clusters["label"].to_numpy()[order],
            "size": clusters["size"].to_numpy()[order],
            "noisy": np.bincount(ids, weights=noisy, minlength=len(effects)).astype(int)[order],
            "loss_effect": effects[order],
            "loss_effect_se": errors[order],
            "verdict": verdict[order],
            "accuracy_effect": accuracy_effects(logits[0], logits[1:], ds.y_test)[order],
        }
    )
    metrics: dict = {}
    if noisy.any():
        methods = {DDM: effects}
        for name, table in tables.baselines.groupby("method"):
            if "loss" in set(table["objective"]):
                methods[name] = cluster_effects(_loss_scores(table))
        for name, e in methods.items():
            metrics.update({f"data_quality.{name}.{k}": v for k, v in detection(e, ids, noisy).items()})
    figure_harmful(ds, assign, ranking, figures / "harmful_clusters.png")
    if len(tables.removal_curve):
        figure_removal_curve(tables.removal_curve, figures / "removal_curve.png")
    return ranking, metrics


def figure_harmful(ds: Dataset, assign: pd.DataFrame, ranking: pd.DataFrame, path: Path, n: int = 4) -> None:
    """The most harmful clusters: members nearest the centroid with the label the model saw (and the true one)."""
    plt = pyplot()
    fig, axes = plt.subplots(n, GRID, figsize=(1.0 * GRID, 1.25 * n), squeeze=False)
    for row, (_, r) in enumerate(ranking.head(n).iterrows()):
        members = closest_members(assign, r["cluster_id"], GRID)
        for col in range(GRID):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(members):
                i = members[col]
                true = int(ds.true_train_labels[i])
                show_image(
                    ax, ds, ds.x_train[i], f"y={int(ds.y_train[i])}" + (f" (true {true})" if ds.noisy[i] else "")
                )
        axes[row, 0].text(
            -0.3, 0.5, f"#{row + 1}\nc{int(r['cluster_id'])}", transform=axes[row, 0].transAxes, ha="right", fontsize=7
        )
    fig.suptitle("Most harmful clusters (removing them lowers the test loss most)", fontsize=9)
    save_figure(fig, path)


def figure_removal_curve(curve: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for strategy, part in curve.groupby("strategy"):
        stats = part.groupby("percent")["test_accuracy"].agg(["mean", "min", "max"])
        ax.plot(stats.index, stats["mean"], "o-", label=f"{strategy} removal")
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2)
    ax.set_xlabel("training data removed (%)")
    ax.set_ylabel("test accuracy (evaluation half)")
    ax.set_title("Removing the least useful data by DDM's ranking vs at random", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def synsets(own: dict, paths: Paths, ds: Dataset) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """({kind: images (K * ipc, C, H, W), normalised as the model sees them}, cluster id and image number of each):
    the run's synsets (`own`, distill's synset.pt), the forward-matched ones when the baselines made them, and the
    real images matching started from."""
    k, ipc = own["images"].shape[:2]
    found = {"ddm": own["images"].flatten(0, 1), "init": ds.x_train[own["init_index"].flatten()]}
    forward = load_tensors(paths.stage("baselines") / "forward_synset.pt")
    if forward and forward["images"].shape == own["images"].shape:  # the same images per cluster: one table
        found["forward_matching"] = forward["images"].flatten(0, 1)
    return found, np.repeat(own["cluster_ids"].numpy(), ipc), np.tile(np.arange(ipc), k)


def privacy_report(
    ds: Dataset, found_synsets: tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray], figures: Path
) -> tuple[pd.DataFrame, dict]:
    """Per synset image (`found_synsets`, as `synsets` returns them) its nearest training image and the leakage
    measures, with their means per kind."""
    members = ds.denormalise(ds.x_train)
    non_members = ds.denormalise(ds.x_test)
    frames, metrics, nearest = [], {}, {}
    kinds, cluster_ids, image = found_synsets
    for kind, normalised in kinds.items():
        images = ds.denormalise(normalised)
        found = privacy.nearest_real(images, members, non_members)
        nearest[kind] = (images, members[found["nearest_index"]])
        frames.append(
            pd.DataFrame(
                {
                    "synset": kind,
                    "cluster_id": cluster_ids,
                    "image": image,
                    "nearest_train_index": ds.train_index[found["nearest_index"]],
                    **{k: found[k] for k in ("l2", "psnr", "ssim", "max_ssim", "distance_ratio")},
                }
            )
        )
        for k in ("l2", "psnr", "ssim", "max_ssim", "distance_ratio"):
            metrics[f"privacy.{kind}.{k}"] = float(np.mean(found[k]))
    figure_privacy(nearest, ds, figures / "privacy.png")
    return pd.concat(frames, ignore_index=True), metrics


def membership_attack(
    params: Params, paths: Paths, ds: Dataset, synset: dict, kinds: dict[str, torch.Tensor]
) -> tuple[pd.DataFrame, dict]:
    """The likelihood-ratio membership attack on a model trained the run's way (model, train params, seed) on each
    kind of synset (`kinds`, as `synsets` returns them, of the run's `synset`), next to a positive control that must
    succeed and a negative one that must not.

    Attacked members: the real images matching starts from (what a synset could give away); non-members: as many
    held-out images. Reference models (report.membership_references) train on the rest of the training set, so none
    saw an attacked image. Positive controls: the run's target model (trained on every member) and the model trained
    on the `init` images themselves; negative control: one more model like the references, which never saw them.
    """
    n_ref = params.report.membership_references
    if not n_ref:
        return pd.DataFrame(columns=list(MEMBERSHIP_COLUMNS)), {}
    rng = np.random.default_rng([params.base.seed, 5])
    init = synset["init_index"].flatten()
    attacked = init.numpy()
    n = min(len(attacked), len(ds.x_test))
    members = rng.choice(attacked, n, replace=False)
    held_out = rng.choice(len(ds.x_test), n, replace=False)
    x = torch.cat([ds.x_train[members], ds.x_test[held_out]])
    y = torch.cat([ds.y_train[members], ds.y_test[held_out]])
    is_member = np.r_[np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]
    rest = np.setdiff1d(np.arange(len(ds.x_train)), attacked)
    log.info("membership attack: training %d reference models and one per kind of synset", n_ref)

    def trained(images: torch.Tensor, labels: torch.Tensor, seed: int, label: str) -> np.ndarray:
        model = new_model(params, ds, seed=seed)
        train(model, images, labels, params.train, seed, label=f"membership attack: {label}")
        return privacy.confidence(predict(model, x), y)

    references = np.stack(
        [trained(ds.x_train[rest], ds.y_train[rest], params.base.seed + 1 + r, f"reference {r}") for r in range(n_ref)]
    )
    target = new_model(params, ds)
    target.load_state_dict(load_tensors(paths.stage("train_target") / "model.pt"))
    labels = ds.y_train[init]  # every image of a cluster's synset has its class
    attacked_models = {
        kind: ("positive control" if kind == "init" else "synset", trained(images, labels, params.base.seed, kind))
        for kind, images in kinds.items()
    }
    attacked_models["target"] = ("positive control", privacy.confidence(predict(target, x), y))
    attacked_models["unseen"] = (
        "negative control",
        trained(ds.x_train[rest], ds.y_train[rest], params.base.seed + 1 + n_ref, "unseen"),
    )
    rows, metrics = [], {}
    for model, (role, confidence) in attacked_models.items():
        quality = privacy.attack_quality(privacy.likelihood_ratio(confidence, references), is_member, params.base.seed)
        rows.append({"model": model, "role": role, **quality})
        metrics.update({f"privacy.membership.{model}.{k}": v for k, v in quality.items()})
    return pd.DataFrame(rows, columns=list(MEMBERSHIP_COLUMNS)), metrics


def figure_privacy(nearest: dict[str, tuple[torch.Tensor, torch.Tensor]], ds: Dataset, path: Path, n: int = 8) -> None:
    """Synset images (top row of each pair) above their nearest training images, for each kind of synset."""
    plt = pyplot()
    kinds = [k for k in ("ddm", "forward_matching", "init") if k in nearest]
    step = max(1, len(nearest[kinds[0]][0]) // n)
    fig, axes = plt.subplots(2 * len(kinds), n, figsize=(1.0 * n, 1.1 * 2 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        images, real = nearest[kind]
        for c in range(n):
            for row, x, what in ((2 * r, images, kind), (2 * r + 1, real, "nearest real")):
                show_pixels(axes[row, c], x[min(c * step, len(x) - 1)])
                if c == 0:
                    axes[row, c].set_ylabel(what, fontsize=7)
    fig.suptitle("Synset images and their nearest training images (L2)", fontsize=9)
    save_figure(fig, path)
