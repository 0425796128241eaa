"""The preprocess stage: img2dataset's raw shards in, training shards out (contract: components.common.datasets).

1. Filter (a process pool, one input shard per task, candidates.py): decode, reject, hash, resize, POS-tag.
2. Plan (here, cheap): drop duplicates across shards in input order and number the kept samples 0..N-1 (plan.py).
3. Re-shard (reshard.py): balanced output shards of ``shard_size`` samples (the last one holds the rest), then
   sizes.json, then the TRAIN_SHARDS manifest, last.

Shards and loader readers: the manifest lists ``len(shards)`` shards. A loader with at most that many readers
(DataLoader workers x world size) can give each reader whole shards; with more readers than shards it has to
resample shards (open_clip's ``--dataset-resampled``). ``min_shards`` shrinks the shard size so there are enough.

Reruns: the output only depends on the raw manifest's shard list and the options in its fingerprint, never on the
number of processes. A rerun after a crash reuses finished filter results and committed output shards from
``work/`` (layout.py) and writes the rest, byte for byte what the first run would have written; a rerun after
success returns the existing manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

from components.common import datasets, store
from components.common.manifest import read_manifest, write_manifest
from components.preprocess import filters, nltk_data, plan
from components.preprocess.candidates import FilterTask, filter_shard
from components.preprocess.errors import PreprocessError
from components.preprocess.layout import Layout
from components.preprocess.options import PreprocessOptions
from components.preprocess.reshard import ShardPlan, write_shards

log = logging.getLogger(__name__)

# Bump when the same inputs and options would give different output bytes, so a rerun never mixes the two.
FORMAT_VERSION = 1


def preprocess(raw_manifest_uri: str, output_prefix: str, options: PreprocessOptions | None = None) -> dict:
    """Turn the raw shards of a RAW_SHARDS manifest into training shards under ``output_prefix``; return the
    TRAIN_SHARDS manifest (also committed at ``<output_prefix>/manifest.json``).

    After a fan-out of ``filter_part`` over the same inputs and options, this reuses every part's filter results
    and only plans and re-shards: the merge step."""
    options = options or PreprocessOptions()
    started = time.perf_counter()
    layout = Layout(output_prefix.rstrip("/"))
    raw = read_manifest(raw_manifest_uri, datasets.RAW_SHARDS)
    inputs = [(shard["uri"], shard["samples"]) for shard in raw["shards"]]
    if not inputs:
        raise PreprocessError(f"{raw_manifest_uri} lists no shards")
    fingerprint = _fingerprint(inputs, options)

    finished = _finished_manifest(layout, fingerprint)
    if finished is not None:
        log.info("%s is already complete (%d samples); nothing to do", layout.manifest_uri, finished["num_samples"])
        return finished
    nltk_data.require()  # here, not in a worker, so a missing model fails once and names the fix
    _claim(layout, fingerprint, raw_manifest_uri, options)

    summaries, filter_stats = _filter(layout, inputs, options)
    assignment = plan.assign_indices([s["hashes"] for s in summaries])
    input_samples = sum(s["samples"] for s in summaries)
    rejected = _rejected(summaries, assignment)
    _check_rejections(input_samples, rejected, options.max_reject_fraction)

    size = plan.shard_size(assignment.num_samples, options.shard_size, options.min_shards)
    shard_plan = ShardPlan(counts=plan.shard_counts(assignment.num_samples, size), size=size,
                           resolutions=options.resolutions)
    shards, written = write_shards(layout, assignment, shard_plan)
    sizes = {shard["uri"].rsplit("/", 1)[-1]: shard["samples"] for shard in shards}
    store.put_json(layout.sizes_uri, sizes)

    duration = time.perf_counter() - started
    doc = write_manifest(layout.manifest_uri, datasets.TRAIN_SHARDS, {
        "num_samples": assignment.num_samples,
        "shards": shards,
        "resolutions": list(options.resolutions),
        "rejected": rejected,
        "sizes_uri": layout.sizes_uri,
        "input_samples": input_samples,
        "source_manifest": raw_manifest_uri,
        "shard_size": size,
        "fingerprint": fingerprint,
        "options": options.model_dump(mode="json"),
        "duration_s": round(duration, 3),
        **filter_stats,
    })
    _remove_work(layout)
    log.info("preprocess done: %d of %d samples kept in %d shards of %d (%d written now, %d reused); rejected %s; "
             "%.1f s", assignment.num_samples, input_samples, len(shards), size, written, len(shards) - written,
             _describe(rejected), duration)
    if len(shards) < options.min_shards:
        log.warning("only %d shards for min_shards=%d readers: the loader must resample shards",
                    len(shards), options.min_shards)
    return doc


def filter_part(raw_manifest_uri: str, output_prefix: str, options: PreprocessOptions, part: int,
                parts: int) -> dict:
    """The filter phase for the k-th of ``parts`` contiguous groups of input shards (a fan-out over pods). Results
    go to the prefix's work area; ``preprocess`` on the same prefix then merges: it numbers the samples in input
    order, so the indices and counts are those of a single run."""
    if not 0 <= part < parts:
        raise PreprocessError(f"part {part} is not one of 0..{parts - 1}")
    layout = Layout(output_prefix.rstrip("/"))
    raw = read_manifest(raw_manifest_uri, datasets.RAW_SHARDS)
    inputs = [(shard["uri"], shard["samples"]) for shard in raw["shards"]]
    if not inputs:
        raise PreprocessError(f"{raw_manifest_uri} lists no shards")
    nltk_data.require()
    _claim(layout, _fingerprint(inputs, options), raw_manifest_uri, options)
    n = len(inputs)
    positions = range(part * n // parts, (part + 1) * n // parts)
    summaries, stats = _filter(layout, inputs, options, positions)
    return {"part": part, "parts": parts, "input_shards": len(positions),
            "samples": sum(s["samples"] for s in summaries), "candidates": sum(len(s["hashes"]) for s in summaries),
            **stats}


def _fingerprint(inputs: list[tuple[str, int]], options: PreprocessOptions) -> str:
    basis = {"format": FORMAT_VERSION, "inputs": inputs, "options": options.output_settings()}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def _finished_manifest(layout: Layout, fingerprint: str) -> dict | None:
    if not store.exists(layout.manifest_uri):
        return None
    doc = read_manifest(layout.manifest_uri, datasets.TRAIN_SHARDS)
    if doc.get("fingerprint") != fingerprint:
        raise PreprocessError(f"{layout.prefix} already holds training shards made from other inputs or options; "
                              "choose another output prefix or delete that one")
    return doc


def _claim(layout: Layout, fingerprint: str, raw_manifest_uri: str, options: PreprocessOptions) -> None:
    """Record what this prefix is being built from, so a rerun continues only the same build."""
    if store.exists(layout.plan_uri):
        previous = store.get_json(layout.plan_uri)
        if previous.get("fingerprint") != fingerprint:
            raise PreprocessError(
                f"{layout.prefix} holds an unfinished preprocess run of other inputs or options "
                f"(from {previous.get('raw_manifest_uri')}, options {previous.get('options')}); rerun that one, "
                "or delete the prefix or choose another"
            )
        log.info("continuing the unfinished run in %s", layout.prefix)
        return
    if next(iter(store.list_objects(layout.prefix + "/")), None) is not None:
        if store.exists(layout.plan_uri):  # another part of a fan-out claimed it just now
            return _claim(layout, fingerprint, raw_manifest_uri, options)
        raise PreprocessError(f"{layout.prefix} is not empty and holds no preprocess run; choose an empty prefix")
    store.put_json(layout.plan_uri, {
        "fingerprint": fingerprint, "raw_manifest_uri": raw_manifest_uri, "options": options.model_dump(mode="json"),
    })


def _filter(layout: Layout, inputs: list[tuple[str, int]], options: PreprocessOptions,
            positions: range | None = None) -> tuple[list[dict], dict]:
    """The summaries of the input shards at ``positions`` (default: all), in input order (reusing those a crashed run
    or another part finished), and throughput."""
    positions = range(len(inputs)) if positions is None else positions
    summaries: dict[int, dict] = {}
    tasks = []
    for position in positions:
        uri = inputs[position][0]
        summary_uri = layout.summary_uri(position)
        if store.exists(summary_uri):
            summaries[position] = store.get_json(summary_uri)
        else:
            tasks.append(FilterTask(position, uri, layout, options))
    if summaries:
        log.info("input shards already filtered: %d of %d (reused)", len(summaries), len(inputs))
    processes = min(options.worker_count(), len(tasks)) or 1
    started = time.perf_counter()
    busy = images = 0
    for task, summary in zip(tasks, _run(tasks, processes)):
        summaries[task.position] = summary
        images += summary["samples"]
        busy += summary["seconds"]
        kept = len(summary["hashes"])
        if summary["samples"] != inputs[task.position][1]:
            log.warning("%s holds %d samples; the raw manifest says %d", task.uri, summary["samples"],
                        inputs[task.position][1])
        log.info("filtered input %d/%d %s: %d samples, %d candidates, rejected %s; %.1f s, %.1f images/s (pid %d)",
                 task.position + 1, len(inputs), task.uri, summary["samples"], kept, _describe(summary["rejected"]),
                 summary["seconds"], summary["samples"] / max(summary["seconds"], 1e-9), summary["pid"])
    wall = time.perf_counter() - started
    stats = {
        "filter_processes": processes if tasks else 0,
        "images_per_s": round(images / wall, 2) if images else None,
        "images_per_s_per_process": round(images / busy, 2) if images else None,
    }
    if images:
        log.info("filter phase: %d images in %.1f s with %d processes: %.1f images/s, %.1f images/s per process",
                 images, wall, processes, stats["images_per_s"], stats["images_per_s_per_process"])
    return [summaries[p] for p in positions], stats


def _run(tasks: list[FilterTask], processes: int) -> Iterator[dict]:
    if processes <= 1:
        yield from map(filter_shard, tasks)
        return
    # spawn, not fork: this process may hold store connections and threads a forked child must not inherit.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(filter_shard, tasks)


def _rejected(summaries: list[dict], assignment: plan.Assignment) -> dict[str, int]:
    counts: Counter[str] = Counter({reason: 0 for reason in filters.REASONS})
    for summary in summaries:
        counts.update(summary["rejected"])
    counts[filters.DUPLICATE] += assignment.duplicates
    return dict(counts)


def _check_rejections(input_samples: int, rejected: dict[str, int], max_fraction: float) -> None:
    total = sum(rejected.values())
    if input_samples == 0 or total == input_samples:
        raise PreprocessError(f"no sample survived filtering: {input_samples} input samples, rejected "
                              f"{_describe(rejected)}")
    if total / input_samples > max_fraction:
        raise PreprocessError(
            f"{total} of {input_samples} samples rejected ({total / input_samples:.1%}), more than "
            f"max_reject_fraction {max_fraction:.1%}: {_describe(rejected)}. Fix the input or raise "
            "max_reject_fraction; a rerun reuses the filtering already done"
        )


def _describe(counts: dict[str, int]) -> str:
    shown = {k: v for k, v in counts.items() if v}
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or "none"


def _remove_work(layout: Layout) -> None:
    """Best effort: the manifest is committed, so leftovers under work/ are harmless."""
    try:
        for obj in list(store.list_objects(layout.work_prefix + "/")):
            store.delete(obj.uri)
    except store.StoreError as exc:
        log.warning("could not remove %s: %s", layout.work_prefix, exc)
