"""Which samples each rank and worker role reads, in which order: the loader's plan, the shards' split into
disjoint runs of samples per (rank, role), the resampled alternative, and the seeded shuffles.

Nothing here reads a shard or decodes a sample: a role's stream is built from a ``read`` function that turns a run
of samples inside one shard (a ``Piece``) into its raw samples, so the order depends only on the plan, the epoch and
the role (every random choice draws from ``derive_seed``), never on what the samples hold.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from webdataset.filters import shuffle as wds_shuffle

from components.common.recipe import Augmentation
from components.train.seeds import derive_seed

log = logging.getLogger(__name__)

RawSample = dict[str, Any]  # a shard's sample: "__key__", "__url__" (the shard) and one bytes value per field


@dataclass(frozen=True)
class Shard:
    uri: str
    samples: int


@dataclass(frozen=True)
class Piece:
    """A run of consecutive samples inside one shard."""

    uri: str
    skip: int  # samples passed over at the start of the shard
    take: int


ReadPiece = Callable[[Piece], Iterator[RawSample]]


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
    augment: Augmentation | None  # None: the stored pixels (recipe ``augment: none``)
    max_corrupt_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_samples // (self.batch_size * self.world_size)

    def role_steps(self, role: int) -> range:
        return range(role, self.steps_per_epoch, self.roles)


def split_samples(shards: Sequence[Shard], lengths: Sequence[int]) -> list[list[Piece]]:
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
            pieces.append(Piece(shards[i].uri, skip, take))
            pos += take
            i += 1
        runs.append(pieces)
    return runs


def role_samples(plan: LoaderPlan, epoch: int, role: int, read: ReadPiece) -> Iterator[RawSample]:
    """One role's raw samples for one epoch, in order (endless: the caller takes what it needs, then closes it)."""
    return _resampled(plan, epoch, role, read) if plan.resample else _slice(plan, epoch, role, read)


def _shuffled(plan: LoaderPlan, epoch: int, role: int, raw: Iterator[RawSample], *salt: int | str
              ) -> Iterator[RawSample]:
    rng = random.Random(derive_seed(plan.seed, epoch, plan.rank, role, "shuffle", *salt))
    return wds_shuffle(plan.shuffle_buffer, initial=plan.shuffle_buffer, rng=rng)(raw)


def _resampled(plan: LoaderPlan, epoch: int, role: int, read: ReadPiece) -> Iterator[RawSample]:
    """Whole shards drawn with replacement (weighted by size, so every sample is equally likely)."""
    rng = random.Random(derive_seed(plan.seed, epoch, plan.rank, role, "resample"))
    weights = [s.samples for s in plan.shards]

    def shards() -> Iterator[RawSample]:
        while True:
            shard = rng.choices(plan.shards, weights)[0]
            yield from read(Piece(shard.uri, 0, shard.samples))

    return _shuffled(plan, epoch, role, shards())


def _slice(plan: LoaderPlan, epoch: int, role: int, read: ReadPiece) -> Iterator[RawSample]:
    """This (rank, role)'s slice of the epoch's shuffled sample sequence.

    Every rank shuffles the shard order with the same (seed, epoch) seed and cuts the sequence into one slice per
    (rank, role), each holding the role's quota of samples plus an equal share of the spare ones; reading stops
    at the quota. Corrupt samples can make a slice fall short of its quota; the role then reads its own slice
    again (fresh shuffle) rather than take samples from another rank, so ranks stay disjoint.
    """
    p = plan
    order = list(p.shards)
    random.Random(derive_seed(p.seed, epoch, "shard-order")).shuffle(order)
    quotas = [len(p.role_steps(r)) * p.batch_size for r in range(p.roles)]
    spare = (p.num_samples - p.steps_per_epoch * p.batch_size * p.world_size) // (p.world_size * p.roles)
    pieces = split_samples(order, [q + spare for _ in range(p.world_size) for q in quotas])
    mine = pieces[p.rank * p.roles + role]
    for pass_no in itertools.count():
        if pass_no:
            log.warning(
                "epoch %d rank %d worker role %d: corrupt samples left its slice short; reading it again",
                epoch, p.rank, role,
            )
        raw = itertools.chain.from_iterable(read(piece) for piece in mine)
        yield from _shuffled(p, epoch, role, raw, pass_no)
