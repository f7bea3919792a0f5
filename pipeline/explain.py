"""`python -m pipeline explain --test-index 17`: one test sample's prediction and the clusters that help and hurt it
most, from a finished run's outputs; printed, and drawn as a PNG (synset image above a real member of each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ddm_ops.config import ParamsError, load_params
from ddm_ops.objectives import OBJECTIVES
from stages.artifacts import Paths, load_tensors, logits_table, read_parquet, score_matrix
from stages.common import dataset
from stages.reporting.figures import figure_examples


def explain(root: Path, test_index: int, top: int = 5, out: Path | None = None) -> dict:
    """Print and return the prediction of θ_T on test sample `test_index` (its position in the dataset's fixed test
    split) with the `top` most helpful and most harmful clusters by the headline objective; write the figure."""
    params = load_params(root / "params.yaml")
    paths = Paths(root.resolve())
    ds = dataset(params)
    where = np.flatnonzero(ds.test_index == test_index)
    if not len(where):
        raise ParamsError(
            f"--test-index {test_index}: not among this run's {len(ds.test_index)} test samples "
            f"(test_index {ds.test_index.min()} to {ds.test_index.max()}, see outputs/attribute/attribution.parquet)"
        )
    j = int(where[0])
    objective = params.attribute.objectives[0]
    attribution = read_parquet(paths.stage("attribute") / "attribution.parquet")
    wide = score_matrix(attribution[attribution["objective"] == objective])
    matrix, cluster_ids = wide.to_numpy(), wide.index.to_numpy()
    _, _, logits = logits_table(read_parquet(paths.stage("perturb") / "outputs.parquet"))
    base = logits[0, j]
    label = int(ds.y_test[j])
    probabilities = base.softmax(-1)
    clusters = read_parquet(paths.stage("cluster") / "clusters.parquet").set_index("cluster_id")
    scores = pd.DataFrame(
        {
            "cluster_id": cluster_ids,
            "label": clusters.loc[cluster_ids, "label"].to_numpy(),
            "size": clusters.loc[cluster_ids, "size"].to_numpy(),
            "score": matrix[:, j],
        }
    )
    helpful = scores.nlargest(top, "score")
    harmful = scores.nsmallest(top, "score")
    result = {
        "test_index": test_index,
        "label": label,
        "predicted": int(base.argmax()),
        "probability": float(probabilities.max()),
        objective: float(OBJECTIVES[objective](base[None], ds.y_test[j : j + 1])[0]),
        "helpful": helpful,
        "harmful": harmful,
    }
    print(
        f"test sample {test_index}: class {label}, predicted {result['predicted']} (p = {result['probability']:.3f}), "
        f"{objective} {result[objective]:+.3f}"
    )
    print(f"scores: drop of the {objective} when the cluster is removed (positive: the cluster helps)")
    for name, table in (("most helpful", helpful), ("most harmful", harmful)):
        print(f"\n{name} clusters:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    out = out or paths.root / "outputs" / "explain" / f"test-{test_index}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    assign = read_parquet(paths.stage("cluster") / "assignments.parquet")
    synset = load_tensors(paths.stage("distill") / "synset.pt")
    figure_examples(ds, matrix, cluster_ids, assign, synset, np.array([j]), out, top=top)
    print(f"\nfigure: {out}")
    result["figure"] = out
    return result
