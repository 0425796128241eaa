"""Measure preprocess throughput (images/s per process) on synthetic img2dataset-style shards.

    python benchmarks/preprocess.py --shards 4 --per-shard 500 --processes 2

Images are 256x256 JPEGs (img2dataset's default output size) of smooth random content, captions 8-20 words; the
store is a temporary file:// directory unless --prefix names one (an s3:// prefix uses the AWS_* environment).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from components.common import datasets, store
from components.common.manifest import write_manifest
from components.preprocess.options import PreprocessOptions
from components.preprocess.preprocess import preprocess

WORDS = ("a photo of the red blue green small large old young dog cat car house tree person sitting running "
         "standing on in near under with beside street park beach mountain river city table window").split()


def _image(rng: np.random.Generator, side: int = 256) -> bytes:
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(side, side, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_raw_shards(prefix: str, shards: int, per_shard: int, seed: int = 0) -> str:
    """img2dataset-layout shards and their RAW_SHARDS manifest under ``prefix``; returns the manifest URI."""
    rng = np.random.default_rng(seed)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(shards):
            path = Path(tmp) / f"{s:05d}.tar"
            with tarfile.open(path, "w") as tar:
                for i in range(per_shard):
                    key = f"{s * 10 ** len(str(per_shard)) + i:09d}"
                    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 21))))
                    for field, data in (("jpg", _image(rng)), ("txt", caption.encode()),
                                        ("json", json.dumps({"key": key, "status": "success"}).encode())):
                        info = tarfile.TarInfo(f"{key}.{field}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            uri = store.join(prefix, "raw", path.name)
            store.put_file(uri, path)
            entries.append({"uri": uri, "samples": per_shard})
    manifest = store.join(prefix, "raw", "manifest.json")
    total = shards * per_shard
    write_manifest(manifest, datasets.RAW_SHARDS, {"shards": entries, "counts": {"total": total, "success": total,
                   "failed": {}}, "duration_s": 0.0, "images_per_s": 0.0, "options": {"synthetic": True}})
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/preprocess.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--resolutions", default="64,224", help="comma-separated sides (default: %(default)s)")
    parser.add_argument("--prefix", help="store prefix for the synthetic data and output (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = PreprocessOptions(resolutions=tuple(int(s) for s in args.resolutions.split(",")),
                                processes=args.processes)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.prefix or Path(tmp).as_uri()
        raw = write_raw_shards(prefix, args.shards, args.per_shard)
        doc = preprocess(raw, store.join(prefix, "train"), options)
    print(json.dumps({k: doc[k] for k in ("num_samples", "filter_processes", "images_per_s",
                                          "images_per_s_per_process", "duration_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
