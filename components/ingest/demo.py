"""The demo dataset: pick images from the offline sources, hold out a split fixed by the seed, serve the rest over
loopback HTTP and ingest that URL list like any other.

Under the output prefix, next to what ``ingest`` writes:

    heldout/heldout.parquet   url, caption, source, label, group, path (local file at build time), image (name in tar)
    heldout/images.tar        the held-out image files, named by the ``image`` column (for evaluation elsewhere)
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from components.common import store
from components.ingest.demo_source import INSTALL_HINTS, SOURCES, DemoItem, SourceUnavailable
from components.ingest.http_server import FileServer, serve_directory
from components.ingest.ingest import ingest
from components.ingest.options import IngestOptions

log = logging.getLogger(__name__)

HELDOUT = "heldout"
TRAIN_COLUMNS = ("url", "caption", "source", "label", "group")
EXTRA_COLUMNS = ("source", "label", "group")  # kept in every sample's .json for evaluation and analysis


@dataclass(frozen=True)
class DemoSet:
    image_dir: Path
    train: list[DemoItem]
    heldout: list[DemoItem]
    skipped: dict[str, str]  # source -> why it is missing


def stratified_pick(items: Sequence[DemoItem], k: int, rng: np.random.Generator) -> list[DemoItem]:
    """k items spread over labels in proportion to their sizes (each label gets the floor or ceiling of its share).

    Items are ordered label by label, shuffled within each label, and sampled at evenly spaced positions."""
    if k >= len(items):
        return list(items)
    by_label: dict[str, list[DemoItem]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    ordered: list[DemoItem] = []
    for label in sorted(by_label):
        group = by_label[label]
        ordered += [group[i] for i in rng.permutation(len(group))]
    return [ordered[int((i + 0.5) * len(ordered) / k)] for i in range(k)]


def split_source(
    items: Sequence[DemoItem], *, limit: int | None, heldout_fraction: float, rng: np.random.Generator
) -> tuple[list[DemoItem], list[DemoItem]]:
    """(train, heldout) for one source: cap it at ``limit``, then hold out a label-stratified fraction."""
    chosen = stratified_pick(items, limit, rng) if limit is not None else list(items)
    heldout = stratified_pick(chosen, round(len(chosen) * heldout_fraction), rng)
    held = {item.name for item in heldout}
    return [item for item in chosen if item.name not in held], heldout


def build_demo(
    image_dir: Path, *, limit: int | None = None, seed: int = 0, heldout_fraction: float = 0.1,
    sources: Sequence[str] = tuple(SOURCES),
) -> DemoSet:
    """Choose the demo's items (``limit`` per source) and write their images under ``image_dir``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 image per source, got {limit}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    train, heldout, skipped = [], [], {}
    for source in sources:
        try:
            items = SOURCES[source](seed)
        except SourceUnavailable as exc:
            log.warning("demo source skipped: %s", exc)
            skipped[source] = str(exc)
            continue
        # One generator per source, so a missing source does not change the other sources' splits.
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        src_train, src_heldout = split_source(items, limit=limit, heldout_fraction=heldout_fraction, rng=rng)
        train += src_train
        heldout += src_heldout
        log.info("demo source %s: %d images available, %d for training, %d held out",
                 source, len(items), len(src_train), len(src_heldout))
    if not train:
        hints = "; ".join(INSTALL_HINTS[s] for s in sources)
        raise SourceUnavailable(f"no demo source is installed ({hints})")
    # Interleave the sources, so that every shard (and every training batch) mixes them.
    train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    for item in train + heldout:
        path = image_dir / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        item.write(path)
    return DemoSet(image_dir=image_dir, train=train, heldout=heldout, skipped=skipped)


def url_tables(demo: DemoSet, server: FileServer) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training URL list and the held-out table (same columns plus the local path and the name in the tar)."""
    def rows(items: list[DemoItem]) -> dict[str, list[str]]:
        return {
            "url": [server.url(i.name) for i in items],
            "caption": [i.caption for i in items],
            "source": [i.source for i in items],
            "label": [i.label for i in items],
            "group": [i.group for i in items],
        }

    heldout = pd.DataFrame(rows(demo.heldout))
    heldout["path"] = [str(demo.image_dir / i.name) for i in demo.heldout]
    heldout["image"] = [i.name for i in demo.heldout]
    return pd.DataFrame(rows(demo.train), columns=list(TRAIN_COLUMNS)), heldout


def ingest_demo(
    output_prefix: str, options: IngestOptions, *, limit: int | None = None, seed: int = 0,
    heldout_fraction: float = 0.1, workdir: Path | None = None, part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Build the demo (``limit`` images per source), publish its held-out split, ingest the rest; returns the manifest.

    The images live in ``workdir`` (kept) or in a temporary directory (removed afterwards)."""
    with _workdir(workdir) as work:
        demo = build_demo(work / "images", limit=limit, seed=seed, heldout_fraction=heldout_fraction)
        with serve_directory(demo.image_dir) as server:
            train, heldout = url_tables(demo, server)
            train_list = work / "demo_urls.parquet"
            train.to_parquet(train_list, index=False)
            published = _publish_heldout(heldout, demo.image_dir, output_prefix, work)
            extra = tuple(dict.fromkeys((*options.extra_columns, *EXTRA_COLUMNS)))
            # The demo's server is on loopback, which ingest refuses unless allowed: allow exactly its address.
            allow = (*options.allow_networks, f"{server.host}/32")
            options = IngestOptions.model_validate({**options.model_dump(), "extra_columns": extra,
                                                    "allow_networks": allow})
            counts = {s: {"train": int((train["source"] == s).sum()), "heldout": int((heldout["source"] == s).sum())}
                      for s in SOURCES if s not in demo.skipped}
            return ingest(str(train_list), output_prefix, options, part=part, extra={"demo": {
                "seed": seed,
                "limit_per_source": limit,
                "heldout_fraction": heldout_fraction,
                "sources": counts,
                "skipped_sources": demo.skipped,
                "heldout": published,
            }})


def _publish_heldout(heldout: pd.DataFrame, image_dir: Path, output_prefix: str, work: Path) -> dict[str, Any]:
    store.ensure_bucket(output_prefix)
    parquet, tar = work / "heldout.parquet", work / "heldout_images.tar"
    heldout.to_parquet(parquet, index=False)
    with tarfile.open(tar, "w") as out:
        for name in heldout["image"]:
            out.add(image_dir / name, arcname=name)
    uris = {"parquet": store.join(output_prefix, HELDOUT, "heldout.parquet"),
            "images": store.join(output_prefix, HELDOUT, "images.tar")}
    store.put_file(uris["images"], tar)
    store.put_file(uris["parquet"], parquet)
    return {**uris, "samples": len(heldout)}


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clipline-demo-") as tmp:
        yield Path(tmp)
