"""Per-sample checks and image transforms: why a raw sample is rejected, and how a kept image is stored.

A sample is judged in a fixed order (image present, caption, decodable image, size, duplicate), and only the first
reason that applies is counted, so the counts add up to the number of rejected samples.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image

# Reject reasons, as counted in the TRAIN_SHARDS manifest.
MISSING_IMAGE = "missing_image"
EMPTY_CAPTION = "empty_caption"
NON_UTF8_CAPTION = "non_utf8_caption"
UNDECODABLE_IMAGE = "undecodable_image"
TOO_SMALL = "too_small"
DUPLICATE = "duplicate"
REASONS = (MISSING_IMAGE, EMPTY_CAPTION, NON_UTF8_CAPTION, UNDECODABLE_IMAGE, TOO_SMALL, DUPLICATE)

# Fields an image may arrive in (img2dataset's encode_format: jpg by default, png or webp on request).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
_WHITE = (255, 255, 255)


class Rejected(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def image_bytes(sample: dict) -> bytes:
    for field in IMAGE_FIELDS:
        if sample.get(field):
            return sample[field]
    raise Rejected(MISSING_IMAGE)


def caption(data: bytes | None) -> str:
    """The stripped caption; img2dataset writes a missing caption as an empty file."""
    try:
        text = (data or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(NON_UTF8_CAPTION) from None
    text = text.strip()
    if not text:
        raise Rejected(EMPTY_CAPTION)
    return text


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decoded RGB pixels. Transparency is composited onto white: JPEG has no alpha, and dropping it would
    show whatever colour sits under transparent pixels (usually black), which ruins clipart and emoji."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated or corrupt file fails here, not in a training worker
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _WHITE + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise Rejected(UNDECODABLE_IMAGE) from None


def check_size(img: Image.Image, min_side: int) -> None:
    if min(img.size) < min_side:
        raise Rejected(TOO_SMALL)


def pixel_hash(img: Image.Image) -> str:
    """Identity of the decoded pixels: two files with the same picture but different metadata are duplicates."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """open_clip's eval transform geometry (torchvision ``Resize(size)`` bicubic on the shorter side, then
    ``CenterCrop(size)``), computed the same way so the stored image is what open_clip would have fed the model."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
