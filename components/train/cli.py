"""``clipline train``: check the recipe against the job, then run the torchx component's torchrun command here.

The command is the one the torchx component builds (``launch/component.py``), so a local run and a cluster run
start the same way; on a cluster use ``torchx run -s pytorchjob`` (or the pipeline) instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# The subcommand, as pipelines/cli.py registers every stage: NAME, HELP, DESCRIPTION, add_arguments, run.
NAME = "train"
HELP = "train a CLIP model (CLIPA stages; clip, siglip, fastclip or amorlip objective) with torchrun"
DESCRIPTION = (
    "Check the recipe against the job (batch divisible by the ranks, text lengths within the "
    "model's context, ...), then run torchrun with --nproc-per-node training processes on this "
    "machine: CLIPA stages in order, checkpoints under --output (resumed with --resume auto), "
    "log.jsonl, TensorBoard scalars, metrics.json and the exported open_clip model.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe YAML (a path or a store URI)")
    p.add_argument("--data", required=True, help="the training data's manifest URI (preprocess's manifest.json)")
    p.add_argument("--output", required=True, help="URI prefix for checkpoints, logs, TensorBoard and the model")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes (default: %(default)s)")
    p.add_argument("--resume", default="auto",
                   help="auto (the latest checkpoint under --output, if any), never, or a checkpoint URI")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (exact resumes)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the ranks this many times after a failure, resuming from the latest checkpoint")


def run(args: argparse.Namespace) -> int:
    return launch_local(args.recipe, args.data, args.output, nproc_per_node=args.nproc_per_node, resume=args.resume,
                        deterministic=args.deterministic, max_restarts=args.max_restarts)


def launch_local(recipe: str, data: str, output: str, *, nproc_per_node: int = 1, resume: str = "auto",
                 deterministic: bool = False, max_restarts: int = 0) -> int:
    """Run the torchx component's torchrun command on this machine; returns torchrun's exit code."""
    from components.train.launch.component import train

    # Builds the command and checks the recipe against the world size: a bad recipe fails before any process starts.
    app = train(recipe, data, output, nproc_per_node=nproc_per_node, resume=resume, deterministic=deterministic,
                max_restarts=max_restarts)
    (role,) = app.roles
    env = {**os.environ, **role.env}
    # torchrun of this interpreter (the venv's), whether or not the venv's bin/ is on PATH
    command = [sys.executable, "-m", "torch.distributed.run", *role.args]
    return subprocess.run(command, env=env, check=False).returncode
