"""The ``clipline`` command: one subcommand per pipeline stage, plus the local runner, the compiler and the store."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

DEFAULT_STORE_DIR = ".clipline/store"

def _compile(args: argparse.Namespace) -> int:
    from pipelines.pipeline import ImageRefError
    from pipelines.submit import SubmitError, compile_pipeline

    try:
        print(f"wrote {compile_pipeline(Path(args.output), args.parts, image=args.image)}")
    except ImageRefError as exc:
        print(f"clipline compile: --image: {exc}", file=sys.stderr)
        return 2
    except SubmitError as exc:
        print(f"clipline compile: {exc}", file=sys.stderr)
        return 1
    return 0


def _submit(args: argparse.Namespace) -> int:
    from pipelines.submit import SubmitError, submit

    params = {}
    for item in args.param:
        key, eq, value = item.partition("=")
        if not eq:
            print(f"clipline submit: --param takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        params[key] = value
    from pipelines.pipeline import ImageRefError

    try:
        result = submit(args.host, namespace=args.namespace, token_path=args.token_path, image=args.image,
                        pipeline=Path(args.pipeline), pipeline_name=args.pipeline_name, params=params,
                        experiment=args.experiment, runs_root=args.runs_root, url_lists=args.url_lists,
                        skip_if_unchanged=args.skip_if_unchanged)
    except ImageRefError as exc:
        print(f"clipline submit: --image: {exc}", file=sys.stderr)
        return 2
    except SubmitError as exc:
        print(f"clipline submit: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def _store_up(args: argparse.Namespace) -> int:
    from components.common import embedded_store

    info = embedded_store.start(args.dir, port=args.port, bucket=args.bucket)
    print(f"S3 store running at {info.endpoint} (pid {info.pid}, data in {info.state_dir}, bucket {info.bucket})",
          file=sys.stderr)
    print(info.shell_exports(), end="")
    if args.foreground:
        print("serving in the foreground; Ctrl-C stops it", file=sys.stderr)
        try:
            while embedded_store.status(args.dir) is not None:
                time.sleep(1)
            print("the server exited", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            embedded_store.stop(args.dir)
    return 0


def _store_down(args: argparse.Namespace) -> int:
    from components.common import embedded_store

    stopped = embedded_store.stop(args.dir)
    print("stopped" if stopped else f"no store running for {args.dir}", file=sys.stderr)
    return 0


def _store_status(args: argparse.Namespace) -> int:
    from components.common import embedded_store

    info = embedded_store.status(args.dir)
    if info is None:
        print(f"no store running for {args.dir}", file=sys.stderr)
        return 1
    print(json.dumps({"endpoint": info.endpoint, "pid": info.pid, "bucket": info.bucket,
                      "state_dir": str(info.state_dir), "access_key": info.access_key}, indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.local import run_local
    from pipelines.steps import StepError

    try:
        manifest = run_local(args.recipe, url_list=args.url_list, demo_limit=args.demo_limit,
                             run_prefix=args.run_prefix, models_prefix=args.models_prefix, store_dir=args.store_dir,
                             use_env_store=args.use_env_store, nproc_per_node=args.nproc_per_node,
                             parts=args.parts, allow_networks=tuple(args.allow_network or ()))
    except StepError as exc:
        print(f"clipline run: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # kfp's local runner: "Pipeline ... FAILURE. Inner task failed: 'train'"
        print(f"clipline run: {exc} (the failed step's log is above)", file=sys.stderr)
        return 1
    print(f"run manifest: {manifest['run_prefix']}/run.json")
    for name, metrics in manifest["stages"]["evaluate"]["results"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    print(f"promoted as latest under {manifest['models_prefix']}: {manifest['stages']['promote']['promoted']}")
    print(f"report: {manifest['local_report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipline",
        description="Train CLIP models efficiently: ingest -> preprocess -> train -> evaluate, "
                    "locally or on Kubeflow. S3 settings come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Every stage's CLI registers its own subcommand (help, arguments, handler) the same way.
    from components.evaluate import cli as evaluate_cli
    from components.ingest import cli as ingest_cli
    from components.preprocess import cli as preprocess_cli
    from components.train import cli as train_cli

    for stage in (ingest_cli, preprocess_cli, train_cli, evaluate_cli):
        command = sub.add_parser(stage.NAME, help=stage.HELP, description=stage.DESCRIPTION)
        stage.add_arguments(command)
        command.set_defaults(func=stage.run)

    run = sub.add_parser(
        "run", help="run the whole pipeline locally with an embedded S3 store",
        description="Run the Kubeflow pipeline clip-pretrain on this machine with kfp's local runner: starts an "
                    "embedded S3 store (SeaweedFS) unless --use-env-store, validates the recipe, then ingest, "
                    "preprocess, train (torchrun here), evaluate and promote, and commits a run manifest under the "
                    "run prefix; a copy of the HTML report is kept under .clipline/reports/.",
    )
    run.add_argument("--recipe", default="configs/demo.yaml", help="recipe YAML (default: %(default)s)")
    run.add_argument("--allow-network", action="append", metavar="CIDR",
                     help="let ingest fetch from this non-public network too (repeatable; see README, Security)")
    run.add_argument("--url-list", help="URL list to ingest; several as comma-separated lists or a directory/prefix "
                                        "ending in / (gathered into one first) (default: the offline demo source)")
    run.add_argument("--demo-limit", type=int, default=3000,
                     help="demo source: at most this many images per source (default: %(default)s)")
    run.add_argument("--run-prefix", help="s3:// or file:// prefix for the run's outputs "
                                          "(default: s3://clipline/runs/<recipe>-<time>)")
    run.add_argument("--parts", type=int, default=1,
                     help="fan ingest and preprocess out over this many steps, as on a cluster (default: %(default)s)")
    run.add_argument("--models-prefix", help="where the promoted model pointer lives (default: <bucket>/models)")
    run.add_argument("--nproc-per-node", type=int, default=1,
                     help="training processes on this machine (default: %(default)s)")
    run.add_argument("--store-dir", default=DEFAULT_STORE_DIR, help="embedded store state (default: %(default)s)")
    run.add_argument("--use-env-store", action="store_true",
                     help="use the S3 endpoint in AWS_ENDPOINT_URL instead of an embedded store")
    run.set_defaults(func=_run)

    from components.train.launch.jobspec import DEFAULT_IMAGE
    from pipelines.submit import COMPILED, MIN_KFP_BACKEND, PIPELINE_NAME, TOKEN_PATH_ENV

    comp = sub.add_parser("compile", help="write the Kubeflow pipeline YAML (pipelines/compiled/)",
                          description="Compile the KFP pipeline clip-pretrain to YAML for upload in the KFP UI or "
                                      "`clipline submit`: every step runs --image, which is also the default of the "
                                      "pipeline's image parameter (the training job's pods). The YAML uses only "
                                      f"fields KFP backend {MIN_KFP_BACKEND} (Kubeflow 1.10) and later know. The "
                                      "committed file is checked by a test.")
    comp.add_argument("--output", default=str(COMPILED), help="default: %(default)s")
    comp.add_argument("--parts", type=int, help="pods that ingest and preprocess fan out over (default: 4, the "
                                                "committed pipeline's)")
    comp.add_argument("--image", default=DEFAULT_IMAGE,
                      help="image of every step and of the training job: REGISTRY/REPOSITORY@sha256:DIGEST "
                           "(recommended) or REGISTRY/REPOSITORY:TAG (default: %(default)s)")
    comp.set_defaults(func=_compile)
    sm = sub.add_parser("submit", help="submit a run of the pipeline to a KFP server, as a pipeline version",
                        description="Upload the pipeline as a pipeline version (named after its image and the "
                                    "YAML's hash; reused when it exists) and create a run of that version on a "
                                    "Kubeflow Pipelines server. Authenticates with a projected ServiceAccount token "
                                    f"(--token-path, default ${TOKEN_PATH_ENV}); without one it sends no "
                                    "credentials (standalone KFP). --url-lists passes every URL list under a "
                                    "prefix to the run, whose first step gathers them; with --skip-if-unchanged "
                                    "nothing is submitted when those lists did not change since the last "
                                    "submission (scheduled retraining).")
    sm.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888")
    sm.add_argument("--namespace", help="multi-user Kubeflow: the profile namespace the experiment, pipeline and "
                                        "run belong to (standalone KFP: leave out)")
    sm.add_argument("--token-path", help="file with a ServiceAccount token of audience pipelines.kubeflow.org "
                                         f"(default: ${TOKEN_PATH_ENV} when set, else no credentials)")
    sm.add_argument("--image", help="compile the pipeline with this image (see `clipline compile --image`) instead "
                                    "of uploading --pipeline")
    sm.add_argument("--pipeline", default=str(COMPILED),
                    help="compiled pipeline YAML to upload when no --image is given (default: %(default)s)")
    sm.add_argument("--pipeline-name", default=PIPELINE_NAME, help="KFP pipeline name (default: %(default)s)")
    sm.add_argument("--experiment", default="clipline", help="KFP experiment (default: %(default)s)")
    sm.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline parameter (repeatable), e.g. recipe=configs/demo.yaml, nodes=4")
    sm.add_argument("--runs-root", default="s3://clipline/runs",
                    help="run_prefix is <runs-root>/clip-pretrain-<time> unless --param run_prefix=... "
                         "(default: %(default)s)")
    sm.add_argument("--url-lists", help="train on every URL list under this s3:// prefix (passed to the run as "
                                        "url_list, comma-separated; the pipeline gathers them)")
    sm.add_argument("--skip-if-unchanged", action="store_true",
                    help="with --url-lists: submit only when the lists changed since the last submission")
    sm.set_defaults(func=_submit)

    st = sub.add_parser("store", help="start, stop or inspect the embedded S3 store (SeaweedFS on 127.0.0.1)",
                        description="Manage a local S3 server (SeaweedFS) with generated credentials. "
                                    "`eval \"$(clipline store up)\"` exports its endpoint and credentials.")
    st_sub = st.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = st_sub.add_parser("up", help="start the server (or reuse the running one) and print the env to export",
                           description="Start SeaweedFS bound to 127.0.0.1, wait until its S3 API accepts writes, "
                                       "and print `export ...` lines for AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                                       "AWS_SECRET_ACCESS_KEY and AWS_REGION.")
    up.add_argument("--port", type=int, help="S3 port (default: a free one, kept across restarts)")
    up.add_argument("--bucket", default="clipline", help="bucket to create (default: %(default)s)")
    up.add_argument("--foreground", action="store_true", help="keep running until Ctrl-C, then stop the server")
    up.set_defaults(func=_store_up)
    down = st_sub.add_parser("down", help="stop the server (SIGTERM, then SIGKILL after a grace period)",
                             description="Stop the server; its data and credentials stay for the next `up`.")
    down.set_defaults(func=_store_down)
    status = st_sub.add_parser("status", help="print endpoint and pid (exit 1 when not running)",
                               description="Print the running server's endpoint, pid and access key id "
                                           "(never the secret); exit 1 when none runs.")
    status.set_defaults(func=_store_status)
    for p in (up, down, status):
        p.add_argument("--dir", type=Path, default=Path(DEFAULT_STORE_DIR),
                       help="state directory (default: %(default)s)")
    return parser


def _exit_on_sigterm(signum, frame):  # noqa: ARG001
    # Turn SIGTERM into an exception so `finally` blocks stop servers and child processes.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Exit codes, for every subcommand: components/common/exit_codes.py's rule."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from components.common.config import ConfigError
    from components.common.device import DeviceError
    from components.common.embedded_store import EmbeddedStoreError
    from components.common.exit_codes import USAGE, exit_code, report
    from components.common.store import StoreError

    try:
        return args.func(args)
    except (ConfigError, DeviceError, StoreError) as exc:
        return report(args.command, exc, exit_code(exc))
    except EmbeddedStoreError as exc:
        return report(args.command, exc, USAGE)


if __name__ == "__main__":
    sys.exit(main())
