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

import json
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


def ingest_prefix(run_prefix: str, part: int = 0, parts: int = 1) -> str:
    base = store.join(run_prefix, "ingest")
    return base if parts == 1 else store.join(base, f"part-{part}")


def ingest_step(url_list: str, run_prefix: str, *, demo_limit: int, seed: int, part: int = 0,
                parts: int = 1) -> dict[str, Any]:
    """Ingest the URL list, or with ``parts`` > 1 its ``part``-th contiguous part (merged by ``merge_ingest_step``)."""
    from components.ingest.ingest import MANIFEST, ingest
    from components.ingest.options import IngestOptions

    started = time.time()
    output = ingest_prefix(run_prefix, part, parts)
    piece = (part, parts) if parts > 1 else None
    if url_list == DEMO_SOURCE:
        from components.ingest.demo import ingest_demo

        # Every part builds the same demo (same seed) and publishes the same held-out split; it ingests its part.
        doc = ingest_demo(output, IngestOptions(**DEMO_INGEST), limit=demo_limit or None, seed=seed, part=piece)
    else:
        doc = ingest(url_list, output, IngestOptions(), part=piece)
    return {"status": "done", "manifest": store.join(output, MANIFEST), "prefix": output, "counts": doc["counts"],
            "demo": url_list == DEMO_SOURCE, "duration_s": round(time.time() - started, 2)}


def merge_ingest_step(run_prefix: str, parts: int, demo: bool) -> dict[str, Any]:
    from components.ingest.ingest import MANIFEST, merge_parts

    output = ingest_prefix(run_prefix)
    doc = merge_parts([store.join(ingest_prefix(run_prefix, k, parts), MANIFEST) for k in range(parts)], output)
    # The held-out split (demo) is the same in every part; part 0's is the one evaluated.
    return {"status": "done", "manifest": store.join(output, MANIFEST), "prefix": ingest_prefix(run_prefix, 0, parts),
            "counts": doc["counts"], "demo": demo, "parts": parts}


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
    """How long the train step waits for its PyTorchJob: the recipe's samples at the floor throughput, plus slack."""
    samples = sum(stage.samples for stage in recipe.stages)
    return int(samples / (MIN_SAMPLES_PER_S * nodes * max(1, gpus_per_node)) + SUBMIT_SLACK_S)


def train_on_cluster(recipe: Recipe, recipe_uri: str, data_manifest: str, output: str, *, nodes: int,
                     gpus_per_node: int, image: str, namespace: str, secret: str, service_account: str,
                     timeout_s: int | None = None, scheduler: Any = None, poll_s: float = 15.0) -> dict[str, Any]:
    """Submit the training PyTorchJob (our torchx scheduler), stream the master's log into this step's log, wait with
    a timeout derived from the recipe, fail when the job fails, and delete the job at the end in every case."""
    import threading

    from torchx.specs import AppState

    from components.train.launch.component import ROLE_NAME, train
    from components.train.launch.pytorchjob import create_scheduler

    started = time.time()
    timeout_s = timeout_s or train_timeout_s(recipe, nodes, gpus_per_node)
    # The endpoint is not a secret: pass this step's own; the credentials reach the pods from the Secret.
    endpoint = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_REGION") if k in os.environ}
    app = train(recipe_uri, data_manifest, output, nnodes=nodes, nproc_per_node=max(1, gpus_per_node),
                gpu=gpus_per_node, image=image, max_retries=2, env=endpoint)
    scheduler = scheduler or create_scheduler("clipline")
    app_id = scheduler.submit(app, {"namespace": namespace, "env_secret": secret, "service_account": service_account})
    log.info("submitted PyTorchJob %s; waiting up to %d s", app_id, timeout_s)

    def stream() -> None:
        try:
            for line in scheduler.log_iter(app_id, ROLE_NAME, k=0, should_tail=True):
                print(line, end="" if line.endswith("\n") else "\n", flush=True)
        except Exception as exc:  # noqa: BLE001 - logs are best effort; the job's status decides the step
            log.warning("log streaming stopped: %s", exc)

    threading.Thread(target=stream, daemon=True).start()
    try:
        while True:
            status = scheduler.describe(app_id)
            if status is not None and status.state in (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED):
                break
            if time.time() - started > timeout_s:
                raise StepError(f"PyTorchJob {app_id} did not finish within {timeout_s} s (the recipe's samples at "
                                f"{MIN_SAMPLES_PER_S} samples/s per GPU plus {SUBMIT_SLACK_S} s)")
            time.sleep(poll_s)
        if status.state != AppState.SUCCEEDED:
            raise StepError(f"PyTorchJob {app_id} ended {status.state.name}: {status.msg or 'see the log above'}; "
                            f"rerunning resumes from the latest checkpoint under {output}")
    finally:
        scheduler.cancel(app_id)  # deletes the PyTorchJob (and with cleanPodPolicy its pods), done or not
    return trained(output, started)


def trained(output: str, started: float) -> dict[str, Any]:
    from components.train.export import manifest_uri
    from components.train.progress import LOG_NAME, METRICS_NAME

    metrics = json.loads(store.get_bytes(store.join(output, METRICS_NAME)))
    return {"status": "done", "model": manifest_uri(output), "log": store.join(output, LOG_NAME),
            "samples_seen": metrics["samples_seen"], "stages": metrics["stages"],
            "duration_s": round(time.time() - started, 2)}


def evaluate_step(model_manifest: str, output: str, *, datasets: list[str], demo_ingest_prefix: str | None,
                  training_log: str | None) -> dict[str, Any]:
    """Zero-shot evaluation of the exported model on ``datasets`` plus, for a demo run, the demo's held-out split."""
    from components.evaluate.benchmark_data import benchmarks_from_heldout
    from components.evaluate.evaluate import evaluate
    from components.train.export import MODEL

    started = time.time()
    uris = list(datasets)
    if demo_ingest_prefix:
        uris += [b["uri"] for b in benchmarks_from_heldout(demo_ingest_prefix, store.join(output, "datasets")).values()]
    if not uris:
        raise StepError("no evaluation dataset: give eval_datasets (CLIP_benchmark webdataset prefixes) or train on "
                        "the demo source, whose held-out split is evaluated")
    model = read_manifest(model_manifest, MODEL)
    doc = evaluate(model["config"], uris, output, checkpoint=model["weights"], training_log=training_log)
    results = {name: r["metrics"] for name, r in doc["datasets"].items()}
    for name, metrics in results.items():
        log.info("evaluate %s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {"status": "done", "report": store.join(output, "report.html"),
            "metrics": store.join(output, "metrics.json"), "summary": store.join(output, "summary.md"), "results": results,
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
    current = json.loads(store.get_bytes(latest_uri)) if store.exists(latest_uri) else None
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
    store.put_bytes(store.join(models_prefix, "decisions", f"{time.strftime('%Y%m%d-%H%M%S')}.json"),
                    json.dumps(decision, indent=2).encode())
    log.info("promote: %s", reason)
    return decision
