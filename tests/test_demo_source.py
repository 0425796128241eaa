"""The demo source: real offline images (emoji, openclipart, Animal-MNIST), a seeded held-out split, and the demo
ingested end to end over loopback HTTP into the real SeaweedFS store."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import pickle
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from components.common import store
from components.ingest import demo_source
from components.ingest.demo import build_demo, ingest_demo, split_source, stratified_pick
from components.ingest.demo_source import DemoItem
from components.ingest.options import IngestOptions

EMOJI_MISSING = not (demo_source.EMOJI_FONT.is_file() and demo_source.EMOJI_TEST.is_file())
CLIPART_MISSING = not (demo_source.OPENCLIPART / "png").is_dir() or not (demo_source.OPENCLIPART / "svg").is_dir()
ANIMAL_MISSING = importlib.util.find_spec("animal_mnist") is None

needs_emoji = pytest.mark.skipif(EMOJI_MISSING, reason=f"emoji source absent: {demo_source.INSTALL_HINTS['emoji']}")
needs_clipart = pytest.mark.skipif(
    CLIPART_MISSING, reason=f"openclipart source absent: {demo_source.INSTALL_HINTS['openclipart']}")
needs_animal = pytest.mark.skipif(
    ANIMAL_MISSING, reason=f"Animal-MNIST source absent: {demo_source.INSTALL_HINTS['animal_mnist']}")
AVAILABLE = [s for s, missing in (("emoji", EMOJI_MISSING), ("openclipart", CLIPART_MISSING),
                                  ("animal_mnist", ANIMAL_MISSING)) if not missing]


def _check_items(items: list[DemoItem], source: str, tmp_path: Path) -> None:
    assert items and all(i.source == source for i in items)
    assert all(i.caption.strip() and i.label and i.group for i in items)
    assert len({i.name for i in items}) == len(items)
    out = tmp_path / "one.png"
    items[len(items) // 2].write(out)
    with Image.open(out) as img:
        assert img.format == "PNG" and min(img.size) >= 16  # clip art keeps its own mode (often RGBA)


@needs_emoji
def test_emoji_items_carry_cldr_names_groups_and_subgroups(tmp_path):
    items = demo_source.emoji_items(seed=0)
    _check_items(items, "emoji", tmp_path)
    assert len(items) == 3655  # every fully-qualified emoji of emoji-test.txt
    assert len({i.group for i in items}) == 9 and len({i.label for i in items}) == 99
    tiger = next(i for i in items if i.name == "emoji/1f405.png")
    assert "tiger" in tiger.caption and (tiger.group, tiger.label) == ("Animals & Nature", "animal-mammal")
    japan = next(i for i in items if i.name == "emoji/1f1ef_1f1f5.png")
    assert "the flag of Japan" in japan.caption


@needs_clipart
def test_openclipart_items_skip_placeholders_and_keep_categories(tmp_path):
    items = demo_source.openclipart_items(seed=0)
    _check_items(items, "openclipart", tmp_path)
    assert 2000 < len(items) < 3000
    captions = " ".join(i.caption.lower() for i in items)
    for noise in ("gramastar", "flat icon collection", "clipart by", "architetto francesco rollandin"):
        assert noise not in captions
    bear = next(i for i in items if i.name.startswith("openclipart/animals/mammals/bears/sleeping_bear"))
    assert "sleeping bear" in bear.caption and (bear.label, bear.group) == ("animals/mammals/bears", "animals")


@needs_animal
def test_animal_mnist_is_deduplicated_to_9716(tmp_path):
    images, labels = demo_source.animal_mnist_arrays()
    assert images.shape == (9716, 28, 28) and len(np.unique(images.reshape(len(images), -1), axis=0)) == 9716
    assert sorted(Counter(labels.tolist())) == list(range(10))
    items = demo_source.animal_mnist_items(seed=0)
    _check_items(items, "animal_mnist", tmp_path)
    assert all(i.label in i.caption and i.label in demo_source.ANIMAL_CLASSES for i in items)


def _toy_items(counts: dict[str, int]) -> list[DemoItem]:
    return [DemoItem("toy", f"toy/{label}/{i}.png", f"a {label}", label, "toy", write=partial(print))
            for label, n in counts.items() for i in range(n)]


def test_stratified_pick_is_proportional_to_label_sizes():
    items = _toy_items({"a": 50, "b": 30, "c": 20})
    picked = stratified_pick(items, 10, np.random.default_rng(0))
    assert Counter(i.label for i in picked) == {"a": 5, "b": 3, "c": 2}
    assert len({i.name for i in picked}) == 10


def test_split_is_seeded_disjoint_and_capped():
    items = _toy_items({"a": 40, "b": 40, "c": 20})

    def split(seed: int, limit: int | None = None):
        return split_source(items, limit=limit, heldout_fraction=0.1, rng=np.random.default_rng(seed))

    train, held = split(1)
    assert len(held) == 10 and Counter(i.label for i in held) == {"a": 4, "b": 4, "c": 2}
    assert not {i.name for i in train} & {i.name for i in held} and len(train) + len(held) == 100
    assert split(1) == (train, held)
    assert split(2)[1] != held
    capped_train, capped_held = split(1, limit=30)
    assert len(capped_train) == 27 and len(capped_held) == 3


@pytest.mark.skipif(not AVAILABLE, reason="no demo source installed")
def test_build_demo_writes_every_chosen_image_and_is_deterministic(tmp_path):
    first = build_demo(tmp_path / "a", limit=20, seed=7)
    again = build_demo(tmp_path / "b", limit=20, seed=7)
    other = build_demo(tmp_path / "c", limit=20, seed=8)
    names = lambda items: [i.name for i in items]  # noqa: E731
    assert names(first.heldout) == names(again.heldout) and names(first.train) == names(again.train)
    assert names(first.heldout) != names(other.heldout)
    assert not set(names(first.train)) & set(names(first.heldout))
    per_source = Counter(i.source for i in first.heldout)
    assert per_source == {s: 2 for s in AVAILABLE}  # 10% of 20 per source
    assert Counter(i.source for i in first.train) == {s: 18 for s in AVAILABLE}
    assert all((first.image_dir / i.name).is_file() for i in first.train + first.heldout)


@pytest.mark.slow
@pytest.mark.skipif(not AVAILABLE, reason="no demo source installed")
def test_ingest_demo_end_to_end(s3_prefix, tmp_path):
    options = IngestOptions(image_size=32, number_sample_per_shard=20, processes=1, threads=8)
    doc = ingest_demo(s3_prefix, options, limit=10, seed=3, workdir=tmp_path / "demo")

    n_train = 9 * len(AVAILABLE)
    assert doc["counts"] == {"total": n_train, "success": n_train, "failed": {}}
    assert doc["demo"]["sources"] == {s: {"train": 9, "heldout": 1} for s in AVAILABLE}

    store.register_webdataset_scheme()
    samples = list(wds.WebDataset([s["uri"] for s in doc["shards"]], shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert Counter(m["source"] for m in metas) == {s: 9 for s in AVAILABLE}
    assert all(s["txt"].decode() == m["caption"] and m["label"] for s, m in zip(samples, metas, strict=True))
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (32, 32) for s in samples)

    heldout = pd.read_parquet(io.BytesIO(store.get_bytes(doc["demo"]["heldout"]["parquet"])))
    assert list(heldout.columns) == ["url", "caption", "source", "label", "group", "path", "image"]
    assert len(heldout) == len(AVAILABLE) and all(Path(p).is_file() for p in heldout["path"])
    trained = {unquote(urlparse(m["url"]).path.lstrip("/")) for m in metas}
    assert len(trained) == n_train and not trained & set(heldout["image"])
    with tarfile.open(fileobj=io.BytesIO(store.get_bytes(doc["demo"]["heldout"]["images"]))) as tar:
        assert sorted(tar.getnames()) == sorted(heldout["image"])


def test_array_unpickler_refuses_anything_but_numpy_arrays(tmp_path):
    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(os.system, f)  # a global that could run a command when loaded
    with pytest.raises(pickle.UnpicklingError, match="refusing posix.system"):
        demo_source._load_array_pickle(evil)
    fine = tmp_path / "fine.gz"
    with gzip.open(fine, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert demo_source._load_array_pickle(fine).tolist() == [[0, 1, 2], [3, 4, 5]]
