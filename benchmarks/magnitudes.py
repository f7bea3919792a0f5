"""Where the cluster rankings lose: directions or magnitudes. Every method's group-LDS and LOGO within class (margin,
aligned truth) with its own scores, with each cluster's scores over the test samples rescaled to unit norm (the
directions alone: every cluster equally strong), and rescaled to the norm of that cluster's true leave-one-out
effect (an oracle for the magnitudes); and the Spearman correlation of each method's per-cluster norms with the
true ones, with the clusters' sizes and with their mean training loss under the target model (and the truth's own
correlations with those two, under "truth"). Reads the projects of quality.py's configs (and brings them up to date
with `dvc repro` first). Writes benchmarks/results/magnitudes.json.

    python benchmarks/magnitudes.py digits_k50 fashion_k100
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import torch
from quality import RESULTS, WORK, run_config
from scipy.stats import spearmanr

from ddm_ops.config import load_params
from ddm_ops.evaluation import Method, evaluate
from ddm_ops.objectives import margin
from stages.artifacts import Paths, RunTables, load_tensors
from stages.common import dataset, new_model
from stages.reporting.quality import methods
from stages.retraining import load_ground_truth

RESULT = RESULTS / "magnitudes.json"
METRICS = {"group-LDS": "lds_margin_aligned", "LOGO within class": "logo_margin_within_class_aligned"}


def rescaled(scores: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Each cluster's row of (K, M) scores scaled to the given norm (rows of zeros stay zero)."""
    own = np.linalg.norm(scores, axis=1, keepdims=True)
    return scores / np.where(own > 0, own, 1.0) * norms[:, None]


def cluster_traits(params, paths: Paths, ds, assigned: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per cluster (ascending ids): its size and its members' mean training loss under the target model."""
    model = new_model(params, ds).eval()
    model.load_state_dict(load_tensors(paths.stage("train_target") / "model.pt"))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ds.x_train), ds.y_train, reduction="none").numpy()
    position = {t: i for i, t in enumerate(ds.train_index)}
    members = pd.DataFrame(
        {"cluster_id": assigned["cluster_id"], "loss": loss[[position[t] for t in assigned["train_index"]]]}
    )
    per_cluster = members[members["cluster_id"] >= 0].groupby("cluster_id")["loss"].agg(["size", "mean"]).sort_index()
    return {"size": per_cluster["size"].to_numpy(), "loss": per_cluster["mean"].to_numpy()}


def correlations(norms: np.ndarray, traits: dict[str, np.ndarray]) -> dict[str, float]:
    return {f"norms vs {k}": float(spearmanr(norms, v)[0]) for k, v in traits.items()}


def measure(name: str) -> dict:
    run_config(name)
    folder = WORK / name
    params, paths = load_params(folder / "params.yaml"), Paths(folder)
    truth, ds, tables = load_ground_truth(paths, params), dataset(params), RunTables.read(paths)
    found, base = methods(tables, params)
    y, clusters = torch.from_numpy(ds.y_test.numpy()), tables.clusters["label"].to_numpy()
    seed = truth.aligned_seed
    cluster = torch.from_numpy(truth.cluster[seed])
    drop = margin(torch.from_numpy(truth.full[seed]), y)[None] - margin(cluster, y.expand(len(cluster), -1))
    true_norms = np.linalg.norm(drop.double().numpy(), axis=1)
    scored = {m: f.scores["margin"] for m, f in found.items() if "margin" in f.scores}
    scalings = {
        "own": lambda s: s,
        "unit": lambda s: rescaled(s, np.ones(len(s))),
        "true norms": lambda s: rescaled(s, true_norms),
    }
    rows = {m: {} for m in scored}
    for scaling, scale in scalings.items():
        quality = evaluate(
            {m: Method({"margin": scale(s)}) for m, s in scored.items()}, base, y.numpy(), clusters, truth
        )
        for m in scored:
            rows[m].update({f"{label}, {scaling}": quality[m][key] for label, key in METRICS.items()})
    traits = cluster_traits(params, paths, ds, tables.assignments)
    for m, s in scored.items():
        norms = np.linalg.norm(s, axis=1)
        rows[m].update({"norms Spearman": float(spearmanr(norms, true_norms)[0]), **correlations(norms, traits)})
    return {"methods": rows, "truth": correlations(true_norms, traits)}


def main(names: list[str]) -> None:
    results = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    for name in names:
        print(f"== {name}", flush=True)
        results[name] = measure(name)
        for m, row in results[name]["methods"].items():
            print(m, {k: round(v, 3) for k, v in row.items()})
    RESULT.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULT.relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["digits_k50", "fashion_k100"])
