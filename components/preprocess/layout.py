"""Where a preprocess run puts things under its output prefix.

    <prefix>/shards/NNNNN.tar        training shards (components.common.datasets), committed one by one
    <prefix>/shards/sizes.json       {"NNNNN.tar": samples}: webdataset's convention, read by open_clip_train
    <prefix>/manifest.json           the TRAIN_SHARDS manifest, written last: its presence means complete
    <prefix>/work/plan.json          the fingerprint of the inputs and options this prefix is being built from
    <prefix>/work/in/NNNNN.tar       candidates of input shard NNNNN (filtered, resized, tagged; not yet deduplicated)
    <prefix>/work/in/NNNNN.json      its summary (pixel hashes, reject counts, timing), written after the tar
    <prefix>/work/out/NNNNN.json     the record (count, first index, sha256) of output shard NNNNN, after its commit

work/ holds a crashed run's progress for the rerun and is deleted once the manifest is committed.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.common import store

MIN_SHARD_DIGITS = 5


@dataclass(frozen=True)
class Layout:
    prefix: str

    @property
    def manifest_uri(self) -> str:
        return store.join(self.prefix, "manifest.json")

    @property
    def sizes_uri(self) -> str:
        return store.join(self.prefix, "shards", "sizes.json")

    @property
    def work_prefix(self) -> str:
        return store.join(self.prefix, "work")

    @property
    def plan_uri(self) -> str:
        return store.join(self.work_prefix, "plan.json")

    def shard_name(self, index: int, num_shards: int) -> str:
        return f"{index:0{max(MIN_SHARD_DIGITS, len(str(num_shards - 1)))}d}.tar"

    def shard_uri(self, index: int, num_shards: int) -> str:
        return store.join(self.prefix, "shards", self.shard_name(index, num_shards))

    def candidates_uri(self, position: int) -> str:
        return store.join(self.work_prefix, "in", f"{position:0{MIN_SHARD_DIGITS}d}.tar")

    def summary_uri(self, position: int) -> str:
        return store.join(self.work_prefix, "in", f"{position:0{MIN_SHARD_DIGITS}d}.json")

    def committed_uri(self, index: int) -> str:
        return store.join(self.work_prefix, "out", f"{index:0{MIN_SHARD_DIGITS}d}.json")
