"""Run the pipeline on one machine: the same stages as on Kubeflow, against an embedded S3 store.

Stages are added here as they are built; a stage that does not exist yet is reported as such in the run manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from components.common import embedded_store, store
from components.common.env import temporarily_set
from components.common.manifest import write_manifest
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
) -> dict:
    """Validate the recipe, then run the stages in order (the demo source when no URL list is given); returns the run
    manifest. Stages that are not built yet are recorded as such."""
    recipe = load_recipe(recipe_path)
    resolutions = recipe.resolutions()  # also checks the model name before anything starts
    started = time.time()
    with object_store(Path(store_dir), use_env_store) as endpoint:
        prefix = run_prefix or f"s3://{embedded_store.DEFAULT_BUCKET}/runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        store.ensure_bucket(prefix)
        stages = {
            "ingest": _ingest(url_list, store.join(prefix, "ingest"), demo_limit, recipe),
        }
        stages["preprocess"] = _preprocess(stages["ingest"]["manifest"], store.join(prefix, "train-data"), resolutions,
                                           recipe)
        log.warning("stage train: not built yet, skipped; evaluate needs its model, skipped too")
        stages["train"] = {"status": "not built"}
        stages["evaluate"] = {"status": "skipped: no trained model"}
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
