"""The loader itself: ``TrainLoader``, one rank's DataLoader whose workers each cut one role's stream of samples
into batches (see the package docstring for how steps map to roles); ``Batch`` and the corrupt-sample counts; and
``train_loader`` / ``stage_loader``, which check a request against the manifest and build its ``LoaderPlan``.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Iterator, Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from components.common import datasets
from components.common.manifest import read_manifest
from components.common.recipe import Augmentation, Recipe
from components.train.data.samples import DataError, SampleEncoder, SampleStream
from components.train.data.sampling import LoaderPlan, Shard
from components.train.distributed import World
from components.train.plan import StagePlan
from components.train.seeds import derive_seed
from components.train.text_masks import TEXT_MASKS


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, 3, S, S) float32, normalised with the loader's mean and std
    texts: torch.Tensor  # (B, text_length) int64 token ids: SOT, tokens, EOT, zero padding
    indices: torch.Tensor  # (B,) int64 dense dataset indices (rows of the objectives' per-sample tables)
    epoch: int
    step: int  # step within the epoch
    read: int  # samples its worker parsed (good or corrupt) since the worker's previous batch
    corrupt: int  # of those, the ones skipped as corrupt

    def pin_memory(self) -> "Batch":
        # The DataLoader's pin-memory thread calls this for objects it does not know.
        return replace(
            self,
            images=self.images.pin_memory(),
            texts=self.texts.pin_memory(),
            indices=self.indices.pin_memory(),
        )


@dataclass
class LoaderStats:
    read: int = 0  # samples parsed, good or corrupt
    corrupt: int = 0  # samples skipped as corrupt

    def add(self, batch: Batch) -> None:
        self.read += batch.read
        self.corrupt += batch.corrupt


class _Position:
    """Which epoch and start step the workers should produce next, shared with (persistent) worker processes."""

    def __init__(self) -> None:
        self._values = multiprocessing.Array("q", 2)

    def set(self, epoch: int, start_step: int) -> None:
        self._values[0], self._values[1] = epoch, start_step

    def get(self) -> tuple[int, int]:
        return self._values[0], self._values[1]


class _BatchStream(IterableDataset):
    """Runs in each DataLoader worker (or in the main process when workers=0): one role's batches for one epoch."""

    def __init__(self, plan: LoaderPlan, position: _Position):
        self.plan = plan
        self.position = position

    @cached_property
    def _encoder(self) -> SampleEncoder:
        return SampleEncoder(self.plan)  # made in the worker, on its first batch

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = info.id if info else 0
        epoch, start = self.position.get()
        p = self.plan
        # The DataLoader asks worker 0 first, so the worker that delivers step `start` plays role `start mod W`.
        role = (worker + start) % p.roles
        steps = p.role_steps(role)
        if not steps:
            return
        stream = SampleStream(p, epoch, role)
        try:
            for step in steps:
                samples = stream.take(p.batch_size)
                if step < start:
                    continue  # replaying a batch consumed before the restart; its counts go with the next batch
                read, corrupt = stream.counts_since_last_call()
                yield Batch(
                    images=self._encoder.images(samples, seed=derive_seed(p.seed, epoch, p.rank, step, "augment")),
                    texts=self._encoder.texts(samples, seed=derive_seed(p.seed, epoch, p.rank, step, "text")),
                    indices=torch.tensor([s.index for s in samples], dtype=torch.long),
                    epoch=epoch,
                    step=step,
                    read=read,
                    corrupt=corrupt,
                )
        finally:
            stream.close()


class TrainLoader:
    """Iterate ``loader.epoch(e)`` (or ``loader.epoch(e, start_step=k)`` after a restart) for one epoch's batches.

    One epoch at a time: starting another epoch abandons the batches the previous one had not yielded yet.
    """

    def __init__(self, plan: LoaderPlan, *, workers: int, pin_memory: bool):
        self.plan = plan
        self._position = _Position()
        self._loader = DataLoader(
            _BatchStream(plan, self._position),
            batch_size=None,  # the workers batch, so a batch never mixes two workers' streams
            num_workers=workers,
            persistent_workers=workers > 0,  # keeps worker start-up and S3 clients out of every epoch
            pin_memory=pin_memory,
            # The DataLoader draws a base seed per epoch; from its own generator, not the trainer's global RNG.
            generator=torch.Generator().manual_seed(plan.seed),
        )
        self.stats = LoaderStats()  # the current (or last) epoch
        self.total = LoaderStats()  # since this loader was made

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside this epoch's 0..{self.steps_per_epoch} steps")
        self._position.set(epoch, start_step)  # read by each worker when this iteration starts
        self.stats = LoaderStats()
        expected = start_step
        for batch in self._loader:
            if (batch.epoch, batch.step) != (epoch, expected):
                raise RuntimeError(
                    f"loader delivered epoch {batch.epoch} step {batch.step}, expected epoch {epoch} step {expected}"
                )
            expected += 1
            self.stats.add(batch)
            self.total.add(batch)
            yield batch
        fraction = self.plan.max_corrupt_fraction
        if self.stats.corrupt > fraction * self.stats.read:
            raise DataError(
                f"epoch {epoch}: {self.stats.corrupt} of {self.stats.read} samples read from {self.plan.manifest_uri} "
                f"by rank {self.plan.rank} were corrupt, more than max_corrupt_fraction={fraction}"
            )


def train_loader(
    manifest_uri: str,
    *,
    batch_size: int,
    world: World,
    seed: int,
    image_size: int,
    text_length: int,
    text_mask: str = "truncate",
    augment: Augmentation | None = None,
    workers: int = 4,
    epoch_samples: int | None = None,
    resample: bool = False,
    shuffle_buffer: int = 2000,
    model_context_length: int = DEFAULT_CONTEXT_LENGTH,
    max_corrupt_fraction: float = 0.01,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    pin_memory: bool | None = None,
) -> TrainLoader:
    """A loader over the TRAIN_SHARDS manifest at ``manifest_uri`` (s3:// or file://) for one rank.

    batch_size: per rank. image_size: one of the manifest's resolutions. text_length: tokens per caption, SOT and
    EOT included, at most the model's context length. epoch_samples: virtual epoch length (default: the dataset).
    resample: draw shards with replacement (any epoch length) instead of splitting the epoch's shards over the ranks.
    augment: the stage's train-time augmentation (None: the stored pixels). pin_memory: default on when CUDA is
    available.
    """
    if text_mask not in TEXT_MASKS:
        raise ValueError(f"unknown text mask {text_mask!r}; expected one of {', '.join(TEXT_MASKS)}")
    if not 3 <= text_length <= model_context_length:
        raise ValueError(f"text_length {text_length} must be between 3 and the model's context length "
                         f"{model_context_length}")
    if batch_size < 1 or workers < 0 or shuffle_buffer < 0:
        raise ValueError(f"batch_size must be >= 1 and workers, shuffle_buffer >= 0 "
                         f"(got {batch_size}, {workers}, {shuffle_buffer})")
    if not 0.0 <= max_corrupt_fraction < 1.0:
        raise ValueError(f"max_corrupt_fraction must be in [0, 1), got {max_corrupt_fraction}")

    manifest = read_manifest(manifest_uri, datasets.TRAIN_SHARDS)
    resolutions = manifest.get("resolutions", [])
    if image_size not in resolutions:
        raise DataError(f"{manifest_uri} holds images at {resolutions} px, not {image_size} px: preprocess again "
                        f"with {image_size} among the recipe's resolutions")
    shards = tuple(Shard(s["uri"], int(s["samples"])) for s in manifest["shards"] if s["samples"] > 0)
    num_samples = int(manifest["num_samples"])
    if num_samples < 1 or sum(s.samples for s in shards) != num_samples:
        raise DataError(f"{manifest_uri}: num_samples is {num_samples} but its shards hold "
                        f"{sum(s.samples for s in shards)}")
    epoch_samples = num_samples if epoch_samples is None else epoch_samples
    if not resample and epoch_samples > num_samples:
        raise DataError(f"epoch_samples {epoch_samples} exceeds the {num_samples} samples in {manifest_uri}; "
                        "resample shards (resample=True) for epochs longer than the dataset")
    plan = LoaderPlan(
        manifest_uri=manifest_uri,
        shards=shards,
        num_samples=num_samples,
        batch_size=batch_size,
        rank=world.rank,
        world_size=world.size,
        roles=max(1, workers),
        seed=seed,
        epoch_samples=epoch_samples,
        resample=resample,
        shuffle_buffer=shuffle_buffer,
        image_size=image_size,
        text_length=text_length,
        text_mask=text_mask,
        augment=augment,
        max_corrupt_fraction=max_corrupt_fraction,
        mean=tuple(mean),
        std=tuple(std),
    )
    if plan.steps_per_epoch < 1:
        raise DataError(f"an epoch of {epoch_samples} samples is smaller than one global batch "
                        f"({batch_size} x {world.size} ranks)")
    return TrainLoader(plan, workers=workers, pin_memory=torch.cuda.is_available() if pin_memory is None
                       else pin_memory)


def stage_loader(
    manifest_uri: str,
    recipe: Recipe,
    stage: StagePlan,
    *,
    world: World,
    model_context_length: int,
    resample: bool = False,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> TrainLoader:
    """The loader for one CLIPA stage of a recipe, at the image size and text length its plan resolved, the recipe's
    global batch split evenly over the ranks."""
    if recipe.batch_size % world.size:
        raise ValueError(f"global batch {recipe.batch_size} does not split evenly over {world.size} ranks")
    return train_loader(
        manifest_uri,
        batch_size=recipe.batch_size // world.size,
        world=world,
        # Each stage gets its own random streams; stage 2 does not replay stage 1's sample order.
        seed=derive_seed(recipe.seed, stage.stage.name),
        image_size=stage.image_size,
        text_length=stage.text_length,
        text_mask=stage.stage.text.mask,
        augment=stage.stage.augment,
        workers=recipe.data.workers,
        epoch_samples=recipe.data.epoch_samples,
        resample=resample,
        shuffle_buffer=recipe.data.shuffle_buffer,
        model_context_length=model_context_length,
        mean=mean,
        std=std,
    )
