"""Run the pipeline on one machine: the same KFP pipeline as on the cluster (``pipelines/pipeline.py``), run by kfp's
local SubprocessRunner against an embedded S3 store (or the one in the environment), with the train step running
torchrun here instead of submitting a PyTorchJob.

The run manifest ``<run prefix>/run.json`` records every step's output manifest and timings.
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
from components.common.manifest import write_manifest
from components.common.recipe import load_recipe

log = logging.getLogger("clipline.run")

# The pipeline's steps and the output artifact (a JSON manifest) each one hands on.
STEP_OUTPUTS = {"ingest": "raw", "preprocess": "train_data", "train": "model", "evaluate": "evaluation"}


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
    demo_limit: int | None = 3000,
    run_prefix: str | None = None,
    models_prefix: str | None = None,
    store_dir: str | Path = ".clipline/store",
    use_env_store: bool = False,
    nproc_per_node: int = 1,
    parts: int = 1,
    allow_networks: tuple[str, ...] = (),
) -> dict:
    """Validate the recipe, then run the pipeline (the demo source when no URL list is given); returns the run
    manifest, with ``local_report`` (a copy of the HTML report on this machine) added."""
    from kfp import local

    from components.train.plan import check_recipe
    from pipelines.pipeline import make_pipeline
    from pipelines.steps import DEMO_SOURCE

    recipe = load_recipe(recipe_path)
    check_recipe(recipe, nproc_per_node, source=str(recipe_path))  # every recipe problem before anything starts
    started = time.time()
    state_root = Path(store_dir).parent
    with object_store(Path(store_dir), use_env_store) as endpoint:
        prefix = (run_prefix or f"s3://{embedded_store.DEFAULT_BUCKET}/runs/{recipe.name}-"
                                 f"{time.strftime('%Y%m%d-%H%M%S')}").rstrip("/")
        models = models_prefix or f"{prefix.split('/runs/')[0] if '/runs/' in prefix else prefix}/models"
        store.ensure_bucket(prefix)
        if url_list:
            url_list = _resolved_url_lists(url_list)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(state_root / "kfp-root"),
                   raise_on_error=True)
        run = make_pipeline(parts)(run_prefix=prefix, url_list=url_list or DEMO_SOURCE,
                            recipe=str(Path(recipe_path).resolve()), demo_limit=demo_limit or 0,
                            seed=recipe.seed, gpus_per_node=nproc_per_node, launcher="local", models_prefix=models,
                            allow_networks=",".join(allow_networks))
        stages = _stage_manifests(run)
        manifest = write_manifest(store.join(prefix, "run.json"), "run", {
            "recipe": recipe.document(),
            "run_prefix": prefix,
            "models_prefix": models,
            "endpoint": endpoint,
            "stages": stages,
            "duration_s": round(time.time() - started, 2),
        })
        log.info("run manifest committed at %s", store.join(prefix, "run.json"))
        # The embedded store stops with the run: keep a copy of the report where a browser can open it.
        local_dir = state_root / "reports" / prefix.rsplit("/", 1)[-1]
        local_dir.mkdir(parents=True, exist_ok=True)
        for name in ("report.html", "summary.md", "metrics.json"):
            store.get_file(store.join(prefix, "evaluate", name), local_dir / name)
        manifest["local_report"] = str((local_dir / "report.html").resolve())
    return manifest


def _resolved_url_lists(url_list: str) -> str:
    """The URL list(s) with local paths made absolute (the steps run in other processes), each checked to exist: one
    list, comma-separated lists, or a directory/prefix ending in "/" (gathered by the pipeline's first step)."""
    from components.ingest.gather import url_lists_under
    from pipelines.steps import StepError

    out = []
    for item in filter(None, (part.strip() for part in url_list.split(","))):
        if "://" not in item:
            item = str(Path(item).resolve()) + ("/" if item.endswith("/") else "")
        if item.endswith("/"):
            if not url_lists_under(item):
                raise StepError(f"no URL list under {item}")
        elif not store.exists(item if "://" in item else Path(item).as_uri()):
            raise StepError(f"the URL list {item} does not exist")
        out.append(item)
    if not out:
        raise StepError(f"--url-list {url_list!r} names no URL list")
    return ",".join(out)


def _stage_manifests(run) -> dict:
    """Every step's output manifest, read from the artifacts the local runner wrote, and the promotion decision."""
    stages = {name: json.loads(Path(run.outputs[artifact].path).read_text())
              for name, artifact in STEP_OUTPUTS.items()}
    stages["promote"] = {"status": "done", "promoted": bool(run.outputs["promoted"])}
    return stages
