"""One module per DVC stage; each has a pure `run(params, paths, out) -> metrics`."""

STAGES = (
    "train_target",
    "record_trajectory",
    "cluster",
    "distill",
    "curvature",
    "ground_truth",
    "perturb",
    "attribute",
    "baselines",
    "data_quality",
    "report",
)
