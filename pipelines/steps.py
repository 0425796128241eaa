"""The pipeline's steps as plain functions: what each KFP component runs (``pipelines/pipeline.py`` wraps them), and
what the local runner and the tests call directly. Each takes URIs and small values and returns a small dict (the
step's manifest); big data stays in the object store under the run prefix:

    <run>/ingest/            raw shards + manifest (+ the demo's held-out split)
    <run>/train-data/        training shards + manifest
    <run>/recipe.yaml        the recipe the run trained with (pipeline overrides applied)
    <run>/train/             checkpoints, log.jsonl, tensorboard/, metrics.json, model/
    <run>/evaluate/          benchmark datasets, metrics.json, report.html, summary.md
    <models>/latest.json     which model is the promoted one, with its score (promote)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import yaml

from components.common import store
from components.common.manifest import read_manifest, write_manifest
from components.common.recipe import Recipe

log = logging.getLogger("clipline.pipeline")

DEMO_SOURCE = "demo"  # the url_list value that selects the offline demo source
# The demo's raw images: small, since preprocess stores them again at the recipe's (smaller) training sides.
DEMO_INGEST = {"image_size": 64, "number_sample_per_shard": 500}


class StepError(RuntimeError):
    """A step failed; the message says which and what to do."""


def effective_recipe(recipe_location: str, objective: str, run_prefix: str) -> tuple[Recipe, str]:
    """The run's recipe (``objective`` replaces the recipe's objective, with that objective's defaults, when not
    empty), published at ``<run>/recipe.yaml`` so every step and every rank reads the same one."""
    from components.common.config import load
    from components.train.main import read_recipe

    recipe = read_recipe(recipe_location)
    doc = recipe.model_dump(mode="json")
    if objective and objective != recipe.objective.name:
        doc["objective"] = {"name": objective}
        recipe = load(Recipe, doc, f"{recipe_location} with objective {objective!r}")
    uri = store.join(run_prefix, "recipe.yaml")
    store.ensure_bucket(run_prefix)
    store.put_bytes(uri, yaml.safe_dump(recipe.document(), sort_keys=False).encode())
    return recipe, uri


def gather_url_lists_step(url_list: str, run_prefix: str, *, scratch: str | None = None,
                          batch_rows: int | None = None) -> dict[str, Any]:
    """The URL list ingest reads: ``demo`` as is, else components/ingest/gather.py's ``gather``."""
    from components.ingest.gather import GatherError, gather

    if url_list.strip() == DEMO_SOURCE:
        return {"status": "done", "url_list": DEMO_SOURCE, "lists": [], "gathered": False}
    try:
        return gather(url_list, run_prefix, scratch=scratch, batch_rows=batch_rows)
    except GatherError as exc:
        raise StepError(str(exc)) from None


def ingest_prefix(run_prefix: str, part: int = 0, parts: int = 1) -> str:
    base = store.join(run_prefix, "ingest")
    return base if parts == 1 else store.join(base, f"part-{part}")


def _ingest_processes() -> dict[str, int]:
    """img2dataset's worker processes under a pod's CPU limit: one per CPU of the limit (ingest otherwise starts one
    per CPU of the node, each with its download threads and buffers, which the step's memory limit is not sized
    for). Without a visible limit, ingest's own default (one per CPU, at most one per shard)."""
    from components.preprocess.options import available_cpus

    limited = available_cpus()
    return {"processes": limited} if limited < len(os.sched_getaffinity(0)) else {}


def ingest_step(url_list: str, run_prefix: str, *, demo_limit: int, seed: int, part: int = 0, parts: int = 1,
                allow_networks: str = "", max_image_bytes: int | None = None) -> dict[str, Any]:
    """Ingest the URL list, or with ``parts`` > 1 its ``part``-th contiguous part (merged by ``merge_ingest_step``).
    ``allow_networks``: comma-separated CIDRs fetched from although not public (the demo allows its own server)."""
    from components.ingest.ingest import MANIFEST, ingest
    from components.ingest.options import DEFAULT_MAX_IMAGE_BYTES, IngestOptions

    started = time.time()
    safety = {"allow_networks": allow_networks, "max_image_bytes": max_image_bytes or DEFAULT_MAX_IMAGE_BYTES}
    output = ingest_prefix(run_prefix, part, parts)
    piece = (part, parts) if parts > 1 else None
    if url_list == DEMO_SOURCE:
        from components.demo.dataset import ingest_demo

        # Every part builds the same demo (same seed) and publishes the same held-out split; it ingests its part.
        doc = ingest_demo(output, IngestOptions(**DEMO_INGEST, **_ingest_processes(), **safety),
                          limit=demo_limit or None, seed=seed, part=piece)
    else:
        doc = ingest(url_list, output, IngestOptions(**_ingest_processes(), **safety), part=piece)
    return {"status": "done", "manifest": store.join(output, MANIFEST), "prefix": output, "counts": doc["counts"],
            "demo": url_list == DEMO_SOURCE, "duration_s": round(time.time() - started, 2)}


def merge_ingest_step(run_prefix: str, parts: int, demo: bool) -> dict[str, Any]:
    from components.ingest.ingest import MANIFEST, merge_parts

    output = ingest_prefix(run_prefix)
    # The held-out split (demo) is the same in every part: the merged manifest names part 0's, the one evaluated.
    doc = merge_parts([store.join(ingest_prefix(run_prefix, k, parts), MANIFEST) for k in range(parts)], output)
    return {"status": "done", "manifest": store.join(output, MANIFEST), "prefix": output, "counts": doc["counts"],
            "demo": demo, "parts": parts}


def _preprocess_options(recipe: Recipe):
    from components.preprocess.options import PreprocessOptions

    resolutions = recipe.resolutions()
    # min_image_side: the demo's raw images are 64 px; the smallest side a stage trains at is the real floor.
    return PreprocessOptions(resolutions=resolutions, min_image_side=min(resolutions),
                             min_shards=max(1, recipe.data.workers))


def preprocess_part_step(raw_manifest: str, output: str, recipe: Recipe, part: int, parts: int) -> dict[str, Any]:
    """The filter phase of preprocess for one of ``parts`` groups of raw shards; ``preprocess_step`` merges."""
    from components.preprocess.preprocess import filter_part

    return filter_part(raw_manifest, output, _preprocess_options(recipe), part, parts)


def preprocess_step(raw_manifest: str, output: str, recipe: Recipe) -> dict[str, Any]:
    from components.preprocess.layout import Layout
    from components.preprocess.preprocess import preprocess

    started = time.time()
    doc = preprocess(raw_manifest, output, _preprocess_options(recipe))
    return {"status": "done", "manifest": Layout(output.rstrip("/")).manifest_uri, "num_samples": doc["num_samples"],
            "rejected": doc["rejected"], "duration_s": round(time.time() - started, 2)}


def train_step(recipe_uri: str, data_manifest: str, output: str, *, nproc_per_node: int = 1) -> dict[str, Any]:
    """Train on this machine with torchrun (the local runner's train step)."""
    from components.train.cli import launch_local

    started = time.time()
    code = launch_local(recipe_uri, data_manifest, output, nproc_per_node=nproc_per_node)
    if code != 0:
        raise StepError(f"train failed (torchrun exit code {code}); its log is above. Rerunning resumes from the "
                        f"latest checkpoint under {output}")
    return trained(output, started)


# A floor on training throughput (samples/s per GPU, or per node without GPUs) for the cluster step's timeout: a job
# slower than this is treated as stuck. Even a ViT-L/16 on one older GPU trains faster.
MIN_SAMPLES_PER_S = 20.0
SUBMIT_SLACK_S = 1800  # image pulls, gang scheduling, checkpoint writes


def train_timeout_s(recipe: Recipe, nodes: int, gpus_per_node: int) -> int:
    """How long the train step waits for its job: the recipe's samples at the floor throughput, plus slack."""
    samples = sum(stage.samples for stage in recipe.stages)
    return int(samples / (MIN_SAMPLES_PER_S * nodes * max(1, gpus_per_node)) + SUBMIT_SLACK_S)


def train_on_cluster(recipe: Recipe, recipe_uri: str, data_manifest: str, output: str, *, launcher: str, nodes: int,
                     gpus_per_node: int, image: str, namespace: str = "", runtime: str = "", cpu: str = "",
                     memory: str = "", shm: str = "", ephemeral: str = "", node_selector: str = "",
                     tolerations: str = "", priority_class: str = "", queue: str = "", gang_scheduler: str = "",
                     nccl_env: str = "", max_restarts: int = 2, timeout_s: int | None = None, api: Any = None,
                     poll_s: float = 15.0) -> dict[str, Any]:
    """Train as a cluster job: a Trainer v2 TrainJob (``launcher`` trainjob) or a training-operator PyTorchJob
    (pytorchjob) in ``namespace`` (default: this step's own). The job is owned by this step's pod, has a deadline
    derived from the recipe, streams its rank-0 log into this step's log and is deleted when the step ends, however
    it ends (watch.run_job). ``max_restarts``: torchrun restarts all ranks that many times in place (resuming from the
    latest checkpoint), and a failed TrainJob is resubmitted that many times."""
    from components.train.launch import jobspec
    from components.train.launch.component import train
    from components.train.launch.kube import KubeApi
    from components.train.launch.scheduler import TARGETS
    from components.train.launch.watch import JobFailed, run_job

    if launcher not in TARGETS:
        raise StepError(f"launcher must be one of {', '.join([*TARGETS, 'local'])}, got {launcher!r}")
    started = time.time()
    timeout_s = timeout_s or train_timeout_s(recipe, nodes, gpus_per_node)
    namespace = namespace or jobspec.current_namespace()
    app = train(recipe_uri, data_manifest, output, nnodes=nodes, nproc_per_node=max(1, gpus_per_node),
                gpu=gpus_per_node, image=image, max_restarts=max_restarts)
    options = {"namespace": namespace, "runtime": runtime, "cpu": cpu, "memory": memory, "shm_size": shm,
               "ephemeral_storage": ephemeral, "node_selector": node_selector, "tolerations": tolerations,
               "priority_class": priority_class, "queue": queue, "gang_scheduler": gang_scheduler,
               "nccl_env": nccl_env, "active_deadline_seconds": timeout_s,
               "owner": jobspec.owner_from_env(namespace), "_scheme": launcher}
    try:
        spec = jobspec.from_app(app, options)
        outcome = run_job(TARGETS[launcher], spec, api=api or KubeApi(), timeout_s=timeout_s,
                          resubmits=max_restarts, options=options, poll_s=poll_s)
    except (jobspec.JobSpecError, JobFailed) as exc:
        raise StepError(f"train on the cluster: {exc}") from exc
    doc = trained(output, started)
    doc.update(job=outcome.app_id, attempts=outcome.attempts)
    return doc


def trained(output: str, started: float) -> dict[str, Any]:
    from components.train.export import manifest_uri
    from components.train.progress import LOG_NAME, METRICS_NAME

    metrics = store.get_json(store.join(output, METRICS_NAME))
    return {"status": "done", "model": manifest_uri(output), "log": store.join(output, LOG_NAME),
            "samples_seen": metrics["samples_seen"], "stages": metrics["stages"],
            "duration_s": round(time.time() - started, 2), "metrics": scalar_metrics(metrics)}


def scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of the trainer's metrics.json, flattened (``stages.0.samples_per_s``), for KFP's Metrics."""
    out: dict[str, float] = {}
    items = metrics.items() if isinstance(metrics, dict) else enumerate(metrics)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (dict, list)):
            out.update(scalar_metrics(value, f"{name}."))
    return out


def evaluate_step(model_manifest: str, output: str, *, datasets: list[str], demo_ingest_manifest: str | None,
                  training_log: str | None) -> dict[str, Any]:
    """Zero-shot evaluation of the exported model on ``datasets`` plus, for a demo run, the demo's held-out split
    that ``demo_ingest_manifest`` (the ingest's RAW_SHARDS manifest) names."""
    from components.demo.benchmarks import benchmarks_from_heldout
    from components.evaluate.evaluate import evaluate
    from components.train.export import MODEL

    started = time.time()
    uris = list(datasets)
    if demo_ingest_manifest:
        written = benchmarks_from_heldout(demo_ingest_manifest, store.join(output, "datasets"))
        uris += [b["uri"] for b in written.values()]
    if not uris:
        raise StepError("no evaluation dataset: give eval_datasets (CLIP_benchmark webdataset prefixes) or train on "
                        "the demo source, whose held-out split is evaluated")
    model = read_manifest(model_manifest, MODEL)
    doc = evaluate(model["config"], uris, output, checkpoint=model["weights"], training_log=training_log)
    results = {name: r["metrics"] for name, r in doc["datasets"].items()}
    for name, metrics in results.items():
        log.info("evaluate %s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {"status": "done", "report": store.join(output, "report.html"),
            "metrics": store.join(output, "metrics.json"), "summary": store.join(output, "summary.md"),
            "results": results,
            "duration_s": round(time.time() - started, 2)}


# ------------------------------------------------------------------------------------------------------------ promote

LATEST = "latest.json"


def score(results: dict[str, dict[str, float]], metric: str) -> float:
    """The promotion score: the mean of ``metric`` over the datasets that report it (e.g. acc1 over the
    classification benchmarks)."""
    values = [m[metric] for m in results.values() if metric in m]
    if not values:
        available = sorted({k for m in results.values() for k in m})
        raise StepError(f"promotion metric {metric!r} is in no evaluation result; available: {', '.join(available)}")
    return sum(values) / len(values)


def promote_step(model_manifest: str, evaluation: dict[str, Any], models_prefix: str, *, metric: str,
                 tolerance: float) -> dict[str, Any]:
    """Make the new model the ``latest`` under ``models_prefix`` unless it scores worse than the current one by more
    than ``tolerance`` (absolute, in the metric's units). The decision, with both scores, is returned and written
    to ``<models>/decisions/<time>.json``; the promoted pointer is ``<models>/latest.json``."""
    new_score = score(evaluation["results"], metric)
    latest_uri = store.join(models_prefix, LATEST)
    current = store.get_json(latest_uri) if store.exists(latest_uri) else None
    baseline = current["score"] if current and current.get("metric") == metric else None
    promote = baseline is None or new_score >= baseline - tolerance
    if current and baseline is None:
        reason = f"the current latest was scored with {current.get('metric')!r}, not {metric!r}: promoting"
    elif baseline is None:
        reason = "no latest model yet: promoting"
    else:
        verdict = "promoting" if promote else "keeping the current latest"
        reason = f"{metric} {new_score:.4f} vs latest {baseline:.4f} (tolerance {tolerance}): {verdict}"
    decision = {"promoted": promote, "metric": metric, "score": new_score, "baseline": baseline,
                "baseline_model": current["model"] if current else None, "tolerance": tolerance,
                "model": model_manifest, "reason": reason}
    store.ensure_bucket(models_prefix)
    if promote:
        write_manifest(latest_uri, "latest_model", {"model": model_manifest, "metric": metric, "score": new_score,
                                                    "report": evaluation.get("report")})
    store.put_json(store.join(models_prefix, "decisions", f"{time.strftime('%Y%m%d-%H%M%S')}.json"), decision)
    log.info("promote: %s", reason)
    return decision
