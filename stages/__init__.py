"""One module per DVC stage, each with a pure `run(params, paths, out, fan_out) -> metrics`, and what they share."""

STAGES = (
    "train_target",
    "record_trajectory",
    "cluster",
    "curvature",
    "distill",
    "ground_truth",
    "perturb",
    "attribute",
    "baselines",
    "data_quality",
    "report",
)
