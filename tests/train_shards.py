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


# A learnable toy task for trainer tests: 8 colours x 2 shapes on grey, captioned "a <colour> <shape> ...".
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (150, 40, 180), "orange": (250, 140, 10), "black": (10, 10, 10), "white": (245, 245, 245)}
SHAPES = ("square", "circle")


def shape_class(index: int) -> tuple[str, str]:
    names = list(COLOURS)
    return names[index % len(names)], SHAPES[(index // len(names)) % len(SHAPES)]


def draw_shape(index: int, side: int) -> Image.Image:
    from PIL import ImageDraw

    colour, shape = shape_class(index)
    image = Image.new("RGB", (side, side), (128, 128, 128))
    margin = side // 6
    box = [margin, margin, side - margin, side - margin]
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def write_shapes_dataset(prefix: str, tmp_path: Path, *, shards: int, per_shard: int,
                         resolutions: tuple[int, ...]) -> str:
    def caption(i: int) -> str:
        colour, shape = shape_class(i)
        return f"a {colour} {shape} on a grey background"

    def words(i: int) -> tuple[list[str], list[int]]:
        colour, shape = shape_class(i)
        return ["a", colour, shape, "on", "a", "grey", "background"], [4, 2, 1, 4, 4, 2, 1]

    return write_train_shards(prefix, tmp_path, shards=shards, per_shard=per_shard, resolutions=resolutions,
                              draw=draw_shape, caption=caption, words=words)
