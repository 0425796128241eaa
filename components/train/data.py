"""The training data loader: streams preprocessed training shards (``components.common.datasets``) from the object
store and yields fixed-size batches of normalised images, token ids and dense dataset indices.

What the trainer and the objectives can rely on:

- Full batches only: every rank gets exactly ``batch_size`` samples per step and ``steps_per_epoch`` steps per
  virtual epoch (``epoch_samples // (batch_size * world.size)``), because FastCLIP's and AmorLIP's per-sample
  estimators need the same B on every rank.
- Determinism: every random choice (shard order, shard resampling, shuffle buffer, text mask) draws from a seed
  derived from (seed, epoch, rank, worker role, step), never from process ids, clocks or the trainer's RNG.
- Resumption: ``loader.epoch(e, start_step=k)`` yields exactly the batches an uninterrupted ``loader.epoch(e)``
  yields from step k on (same manifest, seed, batch size, world size, worker count and shuffle buffer).
- Disjoint ranks: without resampling, each (rank, worker) reads its own slice of the epoch's shuffled sequence of
  samples, so no two ranks see the same sample within a virtual epoch.
- Corrupt samples (undecodable JPEG, bad JSON, missing field) are skipped, logged and counted (``loader.stats``);
  more than ``max_corrupt_fraction`` of them fails loudly.

How steps map to worker processes: the DataLoader collects batches from its W workers round-robin, so the batch of
step s comes from the worker playing *role* s mod W. Each role owns one deterministic stream of samples per epoch (its
slice of the shards, or its resampled shards, through its own shuffle buffer) and cuts consecutive batches from it.

Resume cost: to start at step k a role replays its own stream up to its first batch at or after k. The shard bytes
are streamed and the JPEGs decoded again (a corrupt sample shifts every later batch, and only decoding tells a
truncated JPEG from a good one), but nothing is tokenised, normalised or sent to the main process. So resuming costs
at most one virtual epoch of reading and decoding, split over the workers, and nothing at an epoch boundary.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import logging
import multiprocessing
import random
import tarfile
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Callable, Iterator, Sequence

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer
from open_clip.transform import image_transform
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from components.common import datasets, store
from components.common.manifest import read_manifest
from components.common.recipe import Recipe, Stage
from components.train.distributed import World
from components.train.seeds import derive_seed
from components.train.text_masks import TEXT_MASKS, text_tokenizer, tokenize

log = logging.getLogger(__name__)

# A worker judges the corrupt fraction only after this many samples, so one bad sample early on is not fatal;
# the main process judges the whole epoch's fraction at its end, however small the epoch.
_MIN_SAMPLES_FOR_RATE = 200


class DataError(RuntimeError):
    """The data cannot be loaded as asked: a manifest that does not fit the request, a broken shard, or too many
    corrupt samples."""


class _CorruptSample(ValueError):
    """One sample is unusable; the message says which field and why."""


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


@dataclass(frozen=True)
class Shard:
    uri: str
    samples: int


@dataclass(frozen=True)
class _Piece:
    """A run of consecutive samples inside one shard."""

    uri: str
    skip: int  # samples passed over at the start of the shard
    take: int


@dataclass(frozen=True)
class _Sample:
    index: int
    image: Image.Image  # decoded, RGB
    text: str
    words: list[str]
    pos_order: list[int]


@dataclass(frozen=True)
class LoaderPlan:
    """Everything a worker needs to produce its batches; identical on every rank except ``rank``."""

    manifest_uri: str
    shards: tuple[Shard, ...]
    num_samples: int
    batch_size: int  # per rank
    rank: int
    world_size: int
    roles: int  # max(1, workers): the number of sample streams per rank
    seed: int
    epoch_samples: int
    resample: bool
    shuffle_buffer: int
    image_size: int
    text_length: int
    text_mask: str
    max_corrupt_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_samples // (self.batch_size * self.world_size)

    def role_steps(self, role: int) -> range:
        return range(role, self.steps_per_epoch, self.roles)


def _split_samples(shards: Sequence[Shard], lengths: Sequence[int]) -> list[list[_Piece]]:
    """Cut the concatenation of ``shards`` (in the order given) into consecutive runs of ``lengths`` samples."""
    starts = list(itertools.accumulate((s.samples for s in shards), initial=0))
    if sum(lengths) > starts[-1]:
        raise ValueError(f"cannot cut {sum(lengths)} samples out of {starts[-1]}")
    runs, pos = [], 0
    for length in lengths:
        pieces, end = [], pos + length
        i = bisect.bisect_right(starts, pos) - 1
        while pos < end:
            skip = pos - starts[i]
            take = min(shards[i].samples - skip, end - pos)
            pieces.append(_Piece(shards[i].uri, skip, take))
            pos += take
            i += 1
        runs.append(pieces)
    return runs


# ----------------------------------------------------------------------------------------------------------------
# Worker side: one role's sample stream and its batches


def _read_piece(piece: _Piece, fields: frozenset[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of a run inside one shard, streamed (webdataset's tar reader over the store's stream)."""
    end = piece.skip + piece.take
    seen = 0
    try:
        with gopen(piece.uri) as stream:
            files = tar_file_expander([{"url": piece.uri, "stream": stream}])
            for sample in group_by_keys(files):
                if seen >= piece.skip:
                    # Drop the other resolutions now: the shuffle buffer holds thousands of samples.
                    yield {k: v for k, v in sample.items() if k in fields or k in ("__key__", "__url__")}
                seen += 1
                if seen == end:
                    return
    except (tarfile.TarError, ValueError) as exc:
        raise DataError(f"shard {piece.uri} is not a readable tar (after {seen} samples): {exc}") from None
    raise DataError(f"shard {piece.uri} holds {seen} samples, but the manifest says at least {end}")


class _SampleStream:
    """One role's good samples for one epoch, in order; counts the corrupt samples it skips on the way."""

    def __init__(self, plan: LoaderPlan, epoch: int, role: int):
        self.plan, self.epoch, self.role = plan, epoch, role
        self.image_field = datasets.image_field(plan.image_size)
        self.fields = frozenset({self.image_field, datasets.CAPTION_FIELD, datasets.META_FIELD})
        self.read = self.corrupt = 0
        self._reported = (0, 0)
        self._raw = self._resampled() if plan.resample else self._slice()

    def take(self, n: int) -> list[_Sample]:
        good: list[_Sample] = []
        while len(good) < n:
            raw = next(self._raw)
            self.read += 1
            try:
                good.append(self._parse(raw))
            except _CorruptSample as exc:
                self.corrupt += 1
                log.warning("skipping corrupt sample %s in %s: %s", raw["__key__"], raw["__url__"], exc)
                self._check_rate()
        return good

    def counts_since_last_call(self) -> tuple[int, int]:
        read, corrupt = self.read - self._reported[0], self.corrupt - self._reported[1]
        self._reported = (self.read, self.corrupt)
        return read, corrupt

    def close(self) -> None:
        self._raw.close()  # closes the shard stream being read (an S3 connection)

    # -- where the raw samples come from -------------------------------------------------------------------------

    def _shuffled(self, raw: Iterator[dict[str, Any]], *salt: int | str) -> Iterator[dict[str, Any]]:
        p = self.plan
        rng = random.Random(derive_seed(p.seed, self.epoch, p.rank, self.role, "shuffle", *salt))
        return wds_shuffle(p.shuffle_buffer, initial=p.shuffle_buffer, rng=rng)(raw)

    def _resampled(self) -> Iterator[dict[str, Any]]:
        """Whole shards drawn with replacement (weighted by size, so every sample is equally likely)."""
        p = self.plan
        rng = random.Random(derive_seed(p.seed, self.epoch, p.rank, self.role, "resample"))
        weights = [s.samples for s in p.shards]

        def shards() -> Iterator[dict[str, Any]]:
            while True:
                shard = rng.choices(p.shards, weights)[0]
                yield from _read_piece(_Piece(shard.uri, 0, shard.samples), self.fields)

        return self._shuffled(shards())

    def _slice(self) -> Iterator[dict[str, Any]]:
        """This (rank, role)'s slice of the epoch's shuffled sample sequence.

        Every rank shuffles the shard order with the same (seed, epoch) seed and cuts the sequence into one slice per
        (rank, role), each holding the role's quota of samples plus an equal share of the spare ones; reading stops
        at the quota. Corrupt samples can make a slice fall short of its quota; the role then reads its own slice
        again (fresh shuffle) rather than take samples from another rank, so ranks stay disjoint.
        """
        p = self.plan
        order = list(p.shards)
        random.Random(derive_seed(p.seed, self.epoch, "shard-order")).shuffle(order)
        quotas = [len(p.role_steps(role)) * p.batch_size for role in range(p.roles)]
        spare = (p.num_samples - p.steps_per_epoch * p.batch_size * p.world_size) // (p.world_size * p.roles)
        pieces = _split_samples(order, [q + spare for _ in range(p.world_size) for q in quotas])
        mine = pieces[p.rank * p.roles + self.role]
        for pass_no in itertools.count():
            if pass_no:
                log.warning(
                    "epoch %d rank %d worker role %d: corrupt samples left its slice short; reading it again",
                    self.epoch, p.rank, self.role,
                )
            raw = itertools.chain.from_iterable(_read_piece(piece, self.fields) for piece in mine)
            yield from self._shuffled(raw, pass_no)

    # -- what makes a sample good ---------------------------------------------------------------------------------

    def _parse(self, raw: dict[str, Any]) -> _Sample:
        p = self.plan
        for name in sorted(self.fields):
            if name not in raw:
                raise _CorruptSample(f"no {name} field")
        try:
            image = Image.open(io.BytesIO(raw[self.image_field]))
            image = image.convert("RGB")  # decodes the whole image, so a truncated JPEG fails here
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on bad bytes; any of them means corrupt
            raise _CorruptSample(f"undecodable {self.image_field}: {type(exc).__name__}: {exc}") from None
        try:
            text = raw[datasets.CAPTION_FIELD].decode("utf-8").strip()
            meta = json.loads(raw[datasets.META_FIELD])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _CorruptSample(f"bad caption or json: {exc}") from None
        if not text:
            raise _CorruptSample("empty caption")
        index = meta.get("index") if isinstance(meta, dict) else None
        if not isinstance(index, int) or not 0 <= index < p.num_samples:
            raise _CorruptSample(f"json index {index!r} is not a dataset index in [0, {p.num_samples})")
        if datasets.sample_key(index) != raw["__key__"]:
            raise _CorruptSample(f"json index {index} does not match the sample key")
        words, pos_order = meta.get("words"), meta.get("pos_order")
        if p.text_mask == "syntax" and not (
            isinstance(words, list)
            and isinstance(pos_order, list)
            and len(words) == len(pos_order)
            and all(isinstance(w, str) for w in words)
            and all(isinstance(o, int) for o in pos_order)
        ):
            raise _CorruptSample("json words/pos_order missing or mismatched (the syntax mask needs them)")
        return _Sample(index, image, text, words or [], pos_order or [])

    def _check_rate(self) -> None:
        fraction = self.plan.max_corrupt_fraction
        if self.read >= _MIN_SAMPLES_FOR_RATE and self.corrupt > fraction * self.read:
            raise DataError(
                f"{self.corrupt} of {self.read} samples read from {self.plan.manifest_uri} by rank {self.plan.rank} "
                f"(worker role {self.role}, epoch {self.epoch}) are corrupt, more than max_corrupt_fraction={fraction}"
            )


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
    def _tokenizer(self) -> SimpleTokenizer:
        return text_tokenizer(self.plan.text_mask, self.plan.text_length)

    @cached_property
    def _transform(self) -> Callable[[Image.Image], torch.Tensor]:
        # Images are already S x S, so open_clip's eval transform only converts and normalises (its resize and
        # centre crop are no-ops); it still does the right thing should a shard hold another size.
        return image_transform(self.plan.image_size, is_train=False, mean=self.plan.mean, std=self.plan.std)

    def __iter__(self) -> Iterator[Batch]:
        store.register_webdataset_scheme()
        info = get_worker_info()
        worker = info.id if info else 0
        epoch, start = self.position.get()
        p = self.plan
        # The DataLoader asks worker 0 first, so the worker that delivers step `start` plays role `start mod W`.
        role = (worker + start) % p.roles
        steps = p.role_steps(role)
        if not steps:
            return
        stream = _SampleStream(p, epoch, role)
        try:
            for step in steps:
                samples = stream.take(p.batch_size)
                if step < start:
                    continue  # replaying a batch consumed before the restart; its counts go with the next batch
                read, corrupt = stream.counts_since_last_call()
                yield Batch(
                    images=torch.stack([self._transform(s.image) for s in samples]),
                    texts=tokenize(
                        self._tokenizer,
                        p.text_mask,
                        [s.text for s in samples],
                        [s.words for s in samples],
                        [s.pos_order for s in samples],
                        seed=derive_seed(p.seed, epoch, p.rank, step, "text"),
                    ),
                    indices=torch.tensor([s.index for s in samples], dtype=torch.long),
                    epoch=epoch,
                    step=step,
                    read=read,
                    corrupt=corrupt,
                )
        finally:
            stream.close()


# ----------------------------------------------------------------------------------------------------------------
# Main-process side


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
    pin_memory: default on when CUDA is available.
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
    stage: Stage,
    *,
    world: World,
    model_image_size: int,
    model_context_length: int,
    resample: bool = False,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> TrainLoader:
    """The loader for one CLIPA stage of a recipe: the stage's image size and text mask (the model's own sizes where
    the stage leaves them unset), the recipe's global batch split evenly over the ranks."""
    if recipe.batch_size % world.size:
        raise ValueError(f"global batch {recipe.batch_size} does not split evenly over {world.size} ranks")
    return train_loader(
        manifest_uri,
        batch_size=recipe.batch_size // world.size,
        world=world,
        # Each stage gets its own random streams; stage 2 does not replay stage 1's sample order.
        seed=derive_seed(recipe.seed, stage.name),
        image_size=stage.image.size or model_image_size,
        text_length=stage.text.length or model_context_length,
        text_mask=stage.text.mask,
        workers=recipe.data.workers,
        epoch_samples=recipe.data.epoch_samples,
        resample=resample,
        shuffle_buffer=recipe.data.shuffle_buffer,
        model_context_length=model_context_length,
        mean=mean,
        std=std,
    )
