"""``clipline preprocess``: the stage's command line, registered on the ``clipline`` parser by pipelines/cli.py."""

from __future__ import annotations

import argparse
import json

from components.common.config import load
from components.common.exit_codes import FAILED, report
from components.common.manifest import ManifestError
from components.preprocess.errors import PreprocessError
from components.preprocess.layout import Layout
from components.preprocess.nltk_data import NltkDataError
from components.preprocess.options import PreprocessOptions

# PreprocessOptions fields set by flags of the same name; a flag left out keeps the option's default.
_OPTION_FIELDS = ("resolutions", "shard_size", "min_shards", "min_image_side", "jpeg_quality", "max_reject_fraction",
                  "processes")


# The subcommand, as pipelines/cli.py registers every stage: NAME, HELP, DESCRIPTION, add_arguments, run.
NAME = "preprocess"
HELP = "filter, densely index, resize and re-shard raw shards for training"
DESCRIPTION = (
    "Read the raw img2dataset shards of a RAW_SHARDS manifest and write training shards: rejected "
    "samples dropped and counted, dense indices 0..N-1, images pre-resized at every resolution, "
    "caption POS orders for the syntax mask, balanced shards, sizes.json, and a TRAIN_SHARDS "
    "manifest at <output>/manifest.json, written last. A rerun continues a crashed run.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = PreprocessOptions()
    p.add_argument("--raw-manifest", required=True, help="URI of the RAW_SHARDS manifest written by ingest")
    p.add_argument("--output", required=True, help="s3:// or file:// prefix for the training shards (empty, or "
                                                   "holding an unfinished run of the same inputs and options)")
    p.add_argument("--resolution", type=int, action="append", dest="resolutions", metavar="SIDE",
                   help=f"square side to store each image at; repeat for several (default: {defaults.resolutions})")
    p.add_argument("--shard-size", type=int, help=f"samples per output shard (default: {defaults.shard_size})")
    p.add_argument("--min-shards", type=int,
                   help="at least this many shards: loader workers x world size (default: 1)")
    p.add_argument("--min-image-side", type=int,
                   help=f"reject images whose shorter side is smaller (default: {defaults.min_image_side})")
    p.add_argument("--jpeg-quality", type=int, help=f"JPEG quality of stored images (default: {defaults.jpeg_quality})")
    p.add_argument("--max-reject-fraction", type=float,
                   help=f"fail when more of the input is rejected (default: {defaults.max_reject_fraction})")
    p.add_argument("--processes", type=int, help="worker processes (default: one per available CPU)")


def run(args: argparse.Namespace) -> int:
    from components.preprocess.preprocess import preprocess

    given = {field: getattr(args, field) for field in _OPTION_FIELDS if getattr(args, field) is not None}
    options = load(PreprocessOptions, given, source="clipline preprocess options")  # ConfigError: pipelines/cli.py
    try:
        doc = preprocess(args.raw_manifest, args.output, options)
    except (PreprocessError, NltkDataError, ManifestError) as exc:
        return report(NAME, exc, FAILED)
    print(json.dumps({"manifest": Layout(args.output.rstrip("/")).manifest_uri, "num_samples": doc["num_samples"],
                      "shards": len(doc["shards"]), "rejected": doc["rejected"]}))
    return 0
