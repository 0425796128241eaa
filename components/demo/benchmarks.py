"""The offline benchmarks: the demo's held-out split written as CLIP_benchmark datasets with evaluate's writer.

Two ways in, one split: ``benchmarks_from_heldout`` reads the split a demo ingest published, found through the
``demo.heldout`` section of its RAW_SHARDS manifest; ``benchmarks_from_sources`` recomputes it with ``split.py``
when no ingest ran. Either way the images are ones a model trained on that demo never saw.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from components.common import store
from components.common.datasets import RAW_SHARDS
from components.common.manifest import ManifestError, read_manifest
from components.demo.sources import ANIMAL_CLASSES, EMOJI_LINE, EMOJI_TEST, SOURCES, emoji_image_name
from components.demo.split import split_sources
from components.evaluate.benchmark_data import IMAGE_EXTENSIONS, BenchmarkDataError, NewSample, write_benchmark

# Prompts per source, written as the dataset's zeroshot_classification_templates.txt.
DEMO_TEMPLATES = {
    "animal_mnist": ("a photo of a {c}.", "a silhouette of a {c}.", "a drawing of a {c}.",
                     "a black and white picture of a {c}.", "the shape of a {c}."),
    "emoji_groups": ("an emoji of {c}.", "{c} emoji.", "an icon of {c}.", "a picture of {c}."),
    "openclipart": ("a drawing of {c}.", "clip art of {c}.", "an illustration of {c}.", "a picture of {c}."),
}
HELDOUT_COLUMNS = ("source", "label", "group", "caption", "image")


def benchmarks_from_heldout(ingest_manifest: str | Mapping[str, Any], output_prefix: str) -> dict[str, dict]:
    """Write the benchmarks from the held-out split that ``clipline ingest --demo`` published, as its RAW_SHARDS
    manifest (the manifest's URI, or the manifest itself) records it under ``demo.heldout``."""
    manifest, where = _read_ingest_manifest(ingest_manifest)
    heldout = (manifest.get("demo") or {}).get("heldout")
    if not heldout:
        raise BenchmarkDataError(f"this ingest was not a demo ingest: {where} has no demo.heldout section, so there "
                                 "is no held-out split to evaluate on; run `clipline ingest --demo` and give its "
                                 "manifest")
    with tempfile.TemporaryDirectory(prefix="clipline-heldout-") as tmp:
        parquet, images = Path(tmp) / "heldout.parquet", Path(tmp) / "images.tar"
        for uri, path in ((heldout["parquet"], parquet), (heldout["images"], images)):
            try:
                store.get_file(uri, path)
            except store.ObjectNotFound:
                raise BenchmarkDataError(f"{where} names the held-out split's {uri}, which is missing "
                                         "(rerun `clipline ingest --demo`)") from None
        table = pd.read_parquet(parquet)
        missing = [c for c in HELDOUT_COLUMNS if c not in table.columns]
        if missing:
            raise BenchmarkDataError(f"{heldout['parquet']} lacks columns {missing}")
        if len(table) != heldout["samples"]:
            raise BenchmarkDataError(f"{heldout['parquet']} holds {len(table)} rows; {where} says "
                                     f"{heldout['samples']}")
        with tarfile.open(images) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    absent = sorted(set(table["image"]) - set(files))
    if absent:
        raise BenchmarkDataError(f"{heldout['images']} lacks {len(absent)} images, e.g. {absent[:3]}")
    rows = table[list(HELDOUT_COLUMNS)].to_dict("records")
    return write_demo_benchmarks(rows, files, output_prefix)


def _read_ingest_manifest(manifest: str | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The manifest and how to name it in errors."""
    if not isinstance(manifest, str):
        return manifest, "the ingest manifest"
    try:
        return read_manifest(manifest, RAW_SHARDS), manifest
    except store.ObjectNotFound:
        raise BenchmarkDataError(f"no ingest manifest at {manifest} (run `clipline ingest --demo` first and give "
                                 "the manifest it prints)") from None
    except ManifestError as exc:
        raise BenchmarkDataError(str(exc)) from None


def benchmarks_from_sources(
    output_prefix: str, *, seed: int = 0, limit: int | None = None, heldout_fraction: float = 0.1,
    sources: Iterable[str] | None = None,
) -> dict[str, dict]:
    """Write the benchmarks straight from the installed demo sources, for when no ingest ran: the held-out split
    of ``split_sources``, which ``ingest_demo`` holds out too with the same seed, limit and fraction."""
    split = split_sources(seed=seed, limit=limit, heldout_fraction=heldout_fraction, sources=sources or SOURCES)
    if not split.heldout:
        why = ("no demo source is installed" if not split.train else
               f"the split holds out no image (limit {limit} per source, fraction {heldout_fraction})")
        raise BenchmarkDataError(f"{why}, so there is nothing to build benchmarks from")
    rows, files = [], {}
    with tempfile.TemporaryDirectory(prefix="clipline-heldout-") as tmp:
        for item in split.heldout:
            path = Path(tmp) / item.name
            path.parent.mkdir(parents=True, exist_ok=True)
            item.write(path)
            files[item.name] = path.read_bytes()
            rows.append({"source": item.source, "label": item.label, "group": item.group,
                         "caption": item.caption, "image": item.name})
    return write_demo_benchmarks(rows, files, output_prefix)


def write_demo_benchmarks(rows: list[dict], files: dict[str, bytes], output_prefix: str) -> dict[str, dict]:
    """One dataset per task the held-out rows support; returns name -> what write_benchmark returned.

    animal_mnist   classification, the 10 animals
    emoji_groups   classification by emoji group (Smileys & Emotion, Flags, ...)
    emoji_names    retrieval: each emoji with its CLDR name and its demo caption as captions
    openclipart    classification by top-level category (the uncategorised "unsorted" ones left out)"""
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    out: dict[str, dict] = {}

    def classification(name: str, chosen: list[dict], classnames: tuple[str, ...], class_of) -> None:
        if not chosen:
            return
        index = {c: i for i, c in enumerate(classnames)}
        samples = (NewSample(key=f"{i:06d}", image=files[r["image"]], image_ext=_ext(r["image"]),
                             label=index[class_of(r)]) for i, r in enumerate(chosen))
        out[name] = write_benchmark(store.join(output_prefix, name), samples, task="zeroshot_classification",
                                    classnames=classnames, templates=DEMO_TEMPLATES[name])

    classification("animal_mnist", by_source.get("animal_mnist", []), ANIMAL_CLASSES, lambda r: r["label"])
    emoji = by_source.get("emoji", [])
    groups = tuple(sorted({r["group"].lower() for r in emoji}))
    classification("emoji_groups", emoji, groups, lambda r: r["group"].lower())
    clipart = [r for r in by_source.get("openclipart", []) if r["group"] != "unsorted"]
    categories = tuple(sorted({_readable(r["group"]) for r in clipart}))
    classification("openclipart", clipart, categories, lambda r: _readable(r["group"]))
    if emoji:
        names = _emoji_names()
        samples = (NewSample(key=f"{i:06d}", image=files[r["image"]], image_ext=_ext(r["image"]),
                             captions=tuple(dict.fromkeys(c for c in (names.get(r["image"]), r["caption"]) if c)))
                   for i, r in enumerate(emoji))
        out["emoji_names"] = write_benchmark(store.join(output_prefix, "emoji_names"), samples,
                                             task="zeroshot_retrieval")
    return out


def _ext(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    if ext not in IMAGE_EXTENSIONS:
        raise BenchmarkDataError(f"{name}: not a .{', .'.join(IMAGE_EXTENSIONS)} image")
    return ext


def _readable(category: str) -> str:
    return category.replace("_", " ")


def _emoji_names() -> dict[str, str]:
    """Image name (as the emoji source names its files) -> the emoji's CLDR name, from Unicode's emoji-test.txt."""
    if not EMOJI_TEST.is_file():
        return {}
    names = {}
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if m := EMOJI_LINE.match(line):
            names[emoji_image_name([int(c, 16) for c in m.group(1).split()])] = m.group(2).strip()
    return names
