"""Dense indices and output shard sizes: a pure function of the filtered inputs, whatever the number of processes.

Input shards are taken in manifest order and samples in stored order; the first occurrence of an image is kept and
later copies are duplicates, across shards too. Kept samples are numbered 0..N-1 in that order, and output shard k
holds indices [k * size, (k + 1) * size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Assignment:
    kept: list[list[int]]  # per input shard: the positions (among its candidates) that survive deduplication
    first_index: list[int]  # per input shard: the dense index of its first kept sample
    num_samples: int
    duplicates: int  # candidates dropped because an earlier shard held the same image


def assign_indices(candidate_hashes: Sequence[Sequence[str]]) -> Assignment:
    """``candidate_hashes[i][j]``: the pixel hash of input shard i's j-th candidate (already unique within shard i)."""
    seen: set[str] = set()
    kept, first_index, n = [], [], 0
    for hashes in candidate_hashes:
        first_index.append(n)
        positions = []
        for j, h in enumerate(hashes):
            if h not in seen:
                seen.add(h)
                positions.append(j)
        kept.append(positions)
        n += len(positions)
    total = sum(len(h) for h in candidate_hashes)
    return Assignment(kept=kept, first_index=first_index, num_samples=n, duplicates=total - n)


def shard_size(num_samples: int, max_size: int, min_shards: int) -> int:
    """Samples per shard: at most ``max_size``, and small enough for at least ``min_shards`` shards when there are
    that many samples. Starts from an even split (N / min_shards, rounded up) so the last shard is not a sliver,
    and shrinks only when rounding up left too few shards (4 samples for 3 readers: 1, 1, 1, 1, not 2, 2)."""
    size = max(1, min(max_size, math.ceil(num_samples / min_shards)))
    while size > 1 and math.ceil(num_samples / size) < min_shards:
        size -= 1
    return size


def shard_counts(num_samples: int, size: int) -> list[int]:
    """Every shard holds ``size`` samples except the last, which holds the rest."""
    full, rest = divmod(num_samples, size)
    return [size] * full + ([rest] if rest else [])
