"""``clipline evaluate``: the arguments and the handler, for pipelines/cli.py to mount as a subcommand.

    clipline evaluate --model NAME_OR_CONFIG_JSON [--checkpoint URI] --dataset URI [--dataset URI ...] --output PREFIX
    clipline evaluate --write-datasets --output PREFIX [--from-ingest INGEST_MANIFEST_URI]

The first evaluates and prints the metrics' URI and the headline numbers as JSON; the second writes the offline
benchmarks (from the held-out split ``clipline ingest --demo`` published, found through the manifest it printed, or
else straight from the installed sources with the same seeded split) and prints their URIs. Exits 1 with the reason
on stderr on failure.

The benchmarks are the demo's (components/demo/benchmarks.py): ``run`` imports them only for ``--write-datasets``,
the one place evaluate reaches the demo package, which itself depends on evaluate's benchmark writer.
"""

from __future__ import annotations

import argparse
import json

from components.common import store
from components.common.exit_codes import DONE, FAILED, USAGE, report

# The subcommand, as pipelines/cli.py registers every stage: NAME, HELP, DESCRIPTION, add_arguments, run.
NAME = "evaluate"
HELP = "zero-shot classification and retrieval of a model, with metrics.json"
DESCRIPTION = (
    "Evaluate an open_clip model (a config name, an inline JSON config or a .json file, plus a "
    "checkpoint, ours or open_clip_train's) on datasets in CLIP_benchmark's webdataset layout: "
    "zero-shot classification (acc1, acc5, mean per-class recall) and retrieval (recall@1/5/10), "
    "as CLIP_benchmark defines them. --write-datasets builds such datasets from the offline demo "
    "sources (Animal-MNIST, emoji groups and names, openclipart categories).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="output prefix (path, file:// or s3:// URI)")
    ev = parser.add_argument_group("evaluate")
    ev.add_argument("--model", help="open_clip model name, inline JSON config, or a JSON config file (path or URI)")
    ev.add_argument("--checkpoint", help="checkpoint path or URI (default: random init, for smoke tests only)")
    ev.add_argument("--dataset", action="append", default=[],
                    help="benchmark dataset prefix in CLIP_benchmark's webdataset layout (repeatable)")
    ev.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    ev.add_argument("--text-length", type=int, help="tokens per text (default: the model's full context length)")
    ev.add_argument("--training-log", help="JSON-lines training log (path or URI) whose curves the report shows")
    wr = parser.add_argument_group("write datasets", "write the offline benchmark datasets under --output")
    wr.add_argument("--write-datasets", action="store_true", help="write the benchmarks instead of evaluating")
    wr.add_argument("--from-ingest", metavar="INGEST_MANIFEST_URI",
                    help="the manifest `clipline ingest --demo` printed (<its output>/manifest.json): write the "
                         "held-out split it published (default: build from the installed sources with the split "
                         "below)")
    wr.add_argument("--demo-seed", type=int, default=0, help="seed of the held-out split (default: %(default)s)")
    wr.add_argument("--demo-limit", type=int, help="images per source before the split (default: all)")
    wr.add_argument("--demo-heldout-fraction", type=float, default=0.1, help="default: %(default)s")


def run(args: argparse.Namespace) -> int:
    from components.evaluate.benchmark_data import BenchmarkDataError
    from components.evaluate.evaluate import METRICS_FILE, EvaluateError, evaluate

    try:
        if args.write_datasets:
            if args.model or args.dataset:
                return report(NAME, "--write-datasets takes no --model or --dataset", USAGE)
            if args.demo_limit is not None and args.demo_limit < 1 or not 0.0 <= args.demo_heldout_fraction < 1.0:
                return report(NAME, "--demo-limit must be at least 1 and --demo-heldout-fraction in [0, 1)", USAGE)
            from components.demo.benchmarks import benchmarks_from_heldout, benchmarks_from_sources

            if args.from_ingest:
                written = benchmarks_from_heldout(args.from_ingest, args.output)
            else:
                written = benchmarks_from_sources(args.output, seed=args.demo_seed, limit=args.demo_limit,
                                                  heldout_fraction=args.demo_heldout_fraction)
            print(json.dumps({"datasets": {name: info["uri"] for name, info in written.items()},
                              "samples": {name: info["samples"] for name, info in written.items()}}))
            return DONE
        if not args.model or not args.dataset:
            return report(NAME, "give --model and at least one --dataset (or --write-datasets)", USAGE)
        doc = evaluate(args.model, args.dataset, args.output, checkpoint=args.checkpoint,
                       batch_size=args.batch_size, device=args.device, text_length=args.text_length,
                       training_log=args.training_log)
    except (EvaluateError, BenchmarkDataError) as exc:
        return report(NAME, exc, FAILED)
    print(json.dumps({"metrics": store.join(args.output, METRICS_FILE),
                      "report": store.join(args.output, "report.html"),
                      "datasets": {name: r["metrics"] for name, r in doc["datasets"].items()}}))
    return DONE
