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
from components.common.manifest import write_manifest
from components.common.recipe import load_recipe

log = logging.getLogger("clipline.run")

STAGES = ("ingest", "preprocess", "train", "evaluate")
BUILT: dict[str, object] = {}  # stage name -> callable, filled in as stages land


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block and restore the previous values afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def object_store(store_dir: Path, use_env: bool) -> Iterator[str]:
    """The store a run writes to: the one in the environment, or an embedded server for the run's duration."""
    if use_env:
        store.S3Settings.from_env()  # fail early, naming the missing variables
        yield os.environ["AWS_ENDPOINT_URL"]
        return
    with embedded_store.running(store_dir) as server, environment(server.env()):
        log.info("embedded S3 store at %s (data in %s)", server.endpoint, server.state_dir)
        yield server.endpoint


def run_local(
    recipe_path: str | Path,
    *,
    run_prefix: str | None = None,
    store_dir: str | Path = ".clipline/store",
    use_env_store: bool = False,
) -> dict:
    """Validate the recipe, then run every built stage in order; returns the run manifest."""
    recipe = load_recipe(recipe_path)
    started = time.time()
    with object_store(Path(store_dir), use_env_store) as endpoint:
        prefix = run_prefix or f"s3://{embedded_store.DEFAULT_BUCKET}/runs/{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        store.ensure_bucket(prefix)
        stages = {}
        for name in STAGES:
            if name not in BUILT:
                log.warning("stage %s: not built yet, skipped", name)
                stages[name] = {"status": "not built"}
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
