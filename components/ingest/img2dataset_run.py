"""Call ``img2dataset.download`` (pinned 1.47.0) on a normalised URL list, writing webdataset shards to a local dir.

Must run in the main thread: img2dataset installs a SIGINT handler, which only the main thread may do.

img2dataset downloads in worker processes it spawns, with ``urllib.request.urlopen``, and offers no hook to run code
in them. Its "multiprocessing" distributor is replaced, for the call, by ``_guarded_pool``: the same kind of spawn
pool, whose initializer installs the egress guard (egress.py) in every worker before it downloads anything.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

from components.common.env import temporarily_set
from components.ingest import egress
from components.ingest.options import IngestOptions
from components.ingest.shard_committer import IMAGE_EXT, SHARD_DIGITS
from components.ingest.url_list import CAPTION, URL

# albumentations (imported by img2dataset) otherwise asks a package registry for updates at import time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def download(url_list: Path, output_dir: Path, options: IngestOptions, processes: int) -> None:
    import img2dataset

    # Worker processes are spawned inside download() and inherit this: OpenCV then refuses to decode an image over
    # the limit from its header, before allocating its pixels (img2dataset's own area check runs after decoding).
    env = {"OPENCV_IO_MAX_IMAGE_PIXELS": str(options.max_image_pixels)}
    policy = egress.EgressPolicy(options.allow_networks, options.max_image_bytes)
    with temporarily_set(env), _guarded_workers(policy), _restore_sigint(), _stdout_to_stderr():
        try:
            img2dataset.download(
                url_list=str(url_list),
                output_folder=str(output_dir),
                input_format="parquet",
                url_col=URL,
                caption_col=CAPTION,
                save_additional_columns=list(options.extra_columns) or None,
                output_format="webdataset",
                encode_format=IMAGE_EXT,
                oom_shard_count=SHARD_DIGITS,
                distributor="multiprocessing",
                processes_count=processes,
                thread_count=options.threads,
                number_sample_per_shard=options.number_sample_per_shard,
                image_size=options.image_size,
                resize_mode=options.resize_mode,
                min_image_size=options.min_image_size,
                max_aspect_ratio=options.max_aspect_ratio or float("inf"),
                max_image_area=options.max_image_pixels,
                timeout=options.timeout,
                retries=options.retries,
                # Already-committed shards have their stats file in output_dir: img2dataset skips them.
                incremental_mode="incremental",
                # Nothing downstream reads EXIF, and parsing it costs a second pass over every image.
                extract_exif=False,
                compute_hash="sha256",
                user_agent_token="clipline",
                enable_wandb=False,
            )
        except SystemExit as exc:
            # img2dataset's SIGINT handler calls sys.exit(0): a Ctrl-C must not look like a successful run.
            if exc.code in (0, None):
                raise KeyboardInterrupt("img2dataset interrupted") from None
            raise


@contextlib.contextmanager
def _guarded_workers(policy: egress.EgressPolicy) -> Iterator[None]:
    """img2dataset.download picks its distributor from its module's globals at call time (the module, not the
    package attribute ``img2dataset.main``, which is the CLI function)."""
    module = importlib.import_module("img2dataset.main")
    original = module.multiprocessing_distributor
    module.multiprocessing_distributor = functools.partial(_guarded_pool, policy.to_json())
    try:
        yield
    finally:
        module.multiprocessing_distributor = original


def _guarded_pool(policy_json: str, processes: int, downloader, reader, _subjob_size, max_shard_retry: int) -> None:
    """Run ``downloader`` over the shards ``reader`` yields in spawned workers that each install the egress guard
    first (also the replacements for workers retired after 5 shards); shards that fail are retried."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, maxtasksperchild=5, initializer=egress.install, initargs=(policy_json,)) as pool:
        failed = [row for ok, row in pool.imap_unordered(downloader, reader) if ok is False]
        for _ in range(max_shard_retry):
            if not failed:
                break
            failed = [row for ok, row in pool.imap_unordered(downloader, failed) if ok is False]
        pool.terminate()
        pool.join()


@contextlib.contextmanager
def _restore_sigint() -> Iterator[None]:
    """img2dataset leaves its SIGINT handler (which exits with status 0) installed after it returns."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """img2dataset and the workers it spawns print progress on stdout; send it to stderr (at the file-descriptor
    level, which the workers inherit) so stdout stays the caller's: the CLI prints its JSON summary there."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to keep clean
        yield
        return
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
