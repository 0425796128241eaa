"""Phase 2: copy kept candidates into balanced training shards under their dense keys.

Runs in one process: it only re-reads candidate tars in input order and re-packs their bytes (no decoding), so a
sequential pass reads each candidate tar at most once; uploads overlap with it in a few threads. An output shard
whose commit record exists is skipped, and candidate tars that feed only skipped shards are not read at all.
"""

from __future__ import annotations

import json
import logging
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from components.common import datasets, store
from components.common.tars import TarWriter, read_samples, sha256_file
from components.preprocess.layout import Layout
from components.preprocess.plan import Assignment

log = logging.getLogger(__name__)

UPLOAD_THREADS = 4
# Shards finished but not yet uploaded, at most: bounds local disk use to a few shards.
MAX_PENDING_UPLOADS = 2 * UPLOAD_THREADS


@dataclass(frozen=True)
class ShardPlan:
    counts: list[int]  # samples per output shard
    size: int  # samples in every shard but the last
    resolutions: tuple[int, ...]

    def first_index(self, shard: int) -> int:
        return shard * self.size


def write_shards(layout: Layout, assignment: Assignment, plan: ShardPlan) -> tuple[list[dict], int]:
    """Commit every output shard that is not committed yet; return all shard records and how many were written."""
    num_shards = len(plan.counts)
    records: dict[int, dict] = {}
    for k in range(num_shards):
        record = _committed_record(layout, k, plan)
        if record is not None:
            records[k] = record
    todo = set(range(num_shards)) - set(records)
    if records:
        log.info("output shards already committed: %d of %d (kept as they are)", len(records), num_shards)
    with tempfile.TemporaryDirectory(prefix="clipline-reshard-") as tmp, \
            ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="reshard-upload") as uploads:
        assembler = _Assembler(layout, plan, Path(tmp), uploads)
        for position, kept in enumerate(assignment.kept):
            first = assignment.first_index[position]
            needed = [j for r, j in enumerate(kept) if (first + r) // plan.size in todo]
            if not needed:
                continue  # everything this input shard contributes is already committed
            rank = {j: r for r, j in enumerate(kept)}
            wanted, last = set(needed), needed[-1]
            uri = layout.candidates_uri(position)
            with store.open_read(uri) as stream:
                for sample in read_samples(stream, uri):
                    j = int(sample["__key__"])
                    if j in wanted:
                        assembler.add(first + rank[j], sample)
                    if j >= last:
                        break  # the rest of this tar feeds committed shards only
        assembler.finish()
        for k, record in assembler.wait():
            records[k] = record
    missing = sorted(set(range(num_shards)) - set(records))
    if missing:
        raise RuntimeError(f"output shards {missing} were planned but not written (candidates missing under "
                           f"{layout.work_prefix}/in/?)")
    return [records[k] for k in range(num_shards)], len(todo)


def _committed_record(layout: Layout, k: int, plan: ShardPlan) -> dict | None:
    num_shards = len(plan.counts)
    record_uri, shard_uri = layout.committed_uri(k), layout.shard_uri(k, num_shards)
    if not (store.exists(record_uri) and store.exists(shard_uri)):
        return None
    record = store.get_json(record_uri)
    expected = {"uri": shard_uri, "samples": plan.counts[k], "first_index": plan.first_index(k)}
    if {key: record.get(key) for key in expected} != expected:
        return None  # not what this plan would write: write it again
    return record


class _Assembler:
    """Packs samples, arriving in dense-index order, into one output shard at a time."""

    def __init__(self, layout: Layout, plan: ShardPlan, tmp: Path, uploads: ThreadPoolExecutor):
        self.layout, self.plan, self.tmp, self.uploads = layout, plan, tmp, uploads
        self.shard: int | None = None
        self.writer: TarWriter | None = None
        self.written = 0
        self.pending: list[tuple[int, Future]] = []
        self.done: list[tuple[int, dict]] = []

    def add(self, index: int, sample: dict) -> None:
        shard = index // self.plan.size
        if shard != self.shard:
            self.finish()
            self._open(shard)
        expected = self.plan.first_index(shard) + self.written
        if index != expected:
            raise RuntimeError(f"output shard {shard}: got dense index {index}, expected {expected}")
        key = datasets.sample_key(index)
        meta = json.loads(sample[datasets.META_FIELD])
        meta = {"index": index, "words": meta["words"], "pos_order": meta["pos_order"],
                "source_key": meta["source_key"]}
        for size in self.plan.resolutions:
            field = datasets.image_field(size)
            self.writer.add(f"{key}.{field}", sample[field])
        self.writer.add(f"{key}.{datasets.CAPTION_FIELD}", sample[datasets.CAPTION_FIELD])
        self.writer.add(f"{key}.{datasets.META_FIELD}",
                        json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        self.written += 1

    def _open(self, shard: int) -> None:
        self.shard, self.written = shard, 0
        self.writer = TarWriter(self.tmp / self.layout.shard_name(shard, len(self.plan.counts)))

    def finish(self) -> None:
        """Close the open shard and queue its upload."""
        if self.writer is None:
            return
        self.writer.close()
        shard, path = self.shard, self.writer.path
        if self.written != self.plan.counts[shard]:
            raise RuntimeError(f"output shard {shard}: {self.written} samples, planned {self.plan.counts[shard]}")
        self.writer, self.shard = None, None
        while len(self.pending) >= MAX_PENDING_UPLOADS:
            self._collect(self.pending.pop(0))
        self.pending.append((shard, self.uploads.submit(self._commit, shard, path)))

    def _commit(self, shard: int, path: Path) -> dict:
        uri = self.layout.shard_uri(shard, len(self.plan.counts))
        record = {"uri": uri, "samples": self.plan.counts[shard], "first_index": self.plan.first_index(shard),
                  "sha256": sha256_file(path)}
        store.put_file(uri, path)
        store.put_json(self.layout.committed_uri(shard), record)
        path.unlink()
        return record

    def _collect(self, item: tuple[int, Future]) -> None:
        shard, future = item
        self.done.append((shard, future.result()))

    def wait(self) -> list[tuple[int, dict]]:
        while self.pending:
            self._collect(self.pending.pop(0))
        return self.done
