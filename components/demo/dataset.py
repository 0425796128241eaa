"""The demo ingest: build the demo from the offline sources (``split.py`` decides which images are held out), serve
the training images over loopback HTTP and ingest that URL list like any other, after publishing the held-out split.

Under the output prefix, next to what ``ingest`` writes:

    heldout/heldout.parquet   url, caption, source, label, group, path (local file at build time), image (name in tar)
    heldout/images.tar        the held-out image files, named by the ``image`` column (for evaluation elsewhere)

The RAW_SHARDS manifest gets a ``demo`` section with the split's parameters, the counts per source and
``"heldout": {"parquet": URI, "images": URI, "samples": n}``: that section, not the layout above, is where
evaluation finds the held-out split (``benchmarks.benchmarks_from_heldout``).
"""

from __future__ import annotations

import contextlib
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from components.common import store
from components.demo.sources import INSTALL_HINTS, SOURCES, DemoItem, SourceUnavailable
from components.demo.split import Split, split_sources
from components.ingest.http_server import FileServer, serve_directory
from components.ingest.ingest import ingest
from components.ingest.options import IngestOptions

HELDOUT = "heldout"
TRAIN_COLUMNS = ("url", "caption", "source", "label", "group")
EXTRA_COLUMNS = ("source", "label", "group")  # kept in every sample's .json for evaluation and analysis


@dataclass(frozen=True)
class DemoSet(Split):
    """The split with its images written under ``image_dir``, the training items interleaved across sources."""

    image_dir: Path


def build_demo(
    image_dir: Path, *, limit: int | None = None, seed: int = 0, heldout_fraction: float = 0.1,
    sources: Sequence[str] = tuple(SOURCES),
) -> DemoSet:
    """Choose the demo's items (``limit`` per source) and write their images under ``image_dir``."""
    split = split_sources(seed=seed, limit=limit, heldout_fraction=heldout_fraction, sources=sources)
    if not split.train:
        hints = "; ".join(INSTALL_HINTS[s] for s in sources)
        raise SourceUnavailable(f"no demo source is installed ({hints})")
    # Interleave the sources, so that every shard (and every training batch) mixes them.
    train = [split.train[i] for i in np.random.default_rng(seed).permutation(len(split.train))]
    for item in train + split.heldout:
        path = image_dir / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        item.write(path)
    return DemoSet(train=train, heldout=split.heldout, skipped=split.skipped, image_dir=image_dir)


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
