"""Samples/s per worker: clipline's loader on preprocessed shards vs open_clip_train's pipeline on raw shards.

    .venv/bin/python benchmarks/loader.py [--samples 1536] [--size 64] [--batch 64] [--workers 2] [--raw-side 512]

The same real images feed both: public-domain clipart from Debian's openclipart-png (/usr/share/openclipart/png),
alpha composited onto white. The shards are synthesised here, not made by the ingest and preprocess stages:

- raw shards, as img2dataset writes them (<key>.jpg, <key>.txt, <key>.json): JPEGs whose longer side is --raw-side,
  which open_clip_train (``open_clip_train.data.get_wds_dataset``) decodes and passes through open_clip's training
  transform (RandomResizedCrop to --size, normalise);
- training shards in clipline's contract (components.common.datasets): <key>.img<S>.jpg already resized and centre
  cropped to --size, which ``components.train.data.train_loader`` decodes and normalises.

Both tokenise the caption to 32 tokens with open_clip's tokenizer, use the same batch size and worker count, and read
local files (file://), so the figures compare decoding and transforms, not the network. Each loader runs one warm-up
epoch (worker start-up), then --epochs timed epochs; the figure is timed samples over timed seconds, divided by the
worker count. The machine is shared, so read the ratio rather than the absolute figures.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from open_clip.tokenizer import SimpleTokenizer  # noqa: E402
from open_clip.transform import image_transform  # noqa: E402
from open_clip_train.data import get_wds_dataset  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from components.common import datasets  # noqa: E402
from components.common.manifest import write_manifest  # noqa: E402
from components.train.data import TrainLoader, train_loader  # noqa: E402
from components.train.distributed import World  # noqa: E402

CLIPART = Path("/usr/share/openclipart/png")
TEXT_LENGTH = 32
SHARD_SIZE = 128


def clipart(limit: int) -> Iterable[tuple[Image.Image, str]]:
    """Real images and a caption from each one's category folders and file name."""
    for path in sorted(CLIPART.rglob("*.png")):
        if limit == 0:
            return
        try:
            with Image.open(path) as img:
                rgba = img.convert("RGBA")
        except OSError:
            continue  # a few files in the package are not readable PNGs
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        words = [*path.relative_to(CLIPART).parent.parts, *path.stem.replace("_", " ").split()]
        yield Image.alpha_composite(white, rgba).convert("RGB"), " ".join(w for w in words if not w.isdigit())
        limit -= 1


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def synthesise(root: Path, samples: int, size: int, raw_side: int) -> tuple[list[Path], str, int]:
    """Raw shards, training shards and their manifest from the same images; returns (raw shards, manifest, N)."""
    raw_dir, train_dir = root / "raw", root / "train"
    raw_dir.mkdir()
    train_dir.mkdir()
    raw_tars, train_shards, n = [], [], 0
    raw_tar = train_tar = None
    for n, (img, text) in enumerate(clipart(samples)):
        if n % SHARD_SIZE == 0:
            for tar in (raw_tar, train_tar):
                if tar:
                    tar.close()
            shard = n // SHARD_SIZE
            raw_tars.append(raw_dir / f"{shard:05d}.tar")
            raw_tar = tarfile.open(raw_tars[-1], "w")
            train_path = train_dir / f"shard-{shard:05d}.tar"
            train_tar = tarfile.open(train_path, "w")
            train_shards.append({"uri": train_path.as_uri(), "samples": 0, "first_index": n, "sha256": ""})
        raw = img.copy()
        raw.thumbnail((raw_side, raw_side), Image.Resampling.BICUBIC)
        raw_key = f"{n // SHARD_SIZE:05d}{n % SHARD_SIZE:04d}"
        add(raw_tar, f"{raw_key}.jpg", jpeg(raw, 90))
        add(raw_tar, f"{raw_key}.txt", text.encode())
        add(raw_tar, f"{raw_key}.json", json.dumps({"key": raw_key, "caption": text, "status": "success",
                                                    "width": raw.width, "height": raw.height}).encode())
        key = datasets.sample_key(n)
        add(train_tar, f"{key}.{datasets.image_field(size)}",
            jpeg(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC), 95))
        add(train_tar, f"{key}.txt", text.encode())
        words = text.split()
        add(train_tar, f"{key}.json", json.dumps({"index": n, "words": words, "pos_order": [4] * len(words),
                                                  "source_key": raw_key}).encode())
        train_shards[-1]["samples"] += 1
    for tar in (raw_tar, train_tar):
        if tar:
            tar.close()
    num_samples = n + 1
    manifest = (train_dir / "manifest.json").as_uri()
    write_manifest(manifest, datasets.TRAIN_SHARDS, {"num_samples": num_samples, "shards": train_shards,
                                                     "resolutions": [size], "rejected": {}, "sizes_uri": ""})
    return raw_tars, manifest, num_samples


def timed_epochs(run_epoch: Callable[[int], int], epochs: int) -> tuple[float, float]:
    """(seconds of the warm-up epoch, samples/s over the timed epochs)."""
    start = time.perf_counter()
    run_epoch(0)
    warmup = time.perf_counter() - start
    start, seen = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        seen += run_epoch(epoch)
    return warmup, seen / (time.perf_counter() - start)


def clipline_loader(manifest: str, args: argparse.Namespace) -> TrainLoader:
    return train_loader(manifest, batch_size=args.batch, world=World(), seed=0, image_size=args.size,
                        text_length=TEXT_LENGTH, text_mask="truncate", workers=args.workers, pin_memory=False)


def clipline_run(manifest: str, args: argparse.Namespace) -> Callable[[int], int]:
    loader = clipline_loader(manifest, args)
    return lambda epoch: sum(len(b.indices) for b in loader.epoch(epoch))


def resume_cost(manifest: str, args: argparse.Namespace) -> tuple[float, float, int]:
    """Seconds to the first batch of an epoch from its start and from its middle (a restart's replay), warm workers."""
    loader = clipline_loader(manifest, args)
    list(loader.epoch(0))
    middle = loader.steps_per_epoch // 2

    def first_batch(start_step: int) -> float:
        started = time.perf_counter()
        next(loader.epoch(1, start_step=start_step))
        return time.perf_counter() - started

    return first_batch(0), first_batch(middle), middle


def open_clip_run(raw_tars: list[Path], num_samples: int, args: argparse.Namespace) -> Callable[[int], int]:
    oc_args = argparse.Namespace(
        train_data="::".join(str(p) for p in raw_tars), train_num_samples=num_samples, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=args.batch, world_size=1, workers=args.workers,
    )
    tokenizer = SimpleTokenizer(context_length=TEXT_LENGTH)
    info = get_wds_dataset(oc_args, image_transform(args.size, is_train=True), is_train=True, tokenizer=tokenizer)

    def run(epoch: int) -> int:
        info.set_epoch(epoch)
        return sum(len(images) for images, _ in info.dataloader)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1536)
    parser.add_argument("--size", type=int, default=64, help="training resolution (CLIPA pretrain)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--raw-side", type=int, default=512, help="longer side of the raw JPEGs")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="clipline-loader-bench-") as tmp:
        t0 = time.perf_counter()
        raw_tars, manifest, n = synthesise(Path(tmp), args.samples, args.size, args.raw_side)
        raw_mb = sum(p.stat().st_size for p in raw_tars) / 1e6
        train_mb = sum(p.stat().st_size for p in (Path(tmp) / "train").glob("*.tar")) / 1e6
        print(f"synthesised {n} samples from {CLIPART} in {time.perf_counter() - t0:.1f} s (not the ingest/preprocess "
              f"stages): raw shards {raw_mb:.1f} MB (JPEG longer side {args.raw_side}), training shards "
              f"{train_mb:.1f} MB ({args.size} px)")
        print(f"batch {args.batch}, {args.workers} workers, text {TEXT_LENGTH} tokens, {math.ceil(n / SHARD_SIZE)} "
              f"shards, 1 warm-up + {args.epochs} timed epochs each, os.cpu_count()={os.cpu_count()}")

        rates = {}
        for name, run in (("open_clip_train get_wds_dataset, raw shards", open_clip_run(raw_tars, n, args)),
                          ("clipline train_loader, preprocessed shards", clipline_run(manifest, args))):
            warmup, rate = timed_epochs(run, args.epochs)
            rates[name] = rate
            print(f"{name:46s} {rate / max(1, args.workers):8.1f} samples/s per worker "
                  f"({rate:.1f} samples/s total; warm-up epoch {warmup:.1f} s)")
        theirs, ours = rates.values()
        print(f"ratio clipline / open_clip_train: {ours / theirs:.2f}x")
        from_start, from_middle, middle = resume_cost(manifest, args)
        print(f"clipline resume: first batch after {from_start:.2f} s from step 0, after {from_middle:.2f} s from "
              f"step {middle} (replaying the epoch's first half: read and decode, no tokenise or normalise)")


if __name__ == "__main__":
    main()
