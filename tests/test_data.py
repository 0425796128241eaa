"""The training data loader on small training shards written here in the contract format (components.common.datasets),
read from file:// and from the real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from PIL import Image
from train_shards import write_train_shards

from components.common import datasets, store
from components.common.manifest import read_manifest
from components.common.recipe import Augmentation, parse_recipe
from components.common.tars import read_samples
from components.train.data import Batch, DataError, stage_loader, train_loader
from components.train.distributed import World
from components.train.plan import ModelSizes, train_plan
from components.train.text_masks import syntax_masked_text

SHARDS, PER_SHARD, RESOLUTIONS = 3, 20, (16, 32)
N = SHARDS * PER_SHARD
# The json words differ from the caption on purpose: the syntax mask must build its text from the words.
WORDS = ["the", "striped", "zebra", "runs", "across", "the", "plain"]
POS_ORDER = [4, 2, 1, 3, 4, 4, 1]
PLAIN = SimpleTokenizer()


def colour(index: int) -> tuple[int, int, int]:
    return (index * 37) % 256, (index * 91) % 256, (index * 53) % 256


def caption(index: int) -> str:
    return f"caption {index}: a small red fox jumps over the lazy brown dog beside a tall green tree at dawn"


def write_dataset(prefix: str, tmp_path: Path, corrupt: dict[int, str] | None = None) -> str:
    """Training shards + TRAIN_SHARDS manifest under ``prefix``; ``corrupt`` maps an index to "image" or "json"."""
    return write_train_shards(
        prefix, tmp_path, shards=SHARDS, per_shard=PER_SHARD, resolutions=RESOLUTIONS,
        draw=lambda i, side: Image.new("RGB", (side, side), colour(i)), caption=caption,
        words=lambda i: (WORDS, POS_ORDER), corrupt=corrupt,
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("train-shards")
    return write_dataset((tmp / "store").as_uri(), tmp)


def loader_for(manifest_uri: str, **overrides):
    options = dict(batch_size=4, world=World(), seed=7, image_size=16, text_length=8, text_mask="truncate",
                   workers=0, shuffle_buffer=16)
    return train_loader(manifest_uri, **{**options, **overrides})


def same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        (x.epoch, x.step) == (y.epoch, y.step)
        and torch.equal(x.indices, y.indices)
        and torch.equal(x.texts, y.texts)
        and torch.equal(x.images, y.images)
        for x, y in zip(a, b)
    )


def order(batches: list[Batch]) -> list[int]:
    return torch.cat([b.indices for b in batches]).tolist()


def test_batches_are_full_normalised_and_match_their_indices(manifest):
    loader = loader_for(manifest, image_size=32, batch_size=8)
    batches = list(loader.epoch(0))
    assert loader.steps_per_epoch == N // 8 == len(batches)
    assert [b.step for b in batches] == list(range(len(batches)))
    for b in batches:
        assert b.images.shape == (8, 3, 32, 32) and b.images.dtype == torch.float32
        assert b.texts.shape == (8, 8) and b.texts.dtype == torch.long
        assert b.indices.dtype == torch.long
        mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        pixels = (b.images * std + mean).mean(dim=(2, 3)) * 255
        expected = torch.tensor([colour(i) for i in b.indices.tolist()], dtype=torch.float32)
        assert torch.allclose(pixels, expected, atol=3), "image does not belong to its index"
    seen = order(batches)
    assert len(set(seen)) == len(seen) == loader.steps_per_epoch * 8
    assert loader.stats.read == len(seen) and loader.stats.corrupt == 0


def test_a_resolution_the_manifest_lacks_is_refused(manifest):
    with pytest.raises(DataError, match=r"\[16, 32\] px, not 64 px"):
        loader_for(manifest, image_size=64)


def test_same_seed_same_batches_and_each_epoch_its_own_order(manifest):
    first = list(loader_for(manifest).epoch(3))
    assert same(first, list(loader_for(manifest).epoch(3)))
    assert order(first) != order(list(loader_for(manifest).epoch(4)))
    assert order(first) != order(list(loader_for(manifest, seed=8).epoch(3)))


@pytest.mark.parametrize("resample", [False, True])
def test_a_restarted_loader_continues_with_the_same_batches(manifest, resample):
    options = dict(resample=resample, epoch_samples=48 if resample else None, text_mask="random")
    full = list(loader_for(manifest, **options).epoch(2))
    for k in (1, 5, len(full)):
        assert same(list(loader_for(manifest, **options).epoch(2, start_step=k)), full[k:])


def test_two_workers_resume_and_keep_order_across_epochs(manifest):
    fresh = list(loader_for(manifest, workers=2).epoch(0))
    loader = loader_for(manifest, workers=2)
    assert same(list(loader.epoch(1, start_step=3)), list(loader_for(manifest, workers=2).epoch(1))[3:])
    # The persistent workers pick up the next epoch (and a restart's start step) from shared memory.
    assert same(list(loader.epoch(0)), fresh)
    assert loader.stats.read == N - N % 4


def test_ranks_read_disjoint_samples_that_cover_the_epoch(manifest):
    # 2 ranks x 2 workers = 4 readers over 3 shards: readers own runs of samples, not whole shards.
    for epoch_samples, workers in ((None, 2), (40, 0)):
        ranks = [list(loader_for(manifest, batch_size=5, world=World(rank=r, size=2), epoch_samples=epoch_samples,
                                 workers=workers).epoch(1)) for r in (0, 1)]
        seen = [set(order(batches)) for batches in ranks]
        assert not seen[0] & seen[1]
        assert len(ranks[0]) == len(ranks[1]) == (epoch_samples or N) // 10
        if epoch_samples is None:
            assert seen[0] | seen[1] == set(range(N))


@pytest.mark.parametrize("mask", ["truncate", "random", "block", "syntax"])
def test_text_masks_keep_sot_eot_and_the_requested_length(manifest, mask):
    length = 6
    rng_before = torch.random.get_rng_state()
    batches = list(loader_for(manifest, text_mask=mask, text_length=length).epoch(0))
    assert torch.equal(torch.random.get_rng_state(), rng_before), "masking consumed the trainer's RNG"
    for b in batches:
        assert b.texts.shape == (4, length)
        for row, index in zip(b.texts.tolist(), b.indices.tolist()):
            assert row[0] == PLAIN.sot_token_id and row.count(PLAIN.eot_token_id) == 1
            body = row[1:row.index(PLAIN.eot_token_id)]
            full = PLAIN.encode(caption(index))
            assert len(body) == length - 2  # every caption here is longer than the mask
            if mask == "truncate":
                assert body == full[: length - 2]
            elif mask == "block":
                assert any(full[i:i + len(body)] == body for i in range(len(full)))
            elif mask == "random":
                it = iter(full)
                assert all(token in it for token in body), "random mask must keep the caption's order"
            else:
                assert row == PLAIN(syntax_masked_text(WORDS, POS_ORDER, length), context_length=length)[0].tolist()
                assert PLAIN.decode(body).split() == ["striped", "zebra", "runs", "plain"]  # nouns, adjective, verb
    if mask in ("random", "block"):
        assert len({tuple(r) for b in batches for r in b.texts.tolist()}) > 1, "the mask should vary per sample"


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    manifest_uri = write_dataset((tmp_path / "store").as_uri(), tmp_path, corrupt={5: "image", 47: "json"})
    loader = loader_for(manifest_uri, batch_size=8, max_corrupt_fraction=0.1, shuffle_buffer=0)
    seen = order(list(loader.epoch(0)))
    assert 5 not in seen and 47 not in seen
    assert len(seen) == len(set(seen)) == N - N % 8  # the 4 spare samples make up for the 2 corrupt ones
    assert (loader.stats.corrupt, loader.stats.read) == (2, len(seen) + 2)

    # An epoch that needs every sample still gets full batches: the role re-reads its own slice for the shortfall.
    loader = loader_for(manifest_uri, batch_size=4, max_corrupt_fraction=0.1, shuffle_buffer=0)
    seen = order(list(loader.epoch(0)))
    assert len(seen) == N and len(set(seen)) == N - 2 and loader.stats.corrupt == 2

    strict = loader_for(manifest_uri, batch_size=8, max_corrupt_fraction=0.01, shuffle_buffer=0)
    with pytest.raises(DataError, match="2 of 58 samples .* corrupt"):
        list(strict.epoch(0))


def test_streams_from_s3_with_the_same_batches_as_from_files(s3_prefix, tmp_path, manifest):
    s3_manifest = write_dataset(s3_prefix, tmp_path)
    from_s3 = list(loader_for(s3_manifest, workers=2, text_mask="block").epoch(0))
    assert same(from_s3, list(loader_for(manifest, workers=2, text_mask="block").epoch(0)))
    assert len(from_s3) == N // 4


def test_a_recipe_stage_maps_onto_the_loader(manifest):
    recipe = parse_recipe("""
name: tiny
model: {name: tiny-clip}
batch_size: 8
stages:
  - {name: pretrain, samples: 100, base_lr: 1.0e-3, image: {size: 16}, text: {length: 8, mask: syntax},
     augment: {scale: [0.4, 1.0]}}
  - {name: finetune, samples: 100, base_lr: 1.0e-4, augment: none}
data: {workers: 0, shuffle_buffer: 8}
""")
    world = World(rank=1, size=2)
    sizes = ModelSizes(image_size=32, patch_size=8, context_length=16, embed_dim=8, config={})
    plan = train_plan(recipe, sizes, steps_per_epoch=N // 8)
    pretrain, finetune = (stage_loader(manifest, recipe, stage, world=world, model_context_length=16)
                          for stage in plan.stages)
    first = next(pretrain.epoch(0))
    assert first.images.shape == (4, 3, 16, 16) and first.texts.shape == (4, 8)
    assert torch.equal(first.texts[0], PLAIN(syntax_masked_text(WORDS, POS_ORDER, 8), context_length=8)[0])
    assert next(finetune.epoch(0)).images.shape == (4, 3, 32, 32) and finetune.steps_per_epoch == N // 8
    # each stage its own augmentation
    assert pretrain.plan.augment == Augmentation(scale=(0.4, 1.0)) and finetune.plan.augment is None


# ------------------------------------------------------------------------------------------------ augmentation

STRONG = Augmentation(scale=(0.4, 1.0), color_jitter=(0.32, 0.32, 0.32, 0.08), color_jitter_prob=0.8,
                      grayscale_prob=0.2, hflip_prob=0.5)


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> str:
    """Noise images (a crop of noise differs from the whole), so augmentation shows in the pixels."""
    tmp = tmp_path_factory.mktemp("textured-shards")
    return write_train_shards(
        (tmp / "store").as_uri(), tmp, shards=SHARDS, per_shard=PER_SHARD, resolutions=RESOLUTIONS,
        draw=lambda i, side: Image.fromarray(np.random.RandomState(i).randint(0, 256, (side, side, 3), np.uint8)),
        caption=caption, words=lambda i: (WORDS, POS_ORDER),
    )


def by_index(batches: list[Batch]) -> dict[int, torch.Tensor]:
    return {i: b.images[k] for b in batches for k, i in enumerate(b.indices.tolist())}


def test_without_augmentation_images_are_open_clip_s_evaluation_transform(textured):
    images = {}
    for shard in read_manifest(textured, datasets.TRAIN_SHARDS)["shards"]:
        with store.open_read(shard["uri"]) as stream:
            for sample in read_samples(stream, shard["uri"]):
                images[int(sample["__key__"])] = Image.open(io.BytesIO(sample[datasets.image_field(16)])).convert("RGB")
    transform = image_transform(16, is_train=False)
    for index, pixels in by_index(list(loader_for(textured).epoch(0))).items():
        assert torch.allclose(pixels, transform(images[index]), atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_batches_repeat_exactly_on_resume_and_differ_by_epoch(textured, workers):
    options = dict(augment=STRONG, workers=workers)
    torch_state = torch.get_rng_state()
    full = list(loader_for(textured, **options).epoch(1))
    assert torch.equal(torch.get_rng_state(), torch_state)  # the trainer's generator is never drawn from
    assert same(full, list(loader_for(textured, **options).epoch(1)))
    for k in (1, 6):
        assert same(list(loader_for(textured, **options).epoch(1, start_step=k)), full[k:])
    plain = by_index(list(loader_for(textured).epoch(1)))
    other = by_index(list(loader_for(textured, **options).epoch(2)))
    augmented = by_index(full)
    assert all(not torch.equal(augmented[i], plain[i]) for i in augmented)
    assert all(not torch.equal(augmented[i], other[i]) for i in augmented if i in other)  # a fresh draw each epoch
