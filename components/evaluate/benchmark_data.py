"""Benchmark datasets in CLIP_benchmark's webdataset layout: read them streaming, write them atomically.

    <dataset>/classnames.txt                            one class name per line (classification)
    <dataset>/zeroshot_classification_templates.txt     one prompt per line, with {c} for the class name
    <dataset>/dataset_type.txt                          "retrieval" for retrieval datasets (absent: classification)
    <dataset>/<split>/nshards.txt                       number of shards
    <dataset>/<split>/0.tar, 1.tar, ...                 per sample: an image (.webp, .png or .jpg) and either
                                                        .cls (integer label) or .txt (captions, one per line)

The dataset is a local path, file:// or s3:// prefix. Shards are streamed from the object store and read and written
by the project's one tar module (components/common/tars.py, webdataset's key rule).
Samples are decoded here from their raw bytes by extension (image, integer, text) and nothing else: a shard is data,
never code, so no member is ever unpickled.

Only the format lives here: the offline demo's benchmarks (components/demo/benchmarks.py) use this writer, and
nothing in evaluate knows the demo.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from PIL import Image

from components.common import store
from components.common.tars import TarWriter, read_samples

Task = Literal["zeroshot_classification", "zeroshot_retrieval"]
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


class BenchmarkDataError(ValueError):
    """A benchmark dataset is missing a file or holds something it should not; the message names which."""


@dataclass(frozen=True)
class Benchmark:
    uri: str
    name: str
    task: Task
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    shards: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    key: str
    image: Image.Image
    label: int | None  # classification
    captions: tuple[str, ...]  # retrieval


@dataclass(frozen=True)
class NewSample:
    """A sample to write: encoded image bytes and either a label index or captions."""

    key: str
    image: bytes
    image_ext: str
    label: int | None = None
    captions: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _read_lines(uri: str, what: str) -> tuple[str, ...]:
    try:
        text = store.get_bytes(uri).decode("utf-8")
    except store.ObjectNotFound:
        raise BenchmarkDataError(f"{what}: {uri} is missing") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def open_benchmark(uri: str, split: str = "test") -> Benchmark:
    """Read and check a dataset's metadata (no shard is opened yet)."""
    uri = uri.rstrip("/")
    name = uri.rsplit("/", 1)[-1]
    is_retrieval = store.exists(store.join(uri, DATASET_TYPE)) and \
        _read_lines(store.join(uri, DATASET_TYPE), "dataset type") == ("retrieval",)
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    if not is_retrieval:
        classnames = _read_lines(store.join(uri, CLASSNAMES), f"classification dataset {name} needs {CLASSNAMES}")
        templates = _read_lines(store.join(uri, TEMPLATES), f"classification dataset {name} needs {TEMPLATES}")
        if not classnames:
            raise BenchmarkDataError(f"{store.join(uri, CLASSNAMES)} lists no class")
        bad = [t for t in templates if "{c}" not in t]
        if not templates or bad:
            raise BenchmarkDataError(f"{store.join(uri, TEMPLATES)}: every template needs {{c}} (bad: {bad[:3]})")
    split_uri = store.join(uri, split)
    declared = _read_lines(store.join(split_uri, NSHARDS), f"dataset {name} split {split!r} needs {NSHARDS}")
    try:
        nshards = int(declared[0]) if len(declared) == 1 else -1
    except ValueError:
        nshards = -1
    if nshards < 1:
        raise BenchmarkDataError(f"{store.join(split_uri, NSHARDS)} must hold one positive integer, got {declared}")
    shards = tuple(store.join(split_uri, f"{i}.tar") for i in range(nshards))
    present = {o.uri.rsplit("/", 1)[-1] for o in store.list_objects(split_uri + "/") if o.uri.endswith(".tar")}
    missing = [s for s in shards if s.rsplit("/", 1)[-1] not in present]
    if missing or len(present) != nshards:
        raise BenchmarkDataError(f"{store.join(split_uri, NSHARDS)} says {nshards} shards, but {split_uri} holds "
                                 f"{len(present)} .tar files ({sorted(present)[:5]}); missing: {missing[:5]}")
    task: Task = "zeroshot_retrieval" if is_retrieval else "zeroshot_classification"
    return Benchmark(uri=uri, name=name, task=task, classnames=classnames, templates=templates, shards=shards)


def iter_samples(bench: Benchmark) -> Iterator[Sample]:
    """Stream the samples shard by shard, in order, checking each one."""
    for shard in bench.shards:
        count = 0
        try:
            with store.open_read(shard) as stream:
                for raw in read_samples(stream, shard):
                    yield _decode(bench, shard, raw)
                    count += 1
        except tarfile.TarError as exc:
            raise BenchmarkDataError(f"shard {shard} of dataset {bench.name} is not a readable tar: {exc}") from None
        if count == 0:
            raise BenchmarkDataError(f"shard {shard} of dataset {bench.name} is empty")


def _decode(bench: Benchmark, shard: str, raw: dict) -> Sample:
    key = raw["__key__"]
    where = f"sample {key!r} in {shard}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None:
        raise BenchmarkDataError(f"{where} has no image (.{', .'.join(IMAGE_EXTENSIONS)}); it has {sorted(raw)}")
    try:
        image = Image.open(io.BytesIO(raw[ext]))
        image = image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample
        raise BenchmarkDataError(f"{where}: cannot decode its .{ext} image: {exc}") from None
    if bench.task == "zeroshot_classification":
        if "cls" not in raw:
            raise BenchmarkDataError(f"{where} has no .cls label")
        try:
            label = int(raw["cls"].decode().strip())
        except ValueError:
            raise BenchmarkDataError(f"{where}: .cls is not an integer: {raw['cls'][:20]!r}") from None
        if not 0 <= label < len(bench.classnames):
            raise BenchmarkDataError(f"{where}: label {label} out of range for {len(bench.classnames)} classes")
        return Sample(key=key, image=image, label=label, captions=())
    if "txt" not in raw:
        raise BenchmarkDataError(f"{where} has no .txt captions")
    captions = tuple(c.strip() for c in raw["txt"].decode("utf-8").splitlines() if c.strip())
    if not captions:
        raise BenchmarkDataError(f"{where}: .txt holds no caption")
    return Sample(key=key, image=image, label=None, captions=captions)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def write_benchmark(
    uri: str, samples: Iterable[NewSample], *, task: Task, classnames: Iterable[str] = (),
    templates: Iterable[str] = (), split: str = "test", shard_size: int = 1000,
) -> dict:
    """Write a dataset; returns {"uri", "task", "samples", "shards"}.

    Shards go first and nshards.txt last, so a reader that finds nshards.txt finds every shard it names."""
    uri = uri.rstrip("/")
    classnames, templates = tuple(classnames), tuple(templates)
    if task == "zeroshot_classification" and (not classnames or not templates):
        raise BenchmarkDataError(f"classification dataset {uri} needs class names and templates")
    store.ensure_bucket(uri)
    count, shard_index = 0, 0
    with tempfile.TemporaryDirectory(prefix="clipline-bench-") as tmp:
        batch: list[NewSample] = []

        def flush() -> None:
            nonlocal shard_index
            path = Path(tmp) / f"{shard_index}.tar"
            _write_tar(path, batch)
            store.put_file(store.join(uri, split, f"{shard_index}.tar"), path)
            path.unlink()
            shard_index += 1
            batch.clear()

        for sample in samples:
            _check_new(sample, task, len(classnames))
            batch.append(sample)
            count += 1
            if len(batch) == shard_size:
                flush()
        if batch:
            flush()
    if count == 0:
        raise BenchmarkDataError(f"no samples to write to {uri}")
    if task == "zeroshot_classification":
        store.put_bytes(store.join(uri, CLASSNAMES), ("\n".join(classnames) + "\n").encode())
        store.put_bytes(store.join(uri, TEMPLATES), ("\n".join(templates) + "\n").encode())
    else:
        store.put_bytes(store.join(uri, DATASET_TYPE), b"retrieval\n")
    store.put_bytes(store.join(uri, split, NSHARDS), f"{shard_index}\n".encode())
    return {"uri": uri, "task": task, "samples": count, "shards": shard_index}


def _check_new(sample: NewSample, task: Task, num_classes: int) -> None:
    if "." in sample.key or "/" in sample.key:
        raise BenchmarkDataError(f"sample key {sample.key!r} may hold no '.' or '/' (webdataset splits on them)")
    if task == "zeroshot_classification" and not (sample.label is not None and 0 <= sample.label < num_classes):
        raise BenchmarkDataError(f"sample {sample.key!r}: label {sample.label} out of range for {num_classes} classes")
    if task == "zeroshot_retrieval" and not sample.captions:
        raise BenchmarkDataError(f"sample {sample.key!r} has no caption")


def _write_tar(path: Path, samples: list[NewSample]) -> None:
    with TarWriter(path) as tar:
        for s in samples:
            tar.add(f"{s.key}.{s.image_ext}", s.image)
            if s.label is not None:
                tar.add(f"{s.key}.cls", str(s.label).encode())
            if s.captions:
                tar.add(f"{s.key}.txt", "\n".join(c.replace("\n", " ") for c in s.captions).encode())
