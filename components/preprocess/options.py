"""What a preprocess run may be told. Options that change the bytes of the output go into its fingerprint."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator

from components.common.config import Config


class PreprocessOptions(Config):
    # Square sides stored per sample (<key>.img<S>.jpg): the finetune resolution, plus CLIPA's pretrain one.
    resolutions: tuple[int, ...] = Field((224,), min_length=1)
    # Samples per output shard; every shard has exactly this many except the last.
    shard_size: int = Field(1000, ge=1)
    # At least this many output shards (set it to loader workers x world size so every reader owns whole shards);
    # the shard size shrinks to fit. With fewer samples than that the loader has to resample shards.
    min_shards: int = Field(1, ge=1)
    # Images whose shorter side is below this are rejected as too small.
    min_image_side: int = Field(32, ge=1)
    jpeg_quality: int = Field(95, ge=1, le=100)
    # Fail (after filtering, before writing any output shard) when more than this fraction of the input is rejected.
    max_reject_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # Worker processes for decoding, resizing and tagging; None: one per CPU this process may use.
    processes: int | None = Field(None, ge=1)

    @field_validator("resolutions")
    @classmethod
    def _valid_resolutions(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in value if not 8 <= s <= 4096]
        if bad:
            raise ValueError(f"resolutions must be between 8 and 4096 pixels, got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"resolutions must be distinct, got {list(value)}")
        return tuple(sorted(value))

    def worker_count(self) -> int:
        return self.processes or available_cpus()

    def output_settings(self) -> dict:
        """The options that decide the output's bytes (not how fast or how strictly it is made)."""
        return self.model_dump(include={"resolutions", "shard_size", "min_shards", "min_image_side", "jpeg_quality"},
                               mode="json")


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU limit (a pod's ``limits.cpu``),
    which the affinity does not show; more processes than that only queue for the same quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: the affinity is the limit
    return cpus
