"""Seeds derived from named parts: the one way the trainer and the data loader turn (seed, epoch, rank, role, ...)
into a seed for a random generator, so no stream depends on process ids, clocks or another stream's draws."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (a hash, so nearby inputs give unrelated seeds)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
