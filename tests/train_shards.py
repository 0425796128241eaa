"""Training shards (the TRAIN_SHARDS contract of components/common/datasets.py) written directly, for loader and
trainer tests that need exact control over every sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable

from PIL import Image

from components.common import datasets, store
from components.common.manifest import write_manifest

Draw = Callable[[int, int], Image.Image]  # (index, side) -> image


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_train_shards(
    prefix: str,
    tmp_path: Path,
    *,
    shards: int,
    per_shard: int,
    resolutions: tuple[int, ...],
    draw: Draw,
    caption: Callable[[int], str],
    words: Callable[[int], tuple[list[str], list[int]]],
    corrupt: dict[int, str] | None = None,
) -> str:
    """Shards + manifest under ``prefix``; returns the manifest URI. ``words(i)`` gives the json's words and POS
    ranks; ``corrupt`` maps an index to "image" (undecodable JPEG) or "json" (truncated JSON)."""
    corrupt = corrupt or {}
    entries = []
    for s in range(shards):
        path = tmp_path / f"shard-{s}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                key = datasets.sample_key(i)
                sample_words, pos_order = words(i)
                meta = json.dumps({"index": i, "words": sample_words, "pos_order": pos_order, "source_key": f"raw{i}"})
                members = {f"{key}.{datasets.image_field(r)}": jpeg(draw(i, r)) for r in resolutions}
                members[f"{key}.txt"] = caption(i).encode()
                members[f"{key}.json"] = meta.encode()
                if corrupt.get(i) == "image":
                    members.update({f"{key}.{datasets.image_field(r)}": b"\xff\xd8 not a jpeg" for r in resolutions})
                if corrupt.get(i) == "json":
                    members[f"{key}.json"] = b'{"index": '
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        uri = store.join(prefix, f"shard-{s:05d}.tar")
        store.put_file(uri, path)
        entries.append({"uri": uri, "samples": per_shard, "first_index": s * per_shard, "sha256": ""})
    manifest_uri = store.join(prefix, "manifest.json")
    write_manifest(manifest_uri, datasets.TRAIN_SHARDS, {
        "num_samples": shards * per_shard, "shards": entries, "resolutions": list(resolutions), "rejected": {},
        "sizes_uri": "",
    })
    return manifest_uri
