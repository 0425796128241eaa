"""Samples/s per worker: clipline's loader on preprocessed shards vs open_clip_train's pipeline on raw shards.

    .venv/bin/python benchmarks/loader.py [--per-source 500] [--size 64] [--batch 64] [--workers 2] [--raw-side 256]

The data is made by the real stages, in this run, from the offline demo source (emoji, openclipart, Animal-MNIST):
``ingest_demo`` (img2dataset over a loopback HTTP server, raw JPEGs at --raw-side, img2dataset's default 256) and
``preprocess`` (images stored at --size). Their throughputs are printed too. Then

- open_clip_train (``open_clip_train.data.get_wds_dataset``) reads the raw img2dataset shards: it decodes the
  --raw-side JPEGs and applies open_clip's training transform (RandomResizedCrop to --size, normalise);
- ``components.train.data.train_loader`` reads the training shards: images already at --size, decoded, augmented as
  a recipe stage does by default (``recipe.Augmentation()``: open_clip_train's RandomResizedCrop, scale 0.9-1.0) and
  normalised.

Both tokenise the caption to 32 tokens with open_clip's tokenizer, use the same batch size and worker count, and read
local files (file://), so the figures compare decoding and transforms, not the network. Each loader runs one warm-up
epoch (worker start-up), then --epochs timed epochs; the figure is timed samples over timed seconds, divided by the
worker count. The machine is shared, so read the ratio rather than the absolute figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from open_clip_train.data import get_wds_dataset

from components.common import store
from components.common.recipe import Augmentation
from components.demo.dataset import ingest_demo
from components.ingest.options import IngestOptions
from components.preprocess.options import PreprocessOptions
from components.preprocess.preprocess import preprocess
from components.train.data import TrainLoader, train_loader
from components.train.distributed import World

TEXT_LENGTH = 32
SHARD_SIZE = 256


@dataclass(frozen=True)
class LoaderSettings:
    """What both loaders are given alike (benchmarks/gpu.py sets its own)."""

    size: int  # training resolution: clipline's stored images, open_clip's RandomResizedCrop
    batch: int
    workers: int
    text_length: int = TEXT_LENGTH  # clipline's loader only: benchmarks/gpu.py feeds its batches to a model


def make_shards(root: Path, per_source: int, size: int,
                raw_side: int) -> tuple[list[tuple[Path, int]], str, int, dict]:
    """Ingest the demo source and preprocess it; returns ((raw shard path, samples) per raw shard, training
    manifest, N, stage figures)."""
    ingested = ingest_demo((root / "ingest").as_uri(), IngestOptions(image_size=raw_side,
                                                                     number_sample_per_shard=SHARD_SIZE),
                           limit=per_source)
    prepared = preprocess(store.join((root / "ingest").as_uri(), "manifest.json"), (root / "train").as_uri(),
                          PreprocessOptions(resolutions=(size,), shard_size=SHARD_SIZE, min_image_side=size))
    raw = [(store.local_path(s["uri"]), s["samples"]) for s in ingested["shards"]]
    figures = {"ingest images/s": ingested["images_per_s"],
               "preprocess images/s per process": prepared["images_per_s_per_process"],
               "preprocess processes": prepared["filter_processes"]}
    return raw, store.join((root / "train").as_uri(), "manifest.json"), prepared["num_samples"], figures


def timed_epochs(run_epoch: Callable[[int], int], epochs: int) -> tuple[float, float]:
    """(seconds of the warm-up epoch, samples/s over the timed epochs)."""
    start = time.perf_counter()
    run_epoch(0)
    warmup = time.perf_counter() - start
    start, seen = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        seen += run_epoch(epoch)
    return warmup, seen / (time.perf_counter() - start)


def clipline_loader(manifest: str, settings: LoaderSettings) -> TrainLoader:
    return train_loader(manifest, batch_size=settings.batch, world=World(), seed=0, image_size=settings.size,
                        text_length=settings.text_length, text_mask="truncate", augment=Augmentation(),
                        workers=settings.workers,
                        pin_memory=False)


def clipline_run(manifest: str, settings: LoaderSettings) -> Callable[[int], int]:
    loader = clipline_loader(manifest, settings)
    return lambda epoch: sum(len(b.indices) for b in loader.epoch(epoch))


def resume_cost(manifest: str, settings: LoaderSettings) -> tuple[float, float, int]:
    """Seconds to the first batch of an epoch from its start and from its middle (a restart's replay), warm workers."""
    loader = clipline_loader(manifest, settings)
    list(loader.epoch(0))
    middle = loader.steps_per_epoch // 2

    def first_batch(start_step: int) -> float:
        started = time.perf_counter()
        next(loader.epoch(1, start_step=start_step))
        return time.perf_counter() - started

    return first_batch(0), first_batch(middle), middle


def open_clip_run(raw_tars: list[Path], num_samples: int, settings: LoaderSettings) -> Callable[[int], int]:
    oc_args = argparse.Namespace(
        train_data="::".join(str(p) for p in raw_tars), train_num_samples=num_samples, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=settings.batch, world_size=1, workers=settings.workers,
    )
    tokenizer = SimpleTokenizer(context_length=TEXT_LENGTH)
    info = get_wds_dataset(oc_args, image_transform(settings.size, is_train=True), is_train=True, tokenizer=tokenizer)

    def run(epoch: int) -> int:
        info.set_epoch(epoch)
        return sum(len(images) for images, _ in info.dataloader)

    return run


def whole_batch_shards(raw: list[tuple[Path, int]], batch: int) -> list[Path]:
    """The raw shards open_clip_train can read here. Its pipeline repeats a worker's shards until that worker has
    made its batches, so a worker whose shards hold less than one batch loops forever (no batch ever comes out):
    leave out shards smaller than a batch (the partial last one), which keeps every worker's share at least one."""
    return [path for path, samples in raw if samples >= batch]


def compare_loaders(raw_tars: list[Path], manifest: str, num_samples: int, settings: LoaderSettings,
                    epochs: int) -> dict[str, float]:
    """Samples/s of open_clip_train's pipeline on the raw shards, then of clipline's on the training shards."""
    rates = {}
    for name, run in (("open_clip_train get_wds_dataset, raw shards", open_clip_run(raw_tars, num_samples, settings)),
                      ("clipline train_loader, preprocessed shards", clipline_run(manifest, settings))):
        warmup, rate = timed_epochs(run, epochs)
        rates[name] = rate
        print(f"{name:46s} {rate / max(1, settings.workers):8.1f} samples/s per worker "
              f"({rate:.1f} samples/s total; warm-up epoch {warmup:.1f} s)")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-source", type=int, default=500, help="demo images per source (3 sources)")
    parser.add_argument("--size", type=int, default=64, help="training resolution (CLIPA pretrain)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--raw-side", type=int, default=256, help="img2dataset's image size for the raw shards")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = LoaderSettings(size=args.size, batch=args.batch, workers=args.workers)

    with tempfile.TemporaryDirectory(prefix="clipline-loader-bench-") as tmp:
        t0 = time.perf_counter()
        raw, manifest, n, figures = make_shards(Path(tmp), args.per_source, args.size, args.raw_side)
        raw_tars = whole_batch_shards(raw, args.batch)
        raw_mb = sum(p.stat().st_size for p in raw_tars) / 1e6
        train_mb = sum(p.stat().st_size for p in (Path(tmp) / "train").rglob("*.tar")) / 1e6
        print(f"ingest + preprocess of the demo source: {n} training samples in {time.perf_counter() - t0:.1f} s; "
              f"raw shards {raw_mb:.1f} MB ({args.raw_side} px), training shards {train_mb:.1f} MB ({args.size} px)")
        print("  " + ", ".join(f"{k}: {v}" for k, v in figures.items()))
        print(f"batch {args.batch}, {args.workers} workers, text {TEXT_LENGTH} tokens, {len(raw_tars)} of the "
              f"{len(raw)} raw shards for open_clip_train, 1 warm-up + {args.epochs} timed epochs each, "
              f"os.cpu_count()={os.cpu_count()}")

        rates = compare_loaders(raw_tars, manifest, n, settings, args.epochs)
        theirs, ours = rates.values()
        print(f"ratio clipline / open_clip_train: {ours / theirs:.2f}x")
        from_start, from_middle, middle = resume_cost(manifest, settings)
        print(f"clipline resume: first batch after {from_start:.2f} s from step 0, after {from_middle:.2f} s from "
              f"step {middle} (replaying the epoch's first half: read and decode, no tokenise or normalise)")


if __name__ == "__main__":
    main()
