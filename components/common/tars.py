"""Webdataset tars: reading samples from a stream, and writing tars whose bytes depend only on their content. The one
tar reader and writer: preprocess, the training loader and evaluate's benchmarks all go through it.

Reading groups members into samples with webdataset's key rule (``webdataset.tariterators.base_plus_ext``: the key
is the name up to the first dot of its last path part), so a sample here is a sample to the training loader. It is
written out here rather than imported because importing webdataset imports torch, which would cost every worker
process a second and a few hundred MB. Members come back as bytes; nothing is decoded, nothing is unpickled.

Writing fixes every header field that would otherwise carry the time or the user (mtime, uid, owner names), so the
same samples give the same bytes and the same sha256 on every run.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def read_samples(stream: BinaryIO, uri: str) -> Iterator[dict]:
    """Samples of a webdataset tar in stored order: ``{"__key__": key, "<ext>": bytes, ...}`` (ext lower-cased)."""
    sample: dict | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            match = _KEY_EXT.match(info.name)
            if not info.isreg() or not match or _META.match(info.name):
                continue  # directories, links, names without an extension, webdataset's __meta__ members
            key, ext = match.group(1), match.group(2).lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if ext in sample:
                raise tarfile.ReadError(f"{uri}: sample {key!r} has two {ext!r} members")
            sample[ext] = tar.extractfile(info).read()
            tar.members = []  # a streaming read must not keep every header it has seen
    if sample is not None:
        yield sample


class TarWriter:
    """Writes members in the order given, with fixed headers (USTAR, mtime 0, root-owned, mode 0644)."""

    def __init__(self, path: Path):
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
