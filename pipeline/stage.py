"""Run one DVC stage: validate params.yaml, call the stage's pure run() into a staging folder, write metrics.json."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from ddm_ops.config import load_params
from stages import STAGES
from stages.common import Paths, staged_output, write_json

log = logging.getLogger(__name__)


def run_stage(stage: str, root: Path = Path("."), params_file: str = "params.yaml") -> dict:
    """Run `stage` in project `root`; its outputs appear in outputs/<stage>/ only if it succeeds."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is unknown; stages are: {', '.join(STAGES)}")
    root = root.resolve()
    params = load_params(root / params_file)
    module = importlib.import_module(f"stages.{stage}")
    paths = Paths(root)
    start = time.perf_counter()
    with staged_output(paths.stage(stage)) as out:
        metrics = module.run(params, paths, out)
        metrics["stage_seconds"] = time.perf_counter() - start
        write_json(out / "metrics.json", metrics)
    log.info("%s done in %.1f s", stage, metrics["stage_seconds"])
    return metrics
