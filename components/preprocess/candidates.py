"""Phase 1, one input shard per call (run in a worker process): raw samples in, candidate samples out.

Streams a raw img2dataset shard from the store, rejects what cannot be trained on, and stores every survivor
resized at each resolution with its caption's words and POS orders, under work/in/ (see layout.py). Duplicates
within the shard are dropped here (no point resizing them); duplicates across shards are settled later, in input
order, from the pixel hashes in the summary.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from components.common import datasets, store
from components.common.tars import TarWriter, read_samples
from components.preprocess import filters
from components.preprocess.errors import PreprocessError
from components.preprocess.layout import Layout
from components.preprocess.options import PreprocessOptions
from components.preprocess.syntax_mask import caption_pos

CANDIDATE_KEY_DIGITS = 9


@dataclass(frozen=True)
class FilterTask:
    position: int  # the input shard's place in the raw manifest
    uri: str
    layout: Layout
    options: PreprocessOptions


def filter_shard(task: FilterTask) -> dict:
    """Write the shard's candidates and summary to the store; return the summary."""
    started = time.perf_counter()
    rejected: Counter[str] = Counter()
    hashes: list[str] = []
    seen: set[str] = set()
    samples = 0
    accepted: list[tuple[str, str, dict[str, bytes]]] = []  # (raw key, pixel hash, members)
    with store.open_read(task.uri) as stream:
        try:
            for sample in read_samples(stream, task.uri):
                samples += 1
                try:
                    image_hash, members = _candidate(sample, task.options)
                except filters.Rejected as rejection:
                    rejected[rejection.reason] += 1
                    continue
                accepted.append((sample["__key__"], image_hash, members))
        except tarfile.TarError as exc:
            # A broken shard is not a rejected sample: counting on would silently drop the rest of the shard.
            raise PreprocessError(f"raw shard {task.uri} is not a readable tar after {samples} samples: "
                                  f"{exc}") from None
    # img2dataset stores a shard's samples in download-completion order, but its keys follow the URL list: in key
    # order the candidates (and so the dense indices, and which copy of a duplicate is kept) are the same on every
    # run and for any fan-out of ingest. The candidates are small (resized), so a shard's worth fits in memory.
    accepted.sort(key=lambda item: item[0])
    with tempfile.TemporaryDirectory(prefix="clipline-preprocess-") as tmp:
        path = Path(tmp) / "candidates.tar"
        with TarWriter(path) as out:
            for _, image_hash, members in accepted:
                if image_hash in seen:
                    rejected[filters.DUPLICATE] += 1
                    continue
                key = f"{len(hashes):0{CANDIDATE_KEY_DIGITS}d}"
                for field, data in members.items():
                    out.add(f"{key}.{field}", data)
                hashes.append(image_hash)
                seen.add(image_hash)
        store.put_file(task.layout.candidates_uri(task.position), path)
    summary = {
        "uri": task.uri,
        "samples": samples,
        "hashes": hashes,
        "rejected": dict(sorted(rejected.items())),
        "seconds": round(time.perf_counter() - started, 3),
        "pid": os.getpid(),
    }
    # Written after the candidates: its presence tells a rerun that this input shard is done.
    store.put_json(task.layout.summary_uri(task.position), summary)
    return summary


def _candidate(sample: dict, options: PreprocessOptions) -> tuple[str, dict[str, bytes]]:
    """(pixel hash, members) of a sample worth training on; raises filters.Rejected with the first reason that
    applies, in the order documented in filters.py."""
    data = filters.image_bytes(sample)
    text = filters.caption(sample.get(datasets.CAPTION_FIELD))
    words, orders = caption_pos(text)
    if not words:
        raise filters.Rejected(filters.EMPTY_CAPTION)  # e.g. only zero-width characters: nothing to tokenize
    img = filters.decode_rgb(data)
    filters.check_size(img, options.min_image_side)
    image_hash = filters.pixel_hash(img)
    members = {
        datasets.image_field(size): filters.encode_jpeg(filters.resize_center_crop(img, size), options.jpeg_quality)
        for size in options.resolutions
    }
    members[datasets.CAPTION_FIELD] = text.encode("utf-8")
    meta = {"words": words, "pos_order": orders, "source_key": sample["__key__"]}
    members[datasets.META_FIELD] = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return image_hash, members
