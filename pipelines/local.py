"""Run the pipeline on one machine: the same stages as on Kubeflow, against an embedded S3 store.

ingest (the offline demo source, or a URL list) -> preprocess -> train (torchrun on this machine) -> evaluate (on
the demo's held-out split). The run manifest ``<run prefix>/run.json`` records every stage's outputs and timings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from components.common import embedded_store, store
from components.common.env import temporarily_set
from components.common.manifest import read_manifest, write_manifest
from components.common.recipe import Recipe, load_recipe

log = logging.getLogger("clipline.run")

STAGES = ("ingest", "preprocess", "train", "evaluate")
# The demo's raw images: small, since preprocess stores them again at the recipe's (smaller) training sides.
DEMO_INGEST = {"image_size": 64, "number_sample_per_shard": 500}


@contextlib.contextmanager
def object_store(store_dir: Path, use_env: bool) -> Iterator[str]:
    """The store a run writes to: the one in the environment, or an embedded server for the run's duration."""
    if use_env:
        store.S3Settings.from_env()  # fail early, naming the missing variables
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    with embedded_store.running(store_dir) as server, temporarily_set(server.env()):
        log.info("embedded S3 store at %s (data in %s)", server.endpoint, server.state_dir)
        yield server.endpoint


def run_local(
    recipe_path: str | Path,
    *,
    url_list: str | None = None,
    demo_limit: int | None = 1000,
    run_prefix: str | None = None,
    store_dir: str | Path = ".clipline/store",
    use_env_store: bool = False,
    nproc_per_node: int = 1,
) -> dict:
    """Validate the recipe, then run the stages in order (the demo source when no URL list is given); returns the run
    manifest."""
    from components.train.plan import check_recipe

    recipe = load_recipe(recipe_path)
    check_recipe(recipe, nproc_per_node, source=str(recipe_path))  # every recipe problem before anything starts
    resolutions = recipe.resolutions()
    started = time.time()
    with object_store(Path(store_dir), use_env_store) as endpoint:
        prefix = run_prefix or f"s3://{embedded_store.DEFAULT_BUCKET}/runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        store.ensure_bucket(prefix)
        stages = {
            "ingest": _ingest(url_list, store.join(prefix, "ingest"), demo_limit, recipe),
        }
        stages["preprocess"] = _preprocess(stages["ingest"]["manifest"], store.join(prefix, "train-data"), resolutions,
                                           recipe)
        stages["train"] = _train(recipe_path, stages["preprocess"]["manifest"], store.join(prefix, "train"),
                                 nproc_per_node)
        stages["evaluate"] = _evaluate(stages["train"], stages["ingest"], store.join(prefix, "evaluate"),
                                       demo=url_list is None)
        manifest = write_manifest(
            store.join(prefix, "run.json"),
            "run",
            {
                "recipe": recipe.model_dump(mode="json"),
                "run_prefix": prefix,
                "endpoint": endpoint,
                "stages": stages,
                "duration_s": round(time.time() - started, 2),
            },
        )
        log.info("run manifest committed at %s", store.join(prefix, "run.json"))
        if stages["evaluate"]["status"] == "done":
            # The embedded store stops with the run: keep a copy of the report where a browser can open it.
            local = Path(store_dir).parent / "reports" / prefix.rstrip("/").rsplit("/", 1)[-1]
            local.mkdir(parents=True, exist_ok=True)
            for name in ("report.html", "summary.md", "metrics.json"):
                store.get_file(store.join(prefix, "evaluate", name), local / name)
            manifest["local_report"] = str((local / "report.html").resolve())
    return manifest


def _ingest(url_list: str | None, output: str, demo_limit: int | None, recipe: Recipe) -> dict:
    from components.ingest.ingest import MANIFEST, ingest
    from components.ingest.options import IngestOptions

    started = time.time()
    options = IngestOptions(**DEMO_INGEST) if url_list is None else IngestOptions()
    if url_list is None:
        from components.ingest.demo import ingest_demo

        doc = ingest_demo(output, options, limit=demo_limit, seed=recipe.seed)
    else:
        doc = ingest(url_list, output, options)
    return {"status": "done", "manifest": store.join(output, MANIFEST), "counts": doc["counts"],
            "duration_s": round(time.time() - started, 2)}


def _preprocess(raw_manifest: str, output: str, resolutions: tuple[int, ...], recipe: Recipe) -> dict:
    from components.preprocess.layout import Layout
    from components.preprocess.options import PreprocessOptions
    from components.preprocess.preprocess import preprocess

    started = time.time()
    # min_image_side: the demo's raw images are 64 px; the smallest side a stage trains at is the real floor.
    options = PreprocessOptions(resolutions=resolutions, min_image_side=min(resolutions),
                                min_shards=max(1, recipe.data.workers))
    doc = preprocess(raw_manifest, output, options)
    return {"status": "done", "manifest": Layout(output.rstrip("/")).manifest_uri, "num_samples": doc["num_samples"],
            "rejected": doc["rejected"], "duration_s": round(time.time() - started, 2)}


def _train(recipe_path: str | Path, data_manifest: str, output: str, nproc_per_node: int) -> dict:
    from components.train.cli import launch_local
    from components.train.export import manifest_uri
    from components.train.progress import LOG_NAME, METRICS_NAME

    started = time.time()
    code = launch_local(str(recipe_path), data_manifest, output, nproc_per_node=nproc_per_node)
    if code != 0:
        raise StageError(f"train failed (torchrun exit code {code}); its log is above. Rerunning resumes from the "
                         f"latest checkpoint under {output}")
    metrics = json.loads(store.get_bytes(store.join(output, METRICS_NAME)))
    return {"status": "done", "model": manifest_uri(output), "log": store.join(output, LOG_NAME),
            "samples_seen": metrics["samples_seen"], "stages": metrics["stages"],
            "duration_s": round(time.time() - started, 2)}


def _evaluate(trained: dict, ingested: dict, output: str, demo: bool) -> dict:
    from components.evaluate.benchmark_data import benchmarks_from_heldout
    from components.evaluate.evaluate import evaluate
    from components.train.export import MODEL

    if not demo:
        return {"status": "skipped: no held-out benchmark for a URL list (run clipline evaluate with your datasets)"}
    started = time.time()
    ingest_prefix = ingested["manifest"].rsplit("/", 1)[0]
    benchmarks = benchmarks_from_heldout(ingest_prefix, store.join(output, "datasets"))
    model = read_manifest(trained["model"], MODEL)
    doc = evaluate(model["config"], [b["uri"] for b in benchmarks.values()], output, checkpoint=model["weights"],
                   training_log=trained["log"])
    headline = {name: r["metrics"] for name, r in doc["datasets"].items()}
    for name, metrics in headline.items():
        log.info("evaluate %s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {"status": "done", "report": store.join(output, "report.html"), "metrics": store.join(output, "metrics.json"),
            "results": headline, "duration_s": round(time.time() - started, 2)}


class StageError(RuntimeError):
    """A stage of the local run failed; the message says which and what to do."""
