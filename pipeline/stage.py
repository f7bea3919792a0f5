"""Run one DVC stage: validate params.yaml, call the stage's pure run() into a staging folder, write metrics.json."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ddm_ops.config import Params, ParamsError, load_params
from ddm_ops.data import Dataset
from ddm_ops.models import check_model_fits
from pipeline.runners import executor
from stages import STAGES
from stages.artifacts import Paths, staged_output, write_json
from stages.common import dataset

log = logging.getLogger(__name__)


def run_stage(stage: str, root: Path = Path("."), params_file: str = "params.yaml") -> dict:
    """Run `stage` in project `root`; its outputs appear in outputs/<stage>/ only if it succeeds."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is unknown; stages are: {', '.join(STAGES)}")
    root = root.resolve()
    params = load_params(root / params_file)
    check_params_against_data(params, dataset(params))  # before any work, in whichever stage runs first
    module = importlib.import_module(f"stages.{stage}")
    paths = Paths(root)
    start = time.perf_counter()
    with staged_output(paths.stage(stage)) as out:
        metrics = module.run(params, paths, out, executor(params.execution, params.base.device))
        metrics["stage_seconds"] = time.perf_counter() - start
        write_json(out / "metrics.json", metrics)
        if stage == "report":  # inside the staging block: a run MLflow could not take leaves no report either
            from pipeline.tracking import log_report

            log_report(root, params, out, metrics)
    log.info("%s done in %.1f s", stage, metrics["stage_seconds"])
    return metrics


def stop_on_interrupt(stage: str, root: Path = Path(".")) -> None:
    """Make Ctrl-C (SIGINT) or SIGTERM end a stage run from the command line at once, on every runner.

    Work in threads, worker processes or a Dask cluster cannot be interrupted where it is, and the terminal's Ctrl-C
    also stops Prefect's temporary server, after which a fan-out would keep going without it. So the handler prints
    one line, marks the fan-out's flow run Cancelled on a Prefect server of your own (PREFECT_API_URL), removes the
    stage's outputs and staging folder (nothing is left that looks valid), stops this process's children and exits
    with 128 + the signal's number, without waiting for the work in flight.
    """
    final = Paths(root.resolve()).stage(stage)
    own_server = bool(os.environ.get("PREFECT_API_URL"))  # not the temporary one the stage may start

    def handler(signum: int, _frame) -> None:
        print(f"{stage}: interrupted; nothing of it is kept (dvc repro redoes it)", file=sys.stderr, flush=True)
        if own_server:
            from pipeline.runners import cancel_running_flow

            cancel_running_flow()
        for path in (final, final.with_name(f".{final.name}.staging")):
            shutil.rmtree(path, ignore_errors=True)
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def check_params_against_data(params: Params, ds: Dataset) -> None:
    """Checks that need the data: raise ParamsError before any training."""
    counts = np.bincount(ds.y_train.numpy(), minlength=ds.num_classes)
    if params.cluster.k_per_class > counts.min():
        raise ParamsError(
            f"cluster.k_per_class = {params.cluster.k_per_class}: must be at most the smallest class's training "
            f"size ({counts.min()} samples of class {counts.argmin()})"
        )
    k, ipc = params.cluster.k_per_class * ds.num_classes, params.distill.ipc
    if params.report.membership_references and k * ipc >= len(ds.y_train):
        raise ParamsError(
            f"report.membership_references = {params.report.membership_references}: the attack's reference models "
            f"train on the images no synset starts from, and {k} clusters x distill.ipc {ipc} use all "
            f"{len(ds.y_train)} training images; set it to 0 or lower distill.ipc"
        )
    check_model_fits(params.model, ds.image_shape)
