"""Train-time augmentation (components/train/data/augment.py and the recipe's ``augment`` block): defaults equal to
open_clip_train's, crops drawn as torchvision draws them, and every random choice from the caller's generator."""

from __future__ import annotations

import inspect
import math
import random
import statistics

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from open_clip.transform import AugmentationCfg
from PIL import Image

from components.common.config import ConfigError
from components.common.recipe import Augmentation, parse_recipe
from components.train.data.augment import augment, crop_box, fit

RECIPE = """
name: aug
model: {name: tiny-clip}
batch_size: 8
stages:
  - {name: pretrain, samples: 100, base_lr: 1.0e-3, augment: %s}
  - {name: finetune, samples: 100, base_lr: 1.0e-4}
"""


def noise(side: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (side, side, 3), dtype=np.uint8))


def test_defaults_are_open_clip_train_s():
    default = Augmentation()
    assert default.scale == AugmentationCfg().scale == (0.9, 1.0)
    # open_clip passes no ratio to RandomResizedCrop, so torchvision's default applies.
    assert default.ratio == inspect.signature(T.RandomResizedCrop).parameters["ratio"].default
    assert default.color_jitter is None and default.color_jitter_prob == 0 == default.grayscale_prob
    assert default.hflip_prob == 0
    recipe = parse_recipe(RECIPE % "none")
    assert recipe.stages[0].augment is None and recipe.stages[1].augment == Augmentation()


def test_clipa_s_strong_augmentation_parses_and_bad_values_name_their_key():
    strong = parse_recipe(RECIPE % "{scale: [0.4, 1.0], color_jitter: [0.32, 0.32, 0.32, 0.08], "
                                   "color_jitter_prob: 0.8, grayscale_prob: 0.2}").stages[0].augment
    assert strong.scale == (0.4, 1.0) and strong.color_jitter == (0.32, 0.32, 0.32, 0.08)
    for bad, says in [("{scale: [0.5, 1.5]}", "scale must satisfy"), ("{ratio: [2, 1]}", "ratio must satisfy"),
                      ("{color_jitter_prob: 0.5}", "needs color_jitter"), ("{grayscale_prob: 2}", "grayscale_prob"),
                      ("{flip: 0.5}", "flip"), ("strong", "augment")]:
        with pytest.raises(ConfigError, match=says) as err:
            parse_recipe(RECIPE % bad)
        assert "stages[0].augment" in str(err.value) and "function-after" not in str(err.value)


@pytest.mark.parametrize("width, height, scale", [(64, 64, (0.9, 1.0)), (64, 64, (0.4, 1.0)), (96, 48, (0.08, 1.0))])
def test_crops_are_drawn_as_torchvision_draws_them(width, height, scale):
    ratio = (3 / 4, 4 / 3)
    rng, n = random.Random(0), 4000
    ours = [crop_box(width, height, scale, ratio, rng) for _ in range(n)]
    torch.manual_seed(0)
    theirs = [T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio)) for _ in range(n)]
    for top, left, h, w in ours:
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0

    def stats(boxes):
        area = [h * w / (width * height) for _, _, h, w in boxes]
        aspect = [math.log(w / h) for _, _, h, w in boxes]
        centre = [(left + w / 2) / width for _, left, _, w in boxes]
        return statistics.fmean(area), statistics.fmean(aspect), statistics.fmean(centre), statistics.pstdev(area)

    # Same distribution: means within a few standard errors of torchvision's (n = 4000).
    for a, b, tol in zip(stats(ours), stats(theirs), (0.01, 0.02, 0.01, 0.01)):
        assert abs(a - b) < tol, (stats(ours), stats(theirs))


def test_the_full_crop_without_jitter_is_the_stored_image():
    image = noise(16)
    same = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(np.asarray(augment(image, 16, same, random.Random(1))), np.asarray(image))
    assert fit(image, 16) is image
    assert fit(noise(40).crop((0, 0, 40, 24)), 16).size == (16, 16)  # another size: resized and centre-cropped


def test_each_choice_comes_from_the_generator_given():
    image, aug = noise(32), Augmentation(scale=(0.4, 1.0), color_jitter=(0.32, 0.32, 0.32, 0.08),
                                         color_jitter_prob=0.8, grayscale_prob=0.2)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    first = [np.asarray(augment(image, 16, aug, random.Random(s))) for s in range(20)]
    assert all(np.array_equal(a, np.asarray(augment(image, 16, aug, random.Random(s)))) for s, a in enumerate(first))
    assert len({a.tobytes() for a in first}) == 20  # each seed its own crop and colours
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state


def test_jitter_grayscale_and_flip_apply_with_their_probabilities():
    image = noise(32)
    gray = np.asarray(augment(image, 16, Augmentation(grayscale_prob=1.0), random.Random(0))).astype(int)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # The flip is the last draw, so the same seed gives the same crop with and without it.
    plain = augment(image, 16, Augmentation(), random.Random(3))
    flipped = augment(image, 16, Augmentation(hflip_prob=1.0), random.Random(3))
    assert np.array_equal(np.asarray(TF.hflip(plain)), np.asarray(flipped))
    jitter = Augmentation(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.5)
    changed = [not np.array_equal(np.asarray(augment(image, 16, jitter, random.Random(s))),
                                  np.asarray(augment(image, 16, Augmentation(), random.Random(s))))
               for s in range(200)]
    assert 0.35 < sum(changed) / 200 < 0.65  # about half the samples jittered
