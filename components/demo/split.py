"""The demo's split: which items of each source the demo trains on and which it holds out for evaluation.

``split_sources`` is the one place that decides, generator seeding included. The demo ingest (``dataset.py``) and
the benchmarks built straight from the sources (``benchmarks.py``) both call it, so for the same seed, limit and
fraction a benchmark image is always a held-out one, never one the demo trained on.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from components.demo.sources import SOURCES, DemoItem, SourceUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
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


def split_sources(
    *, seed: int, limit: int | None, heldout_fraction: float, sources: Iterable[str] = tuple(SOURCES),
) -> Split:
    """The split of every installed source of ``sources`` (``limit`` items each, then ``heldout_fraction`` of them
    held out), source after source; a source that is not installed is skipped and named in ``skipped``."""
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
    return Split(train=train, heldout=heldout, skipped=skipped)
