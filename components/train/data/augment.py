"""One sample's image as the model sees it: a stage's train-time augmentation (``recipe.Augmentation``), or, with
``augment: none``, the stored pixels.

The augmentation is open_clip_train's (``open_clip.transform.image_transform(is_train=True)``): a random resized
crop (bicubic), then optional colour jitter and grayscale, plus an optional horizontal flip. The pixel operations are
torchvision's; the random draws are not, because torchvision's transforms draw from torch's global generator, which
the trainer shares when the loader runs without workers, and whose state a restarted worker would not have. Here
each sample draws from its own ``random.Random``, seeded by the caller from (seed, epoch, rank, step, position), so a
resumed run augments every batch exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math
import random

import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from components.common.recipe import Augmentation
from components.preprocess.filters import resize_center_crop

_BICUBIC = InterpolationMode.BICUBIC


def fit(image: Image.Image, size: int) -> Image.Image:
    """The stored pixels; resized and centre-cropped (preprocess's own rule, open_clip's evaluation geometry) only
    if a shard holds another size."""
    return image if image.size == (size, size) else resize_center_crop(image, size)


def augment(image: Image.Image, size: int, aug: Augmentation, rng: random.Random) -> Image.Image:
    top, left, height, width = crop_box(image.width, image.height, aug.scale, aug.ratio, rng)
    image = TF.resized_crop(image, top, left, height, width, [size, size], interpolation=_BICUBIC)
    if aug.color_jitter is not None and rng.random() < aug.color_jitter_prob:
        image = _jitter(image, aug.color_jitter, rng)
    if rng.random() < aug.grayscale_prob:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < aug.hflip_prob:
        image = TF.hflip(image)
    return image


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering a uniform fraction in ``scale`` of the area at a log-uniform
    aspect ratio in ``ratio`` (the Inception crop, as torchvision's RandomResizedCrop draws it: ten tries, then the
    largest centred crop whose ratio is in range)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter(image: Image.Image, strengths: tuple[float, float, float, float], rng: random.Random) -> Image.Image:
    """torchvision's ColorJitter: brightness, contrast and saturation factors uniform in [max(0, 1 - s), 1 + s] and
    a hue shift uniform in [-h, h], applied in a random order; a strength of 0 leaves that property alone."""
    brightness, contrast, saturation, hue = strengths
    adjust = [
        (brightness, lambda im, s: TF.adjust_brightness(im, rng.uniform(max(0.0, 1 - s), 1 + s))),
        (contrast, lambda im, s: TF.adjust_contrast(im, rng.uniform(max(0.0, 1 - s), 1 + s))),
        (saturation, lambda im, s: TF.adjust_saturation(im, rng.uniform(max(0.0, 1 - s), 1 + s))),
        (hue, lambda im, s: TF.adjust_hue(im, rng.uniform(-s, s))),
    ]
    rng.shuffle(adjust)
    for strength, apply in adjust:
        if strength > 0:
            image = apply(image, strength)
    return image
