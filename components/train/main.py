"""The trainer's process entrypoint, one per rank: ``torchrun ... -m components.train.main --recipe R --data D
--output O``. Also runs as a single process (``python -m components.train.main ...``) without torchrun.

It sets up what a process needs (logging, the process group: NCCL on GPUs, gloo on CPU, with a configurable
timeout; the device), reads the recipe (a path or a store URI) and hands over to ``loop.train``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

from components.common import store
from components.common.config import ConfigError
from components.common.device import DeviceError, resolve_device
from components.common.exit_codes import DONE, report
from components.common.recipe import Recipe, load_recipe, parse_recipe
from components.train.distributed import World
from components.train.loop import RunOptions, TrainingError, train

log = logging.getLogger("clipline.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m components.train.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="recipe YAML: a path, or an s3:// / file:// URI")
    p.add_argument("--data", required=True, help="the training data's manifest URI (preprocess's manifest.json)")
    p.add_argument("--output", required=True, help="prefix for checkpoints, logs and the exported model")
    p.add_argument("--resume", default="auto",
                   help="auto (the latest checkpoint under --output, if any), never, or a checkpoint URI "
                        "(default: %(default)s)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels, so that a resumed run repeats the uninterrupted run's losses")
    p.add_argument("--pg-timeout-minutes", type=float, default=30.0,
                   help="how long a collective waits for a slow or dead rank before failing (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: %(default)s)")
    return p


def read_recipe(location: str) -> Recipe:
    if "://" in location:
        return parse_recipe(store.get_bytes(location).decode("utf-8"), location)
    return load_recipe(location)


def init_process_group(device: torch.device, timeout: datetime.timedelta) -> None:
    """NCCL on GPUs, gloo on CPUs, from torchrun's environment.

    After torchrun restarts the ranks (``--max-restarts``), the new ones may meet in a store that still holds the
    dead attempt's keys, and a rank that reads a dead peer's address fails with "connection refused". Each attempt
    therefore uses its own key prefix."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(f"attempt-{attempt}",
                            store), rank=rank, world_size=world_size, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    # Our own progress on rank 0; libraries (open_clip's model-creation chatter) and other ranks only warn.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    for name in ("clipline", "components"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        recipe = read_recipe(args.recipe)
        device = resolve_device(args.device)
        distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
        if distributed:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            init_process_group(device, datetime.timedelta(minutes=args.pg_timeout_minutes))
        try:
            options = RunOptions(data=args.data, output=args.output.rstrip("/"), resume=args.resume,
                                 deterministic=args.deterministic, log_every=args.log_every)
            train(recipe, options, World.current(), device)
        finally:
            if distributed:
                dist.destroy_process_group()
    except (ConfigError, TrainingError, DeviceError, store.StoreError) as exc:
        log.error("%s", exc)
        return report("train", exc)
    return DONE


if __name__ == "__main__":
    sys.exit(main())
