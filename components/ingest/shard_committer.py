"""Publish each shard img2dataset finishes to the object store while the download goes on, then drop the local copy.

img2dataset writes ``NNNNN.tar`` and ``NNNNN.parquet``, closes both, and only then writes ``NNNNN_stats.json``, so a
parseable stats file means the shard is complete. The stats file is also uploaded last: in the store, a shard
counts as committed only when its ``_stats.json`` is there, which is what a resumed run looks for.
"""

from __future__ import annotations

import json
import logging
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import store

log = logging.getLogger(__name__)

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: shard names are 00000, 00001, ...
STATS_SUFFIX = "_stats.json"
IMAGE_EXT = "jpg"  # the data contract's image field in raw shards


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def shard_files(shards_uri: str, shard_id: int) -> dict[str, str]:
    """The URIs of one shard's three objects, in upload order (the stats file commits the shard)."""
    name = shard_name(shard_id)
    return {
        "tar": store.join(shards_uri, f"{name}.tar"),
        "parquet": store.join(shards_uri, f"{name}.parquet"),
        "stats": store.join(shards_uri, f"{name}{STATS_SUFFIX}"),
    }


@dataclass(frozen=True)
class Shard:
    shard_id: int
    uri: str  # the tar
    stats: dict[str, Any]  # img2dataset's per-shard stats


def count_samples(tar_path: Path) -> int:
    """Samples with an image in a webdataset tar (reads headers only)."""
    with tarfile.open(tar_path) as tar:
        return sum(1 for m in tar if m.isfile() and m.name.endswith(f".{IMAGE_EXT}"))


class ShardCommitter(threading.Thread):
    """A background thread that commits finished shards from ``local_dir`` to ``shards_uri``."""

    def __init__(self, local_dir: Path, shards_uri: str, *, skip: set[int], total_shards: int, poll_s: float = 0.5):
        super().__init__(name="shard-committer", daemon=True)
        self.local_dir, self.shards_uri = local_dir, shards_uri
        self.total_shards, self.poll_s = total_shards, poll_s
        self.committed: dict[int, Shard] = {}
        self.rejected: dict[int, str] = {}  # shard id -> why it was not committed (a rerun retries it)
        self._seen = set(skip)  # shards committed by an earlier run, and shards handled here
        self._already = len(skip)
        self._halt = threading.Event()
        self._error: BaseException | None = None
        self._t0 = time.monotonic()
        self.processed = 0  # URLs handled by this run's shards

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.sweep(final=False)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by finish()
                self._error = exc
                return

    def finish(self) -> dict[int, Shard]:
        """Stop polling, commit what is left, and raise the first upload error, if any."""
        self._halt.set()
        self.join()
        if self._error is not None:
            raise self._error
        self.sweep(final=True)
        return self.committed

    def sweep(self, *, final: bool) -> None:
        for stats_path in sorted(self.local_dir.glob(f"*{STATS_SUFFIX}")):
            shard_id = int(stats_path.name.removesuffix(STATS_SUFFIX))
            if shard_id in self._seen:
                continue
            try:
                stats = json.loads(stats_path.read_text())
            except json.JSONDecodeError:
                if final:  # img2dataset has returned, so the file will not grow any more
                    self._reject(shard_id, f"unreadable stats file {stats_path.name}")
                continue  # still being written: the next sweep reads it
            self._commit(shard_id, stats)

    def _commit(self, shard_id: int, stats: dict[str, Any]) -> None:
        self._seen.add(shard_id)
        name = shard_name(shard_id)
        local = {kind: self.local_dir / f"{name}.{kind}" for kind in ("tar", "parquet")}
        missing = [p.name for p in local.values() if not p.is_file()]
        if missing:
            self._reject(shard_id, f"img2dataset wrote no {', '.join(missing)}")
            return
        # The counts in the manifest come from the stats; commit only shards whose tar agrees with them.
        samples = count_samples(local["tar"])
        if samples != stats["successes"]:
            self._reject(shard_id, f"its tar holds {samples} images but its stats report {stats['successes']}")
        else:
            uris = shard_files(self.shards_uri, shard_id)
            store.put_file(uris["tar"], local["tar"])
            store.put_file(uris["parquet"], local["parquet"])
            store.put_file(uris["stats"], self.local_dir / f"{name}{STATS_SUFFIX}")
            self.committed[shard_id] = Shard(shard_id, uris["tar"], stats)
            self.processed += stats["count"]
            self._log_progress(shard_id, stats)
        for path in local.values():
            path.unlink(missing_ok=True)

    def _reject(self, shard_id: int, why: str) -> None:
        self._seen.add(shard_id)
        self.rejected[shard_id] = why
        log.error("shard %s not committed: %s", shard_name(shard_id), why)

    def _log_progress(self, shard_id: int, stats: dict[str, Any]) -> None:
        done = self._already + len(self.committed)
        rate = self.processed / max(time.monotonic() - self._t0, 1e-9)
        log.info(
            "shard %s committed: %d/%d images ok; %d/%d shards done; %.1f URLs/s",
            shard_name(shard_id), stats["successes"], stats["count"], done, self.total_shards, rate,
        )
