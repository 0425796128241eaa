"""The demo's sources: real captioned images that install offline (emoji, public-domain clip art, animal
silhouettes), each item named uniquely across sources, which is how the split and the benchmarks identify it.

Each source lists its items cheaply (metadata only); an item's image is written only when ``item.write(path)`` is
called, so a capped demo renders only what it uses. Sources and their packages:

    emoji         Debian fonts-noto-color-emoji + unicode-data: each fully-qualified emoji rendered with Pillow,
                  captioned with its CLDR name; label = subgroup (99), group = group (9)
    openclipart   Debian openclipart-png + openclipart-svg: title and keywords from the SVG's RDF metadata;
                  label = directory (category path), group = top-level category
    animal_mnist  PyPI animal-mnist==0.4 (--no-deps): 28x28 silhouettes of 10 animals, 9,716 unique of 10,000;
                  label = class, group = "animal"
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import logging
import pickle
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
OPENCLIPART = Path("/usr/share/openclipart")
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")

INSTALL_HINTS = {
    "emoji": "apt-get install fonts-noto-color-emoji unicode-data",
    "openclipart": "apt-get install openclipart-png openclipart-svg",
    "animal_mnist": "pip install --no-deps animal-mnist==0.4",
}


class SourceUnavailable(RuntimeError):
    """The package a source reads is not installed; the message says how to install it."""


@dataclass(frozen=True)
class DemoItem:
    source: str
    name: str  # relative path of the image file, unique across sources (also its URL path)
    caption: str
    label: str
    group: str
    write: Callable[[Path], None] = field(compare=False, repr=False)


def _pick(templates: tuple[str, ...], key: str, seed: int) -> str:
    """A template chosen by a stable hash of the item and the seed (the same choice in every process)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=4).digest()
    return templates[int.from_bytes(digest, "big") % len(templates)]


# ----------------------------------------------------------------------------------------------------------------
# Emoji

EMOJI_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")
_EMOJI_TEMPLATES = ("{name}", "an emoji of {name}", "{name} emoji", "{name} icon", "{name}, {subgroup} emoji")
EMOJI_SIZE = 109  # the Noto colour font's one bitmap strike: other sizes are rescaled bitmaps


def emoji_items(seed: int = 0, test_file: Path = EMOJI_TEST, font_path: Path = EMOJI_FONT) -> list[DemoItem]:
    for path, package in ((font_path, "fonts-noto-color-emoji"), (test_file, "unicode-data")):
        if not path.is_file():
            raise SourceUnavailable(f"emoji: {path} is missing (install {package}: {INSTALL_HINTS['emoji']})")
    items, group, subgroup = [], "", ""
    for line in test_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif m := EMOJI_LINE.match(line):
            codepoints = [int(c, 16) for c in m.group(1).split()]
            name = m.group(2).strip()
            # "flag: Japan" and "waving hand: medium skin tone" read better as captions without the colon.
            readable = re.sub(r"^flag: (.+)$", r"the flag of \1", name).replace(": ", ", ")
            template = _pick(_EMOJI_TEMPLATES, name, seed)
            caption = template.format(name=readable, subgroup=subgroup.replace("-", " "))
            text = "".join(map(chr, codepoints))
            items.append(DemoItem(
                source="emoji", name=emoji_image_name(codepoints), caption=caption, label=subgroup, group=group,
                write=functools.partial(_render_emoji, text, font_path),
            ))
    return items


def emoji_image_name(codepoints: Sequence[int]) -> str:
    """The emoji's image name: its code points in hex joined by "_" (the benchmarks look CLDR names up by it)."""
    return f"emoji/{'_'.join(f'{c:x}' for c in codepoints)}.png"


@functools.lru_cache(maxsize=2)
def _emoji_font(font_path: Path) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path), EMOJI_SIZE)


def _render_emoji(text: str, font_path: Path, out: Path) -> None:
    font = _emoji_font(font_path)
    left, top, right, bottom = font.getbbox(text)
    glyph = Image.new("RGBA", (right - left, bottom - top))
    ImageDraw.Draw(glyph).text((-left, -top), text, font=font, embedded_color=True)
    side = max(glyph.size)
    canvas = Image.new("RGB", (side, side), "white")  # emoji are drawn on white, as clip art is
    canvas.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)
    canvas.save(out)


# ----------------------------------------------------------------------------------------------------------------
# Openclipart

_NS = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#", "dc": "http://purl.org/dc/elements/1.1/",
       "cc": "http://web.resource.org/cc/"}
_CLIPART_TEMPLATES = ("{title}", "clip art of {title}", "a drawing of {title}", "{title}, {keywords}",
                      "an illustration of {title}: {keywords}")
# Titles that name a collection or an upload, not the picture (e.g. "Part of the Flat Icon Collection ...").
_PLACEHOLDER_TITLE = re.compile(r"\b(collection|theme|icon ?set|icons|submission|sibmission)\b", re.I)
_SHARED_TITLE_MAX = 3  # a title on more files than this is a series name ("gramastar" on 1,375 stars)
_CLIPART_MAX_PIXELS = 16_000_000  # a few PNGs are 10,000+ px wide posters; they add decode time, not content
_CLIPART_MIN_SIDE = 16
_JUNK_KEYWORD = re.compile(r"^(hash|unsorted|0x[0-9a-f]+|.*\.svg)$", re.I)


@dataclass(frozen=True)
class _ClipartMeta:
    rel: str  # path under png/ and svg/, without the extension
    title: str
    keywords: tuple[str, ...]
    creator: str


def openclipart_items(seed: int = 0, root: Path = OPENCLIPART) -> list[DemoItem]:
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise SourceUnavailable(f"openclipart: {root}/png or {root}/svg is missing "
                                f"(install {INSTALL_HINTS['openclipart']})")
    metas = _clipart_metadata(root)
    shared = Counter(m.title.lower() for m in metas)
    items, seen = [], set()
    for meta in metas:
        title = _clean_title(meta.title, meta.creator)
        png = root / "png" / f"{meta.rel}.png"
        if (not title or shared[meta.title.lower()] > _SHARED_TITLE_MAX or _PLACEHOLDER_TITLE.search(meta.title)
                or not _reasonable_size(png)):
            continue
        digest = hashlib.sha1(png.read_bytes()).digest()
        if digest in seen:  # the same picture filed twice
            continue
        seen.add(digest)
        keywords = [k for k in (_clean_keyword(k, meta.creator) for k in meta.keywords) if k and k != title.lower()]
        template = _pick(_CLIPART_TEMPLATES if keywords else _CLIPART_TEMPLATES[:3], meta.rel, seed)
        caption = template.format(title=title, keywords=", ".join(dict.fromkeys(keywords[:5])))
        category = meta.rel.rsplit("/", 1)[0] if "/" in meta.rel else "unsorted"
        items.append(DemoItem(
            source="openclipart", name=f"openclipart/{meta.rel}.png", caption=caption, label=category,
            group=category.split("/", 1)[0], write=functools.partial(_copy, png),
        ))
    return items


@functools.lru_cache(maxsize=2)
def _clipart_metadata(root: Path) -> tuple[_ClipartMeta, ...]:
    """Metadata of every PNG that is a file (symlinks are duplicates) and has an SVG with RDF metadata."""
    out = []
    for png in sorted((root / "png").rglob("*.png")):
        if png.is_symlink():
            continue
        rel = png.relative_to(root / "png").with_suffix("").as_posix()
        svg = root / "svg" / f"{rel}.svg"
        work = _rdf_work(svg)
        if work is None:
            continue
        out.append(_ClipartMeta(
            rel=rel,
            title=_text(work.find("dc:title", _NS)),
            keywords=tuple(t for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS) if (t := _text(li))),
            creator=_text(work.find("dc:creator/cc:Agent/dc:title", _NS)),
        ))
    return tuple(out)


def _rdf_work(svg: Path) -> ET.Element | None:
    """The SVG's <cc:Work> metadata element; parsing stops there, before the (large) drawing that follows it."""
    tag = f"{{{_NS['cc']}}}Work"
    try:
        for _, element in ET.iterparse(svg, events=("end",)):
            if element.tag == tag:
                return element
    except (OSError, ET.ParseError):
        pass
    return None


def _text(node: ET.Element | None) -> str:
    return " ".join((node.text or "").split()) if node is not None else ""


def _without_creator(text: str, creator: str) -> str:
    """Drop the author's name (often in titles and keywords), with or without its e-mail/URL part."""
    name = re.sub(r"\s*[(<\[].*$", "", creator).strip()
    if len(name) >= 3:
        text = re.sub(re.escape(name), " ", text, flags=re.I)
    return text


def _clean_title(title: str, creator: str) -> str:
    title = re.sub(r"^clip ?art by .+? - ", "", title, flags=re.I)
    title = _without_creator(title, creator)
    title = re.sub(r"(-aj)?(\.svg)?$", "", title.strip(), flags=re.I)
    title = re.sub(r"[_|]+", " ", title)
    return " ".join(title.split()).strip(" -,.")


def _clean_keyword(keyword: str, creator: str) -> str:
    if _JUNK_KEYWORD.match(keyword.strip()):
        return ""
    return " ".join(_without_creator(keyword, creator).replace("_", " ").split()).lower()


def _reasonable_size(png: Path) -> bool:
    """Width and height from the PNG header (no decode: some files are hundreds of megapixels)."""
    with png.open("rb") as f:
        header = f.read(24)
    if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    width, height = struct.unpack(">II", header[16:24])
    return min(width, height) >= _CLIPART_MIN_SIDE and width * height <= _CLIPART_MAX_PIXELS


def _copy(src: Path, out: Path) -> None:
    shutil.copyfile(src, out)


# ----------------------------------------------------------------------------------------------------------------
# Animal-MNIST

_ANIMAL_TEMPLATES = ("a silhouette of {a} {c}", "{a} {c}", "black and white silhouette of {a} {c}",
                     "a small picture of {a} {c}", "the shape of {a} {c}", "{c}")


def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 9,716 unique images (28x28 uint8) and their labels, in first-occurrence order."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise SourceUnavailable(f"animal_mnist: the animal-mnist package is missing "
                                f"(install it: {INSTALL_HINTS['animal_mnist']})")
    data_dir = Path(spec.origin).parent / "data" / "Animal_MNIST"
    images = np.asarray(_load_array_pickle(data_dir / "animal_data_version_3.gz"), dtype=np.uint8)
    labels = np.asarray(_load_array_pickle(data_dir / "animal_label_version_3.gz"), dtype=np.int64)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise SourceUnavailable(f"animal_mnist: unexpected arrays {images.shape} / {labels.shape} in {data_dir}")
    # Exact duplicates would leak between the training and held-out splits: keep each image once.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: any other global in the stream is refused, not imported."""

    # What ndarray.__reduce__ names: the array reconstructor (numpy.core.multiarray._reconstruct, which numpy 2
    # moved; taking it from __reduce__ avoids importing the deprecated path), the array type and dtype.
    _RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays may be unpickled") from None


def _load_array_pickle(path: Path) -> np.ndarray:
    # The package ships its arrays only as pickles. This is the one pickle clipline loads, and only from the
    # installed, version-pinned package (trusted by pin); the unpickler still accepts nothing but numpy arrays.
    with gzip.open(path, "rb") as f:
        return _ArrayOnlyUnpickler(f).load()


def animal_mnist_items(seed: int = 0) -> list[DemoItem]:
    images, labels = animal_mnist_arrays()
    items = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        cls = ANIMAL_CLASSES[label]
        template = _pick(_ANIMAL_TEMPLATES, f"animal{i}", seed)
        items.append(DemoItem(
            source="animal_mnist", name=f"animal_mnist/{cls}/{i:05d}.png",
            caption=template.format(a="an" if cls[0] in "aeiou" else "a", c=cls),
            label=cls, group="animal", write=functools.partial(_save_gray_as_rgb, image),
        ))
    return items


def _save_gray_as_rgb(pixels: np.ndarray, out: Path) -> None:
    # RGB like every other demo image, so downstream stages see one image mode.
    Image.fromarray(pixels).convert("RGB").save(out)


SOURCES: dict[str, Callable[[int], list[DemoItem]]] = {
    "emoji": emoji_items,
    "openclipart": openclipart_items,
    "animal_mnist": animal_mnist_items,
}
