"""Stage 1: a URL list -> img2dataset webdataset shards in the object store, with a RAW_SHARDS manifest written last.

Layout under the output prefix:

    shards/NNNNN.tar, NNNNN.parquet, NNNNN_stats.json   img2dataset's output, committed shard by shard
    ingest-state.json                                   what the shards were made from (checked on resume)
    manifest.json                                       RAW_SHARDS (components.common.datasets), only when complete
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from components.common import store
from components.common.datasets import RAW_SHARDS
from components.common.manifest import write_manifest
from components.ingest import img2dataset_run
from components.ingest.counts import aggregate, success_rate, top_reasons
from components.ingest.options import IngestOptions
from components.ingest.shard_committer import STATS_SUFFIX, Shard, ShardCommitter, shard_files, shard_name
from components.ingest.url_list import UrlList, load_url_list, slice_url_list

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "ingest-state.json"
SHARDS = "shards"
# Options that change what a shard holds: a resumed run must use the same values as the run it resumes.
_CONTENT_OPTIONS = (
    "image_size", "resize_mode", "number_sample_per_shard", "min_image_size", "max_aspect_ratio", "max_image_pixels",
)  # fmt: skip


class IngestError(RuntimeError):
    pass


def ingest(
    url_list: str, output_prefix: str, options: IngestOptions, *, extra: Mapping[str, Any] | None = None,
    part: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Download ``url_list`` into shards under ``output_prefix``; returns the manifest (``extra`` is merged into it).
    ``part=(k, K)``: only the k-th of K contiguous parts of the list (a fan-out; ``merge_parts`` joins them).

    Raises IngestError, writing no manifest, when a shard could not be committed or the success rate is below
    ``options.min_success_rate``. Committed shards stay, so a rerun with ``incremental`` resumes.

    Call it from the main thread of a program whose entry script has an ``if __name__ == "__main__":`` guard:
    img2dataset installs a signal handler and spawns worker processes (which re-import the entry script)."""
    started = time.monotonic()
    store.ensure_bucket(output_prefix)
    manifest_uri = store.join(output_prefix, MANIFEST)
    shards_uri = store.join(output_prefix, SHARDS)
    with tempfile.TemporaryDirectory(prefix="clipline-ingest-") as tmp:
        scratch = Path(tmp)
        urls = load_url_list(url_list, options, scratch)
        if part is not None:
            urls = slice_url_list(urls, *part)
        n_shards = math.ceil(urls.rows / options.number_sample_per_shard)
        done = _prepare_prefix(output_prefix, _fingerprint(urls, options), n_shards, incremental=options.incremental)
        local_dir = scratch / SHARDS
        local_dir.mkdir()
        for shard in done.values():  # img2dataset skips a shard whose stats file is in its output folder
            (local_dir / f"{shard_name(shard.shard_id)}{STATS_SUFFIX}").write_text(json.dumps(shard.stats))

        todo = n_shards - len(done)
        log.info("ingest %s: %d URLs in %d shards, %d already committed under %s",
                 url_list, urls.rows, n_shards, len(done), shards_uri)
        committer = ShardCommitter(local_dir, shards_uri, skip=set(done), total_shards=n_shards)
        committer.start()
        download_started = time.monotonic()
        try:
            if todo:
                # The CPUs this process may run on (a container's cpuset), not the machine's.
                processes = options.processes or min(len(os.sched_getaffinity(0)), todo)
                img2dataset_run.download(urls.path, local_dir, options, processes)
        except BaseException:
            with contextlib.suppress(Exception):  # the download's own error is the one to report
                committer.finish()
            raise
        new = committer.finish()
        download_s = time.monotonic() - download_started

    shards = dict(sorted({**done, **new}.items()))
    missing = [i for i in range(n_shards) if i not in shards]
    if missing:
        why = "; ".join(f"{shard_name(i)}: {committer.rejected.get(i, 'img2dataset gave up on it (see its log)')}"
                        for i in missing[:5])
        raise IngestError(
            f"ingest of {url_list}: {len(missing)} of {n_shards} shards were not committed ({why}); "
            f"rerun with incremental resume to retry only those"
        )

    counts = aggregate((s.stats for s in shards.values()), options.max_image_pixels)
    rate = success_rate(counts)
    if rate < options.min_success_rate:
        raise IngestError(
            f"ingest of {url_list}: success rate {rate:.1%} ({counts['success']} of {counts['total']} URLs) is below "
            f"min_success_rate {options.min_success_rate:.1%}; top failure reasons: {top_reasons(counts)}. "
            f"No manifest written; the {n_shards} shards stay under {shards_uri}"
        )

    new_success = sum(s.stats["successes"] for s in new.values())
    body = {
        "shards": [{"uri": s.uri, "samples": s.stats["successes"]} for s in shards.values()],
        "counts": counts,
        "success_rate": round(rate, 6),
        "duration_s": round(time.monotonic() - started, 3),
        # Throughput of this run's downloads (shards resumed from an earlier run are not counted).
        "images_per_s": round(new_success / download_s, 2) if new else 0.0,
        "urls_per_s": round(committer.processed / download_s, 2) if new else 0.0,
        "resumed_shards": len(done),
        "url_list": url_list,
        "url_list_sha256": urls.sha256,
        "part": list(part) if part else None,
        "options": options.model_dump(mode="json"),
        **(extra or {}),
    }
    doc = write_manifest(manifest_uri, RAW_SHARDS, body)
    log.info("ingest done: %d of %d images ok (%.1f%%) in %d shards, %.1f images/s; manifest %s",
             counts["success"], counts["total"], 100 * rate, n_shards, body["images_per_s"], manifest_uri)
    return doc


def _fingerprint(urls: UrlList, options: IngestOptions) -> dict[str, Any]:
    content = options.model_dump(mode="json", include=set(_CONTENT_OPTIONS))
    return {"url_list_sha256": urls.sha256, "rows": urls.rows, **content}


def _prepare_prefix(
    output_prefix: str, fingerprint: dict[str, Any], n_shards: int, *, incremental: bool
) -> dict[int, Shard]:
    """Check (resume) or clear (no resume) the prefix, record what its shards are made from; the committed shards."""
    if incremental:
        _check_resumable(output_prefix, fingerprint)
    # The manifest exists only while the prefix is complete, so it goes before any shard is touched.
    store.delete(store.join(output_prefix, MANIFEST))
    shards_uri = store.join(output_prefix, SHARDS)
    if not incremental:
        for obj in list(store.list_objects(shards_uri + "/")):
            store.delete(obj.uri)
    store.put_json(store.join(output_prefix, STATE), fingerprint)
    return _committed_shards(shards_uri, n_shards)


def _check_resumable(output_prefix: str, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume shards made from another URL list or with other options (or by something else)."""
    state_uri = store.join(output_prefix, STATE)
    shards_prefix = store.join(output_prefix, SHARDS) + "/"
    if store.exists(state_uri):
        previous = store.get_json(state_uri)
        changed = sorted(k for k in fingerprint.keys() | previous.keys() if fingerprint.get(k) != previous.get(k))
        if changed:
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise IngestError(
                f"{output_prefix} holds shards from a different URL list or options ({detail}); "
                "use another output prefix, or turn incremental resume off to replace them"
            )
    elif next(iter(store.list_objects(shards_prefix)), None) is not None:
        raise IngestError(
            f"{shards_prefix} holds shards without {STATE} (not written by this ingest); "
            "use another output prefix, or turn incremental resume off to replace them"
        )


def _committed_shards(shards_uri: str, n_shards: int) -> dict[int, Shard]:
    """Shards a previous run committed: all three objects present (the stats file is uploaded last)."""
    names = {obj.uri.rsplit("/", 1)[1] for obj in store.list_objects(shards_uri + "/")}
    done = {}
    for shard_id in range(n_shards):
        uris = shard_files(shards_uri, shard_id)
        if all(uri.rsplit("/", 1)[1] in names for uri in uris.values()):
            done[shard_id] = Shard(shard_id, uris["tar"], store.get_json(uris["stats"]))
    return done


def merge_parts(part_manifests: list[str], output_prefix: str) -> dict[str, Any]:
    """One RAW_SHARDS manifest at ``<output_prefix>/manifest.json`` for the parts of a fan-out, in part order: their
    shards (left where the parts wrote them) and their summed counts. Preprocess numbers the samples in this order,
    so the dense indices are those of a single ingest of the whole list."""
    from components.common.manifest import read_manifest

    docs = [read_manifest(uri, RAW_SHARDS) for uri in part_manifests]
    counts = _sum_counts([d["counts"] for d in docs])
    counts["failed"] = dict(sorted(counts["failed"].items(), key=lambda item: -item[1]))
    first = docs[0]
    body = {
        "shards": [shard for d in docs for shard in d["shards"]],
        "counts": counts,
        "success_rate": round(success_rate(counts), 6),
        "duration_s": round(max(d["duration_s"] for d in docs), 3),
        "images_per_s": round(sum(d["images_per_s"] for d in docs), 2),
        "url_list": first["url_list"],
        "parts": part_manifests,
        "options": first["options"],
        **({"demo": first["demo"]} if "demo" in first else {}),
    }
    return write_manifest(store.join(output_prefix, MANIFEST), RAW_SHARDS, body)


def _sum_counts(counts: list[Any]) -> Any:
    """Sum nested count dicts key by key (numbers add up; a key missing in one part counts as 0 there)."""
    if all(isinstance(c, dict) for c in counts):
        keys = dict.fromkeys(k for c in counts for k in c)
        return {k: _sum_counts([c[k] for c in counts if k in c]) for k in keys}
    return sum(counts)
