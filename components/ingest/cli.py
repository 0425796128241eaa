"""``clipline ingest``: the arguments and the handler, for pipelines/cli.py to mount as a subcommand.

    clipline ingest URL_LIST --output s3://bucket/run [--image-size 256 ...]
    clipline ingest --demo --output s3://bucket/run [--demo-limit 1000 --demo-seed 0]

Option flags override ``--config`` (an IngestOptions YAML); flags not given keep the config's or the defaults.
Prints the manifest's URI and a summary as JSON on stdout; exits 1 with the reason on stderr when ingest fails.

``--demo`` is the demo package's (components/demo/dataset.py: it builds the URL list and calls ingest, so it depends
on ingest): ``run`` imports it only when the flag is given, the one place ingest reaches the demo package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from components.common import store
from components.common.config import load, load_yaml
from components.common.exit_codes import FAILED, USAGE, report
from components.ingest.ingest import MANIFEST, IngestError, ingest
from components.ingest.options import IngestOptions, InputFormat, ResizeMode
from components.ingest.url_list import UrlListError

# flag -> IngestOptions field, for the flags that map one to one
_OPTION_FLAGS = {
    "image_size": "image_size", "resize_mode": "resize_mode", "shard_size": "number_sample_per_shard",
    "processes": "processes", "threads": "threads", "timeout": "timeout", "retries": "retries",
    "min_image_size": "min_image_size", "max_aspect_ratio": "max_aspect_ratio",
    "max_image_pixels": "max_image_pixels", "url_col": "url_col", "caption_col": "caption_col",
    "extra_col": "extra_columns", "input_format": "input_format", "min_success_rate": "min_success_rate",
    "max_image_bytes": "max_image_bytes", "allow_network": "allow_networks",
}  # fmt: skip


# The subcommand, as pipelines/cli.py registers every stage: NAME, HELP, DESCRIPTION, add_arguments, run.
NAME = "ingest"
HELP = "download a URL list with img2dataset into webdataset shards in the object store"
DESCRIPTION = (
    "Download a URL list (parquet, csv, tsv or jsonl; local or s3://) with img2dataset into "
    "webdataset shards under <output>/shards/, uploaded as each completes, and commit a manifest "
    "with success and failure counts by reason. --demo builds the list from real images installed "
    "offline (emoji, openclipart, Animal-MNIST), serves it on 127.0.0.1 and holds out a split.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url_list", nargs="?", help="parquet, csv, tsv or jsonl URL list: a path, file:// or s3:// URI")
    parser.add_argument("-o", "--output", required=True, help="output prefix (s3://bucket/prefix or file:///path)")
    parser.add_argument("--config", type=Path, help="IngestOptions YAML; the flags below override it")

    demo = parser.add_argument_group("demo", "build a URL list from images installed offline and ingest it")
    demo.add_argument("--demo", action="store_true", help="ingest the demo source instead of URL_LIST")
    demo.add_argument("--demo-limit", type=int, help="images per source (default: all, about 16,000 in total)")
    demo.add_argument("--demo-seed", type=int, default=0, help="seed of the held-out split (default: %(default)s)")
    demo.add_argument("--demo-heldout", type=float, default=0.1,
                      help="fraction held out per source for evaluation (default: %(default)s)")
    demo.add_argument("--demo-dir", type=Path, help="keep the demo images here (default: a temporary directory)")

    images = parser.add_argument_group("images")
    images.add_argument("--image-size", type=int, help="side of the stored images (default 256)")
    images.add_argument("--resize-mode", choices=get_args(ResizeMode), help="img2dataset resize mode (default border)")
    images.add_argument("--shard-size", type=int, help="samples per shard (default 10000)")
    images.add_argument("--min-image-size", type=int, help="drop images whose smaller side is below this")
    images.add_argument("--max-aspect-ratio", type=float, help="drop images more elongated than this")
    images.add_argument("--max-image-pixels", type=int, help="decompression-bomb guard (default 89478485)")

    speed = parser.add_argument_group("download")
    speed.add_argument("--processes", type=int, help="worker processes (default: one per CPU, at most one per shard)")
    speed.add_argument("--threads", type=int, help="download threads per process (default 32)")
    speed.add_argument("--timeout", type=int, help="seconds per request (default 10)")
    speed.add_argument("--retries", type=int, help="extra attempts per failed URL (default 0)")
    speed.add_argument("--no-incremental", dest="incremental", action="store_false", default=None,
                       help="replace shards already under the output prefix instead of resuming")
    speed.add_argument("--min-success-rate", type=float, help="fail below this success rate (default 0.5)")

    safety = parser.add_argument_group("what the URL list may fetch (see README, Security)")
    safety.add_argument("--allow-network", action="append", metavar="CIDR",
                        help="also fetch from this network although it is not public (repeatable), e.g. your own "
                             "image servers at 10.20.0.0/16; loopback, private, link-local, CGNAT and multicast "
                             "addresses are refused otherwise")
    safety.add_argument("--max-image-bytes", type=int, help="drop responses larger than this (default 33554432)")

    columns = parser.add_argument_group("URL list")
    columns.add_argument("--url-col", help="URL column (default url)")
    columns.add_argument("--caption-col", help="caption column (default caption)")
    columns.add_argument("--extra-col", action="append", help="column copied into each sample's .json (repeatable)")
    columns.add_argument("--input-format", choices=get_args(InputFormat), help="default: from the file name")


def options_from_args(args: argparse.Namespace) -> IngestOptions:
    base = load_yaml(IngestOptions, args.config).model_dump() if args.config else {}
    flags = {field: getattr(args, flag) for flag, field in _OPTION_FLAGS.items() if getattr(args, flag) is not None}
    if args.incremental is not None:
        flags["incremental"] = args.incremental
    return load(IngestOptions, {**base, **flags}, source="clipline ingest arguments")


def run(args: argparse.Namespace) -> int:
    if args.demo == (args.url_list is not None):
        return report(NAME, "give either URL_LIST or --demo", USAGE)
    if args.demo_limit is not None and args.demo_limit < 1 or not 0.0 <= args.demo_heldout < 1.0:
        return report(NAME, "--demo-limit must be at least 1 and --demo-heldout in [0, 1)", USAGE)
    options = options_from_args(args)
    try:
        doc = _ingest_demo(args, options) if args.demo else ingest(args.url_list, args.output, options)
    except (IngestError, UrlListError) as exc:
        return report(NAME, exc, FAILED)
    summary = {k: doc[k] for k in ("counts", "success_rate", "duration_s", "images_per_s")}
    print(json.dumps({"manifest": store.join(args.output, MANIFEST), "shards": len(doc["shards"]), **summary}))
    return 0


def _ingest_demo(args: argparse.Namespace, options: IngestOptions) -> dict:
    from components.demo.dataset import ingest_demo
    from components.demo.sources import SourceUnavailable

    try:
        return ingest_demo(args.output, options, limit=args.demo_limit, seed=args.demo_seed,
                           heldout_fraction=args.demo_heldout, workdir=args.demo_dir)
    except SourceUnavailable as exc:  # no demo source installed: this ingest cannot run, like a bad URL list
        raise IngestError(str(exc)) from None
