"""Command line (also the `ddm` console script): `python -m pipeline run <stage> | flow | serve --cron ... |
deploy --pool ... | explain --test-index N | ui`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ddm_ops.config import ParamsError
from ddm_ops.train import DivergenceError
from stages import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder (holds dvc.yaml, params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage (what dvc.yaml calls)")
    run.add_argument("stage", choices=STAGES)
    sub.add_parser("flow", help="run the whole DAG as a Prefect flow, one task per DVC stage")
    serve = sub.add_parser("serve", help="register the flow as a scheduled Prefect deployment and serve it")
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    serve.add_argument("--name", default="ddm", help="deployment name")
    deploy = sub.add_parser("deploy", help="register the flow with a Prefect work pool (e.g. GPU hosts)")
    deploy.add_argument("--pool", required=True, help="work pool name (prefect work-pool create ...)")
    deploy.add_argument("--cron", default=None, help="optional cron schedule")
    deploy.add_argument("--name", default="ddm", help="deployment name")
    explain = sub.add_parser("explain", help="one test sample's prediction and its most helpful / harmful clusters")
    explain.add_argument("--test-index", type=int, required=True, help="position in the dataset's fixed test split")
    explain.add_argument("--top", type=int, default=5, help="clusters listed each way")
    explain.add_argument("--out", type=Path, default=None, help="PNG to write (default outputs/explain/test-N.png)")
    ui = sub.add_parser("ui", help="start the MLflow UI and the Prefect server on loopback; Ctrl-C stops both")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless you ask otherwise)")
    ui.add_argument("--mlflow-port", type=int, default=5000)
    ui.add_argument("--prefect-port", type=int, default=4200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "run":
            from pipeline.stage import run_stage, stop_on_interrupt

            stop_on_interrupt(args.stage, args.root)
            run_stage(args.stage, args.root)
        elif args.command == "flow":
            from pipeline.flow import ddm_pipeline
            from pipeline.runners import quiet_prefect

            quiet_prefect()
            ddm_pipeline(str(args.root))
        elif args.command == "explain":
            from pipeline.explain import explain as explain_sample

            explain_sample(args.root, args.test_index, args.top, args.out)
        elif args.command == "ui":
            from pipeline.ui import serve_uis

            return serve_uis(args.root, args.host, args.mlflow_port, args.prefect_port)
        elif args.command == "deploy":
            from pipeline.flow import deploy_to_pool

            print(f"deployment {deploy_to_pool(args.pool, args.root, args.name, args.cron)} on work pool {args.pool}")
        else:
            from prefect import serve as prefect_serve

            from pipeline.flow import deployment

            prefect_serve(deployment(args.cron, args.root, args.name))
    except (ParamsError, DivergenceError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ParamsError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
