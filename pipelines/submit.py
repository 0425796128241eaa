"""``clipline compile`` and ``clipline submit``: the compiled pipeline YAML, and runs of it on a KFP server.

Submitting for scheduled retraining (the CronJob in manifests/): ``--url-lists PREFIX`` gathers every URL list under
the prefix into one list for the run (``<run prefix>/url_list.parquet``), so a new list dropped there is trained on
at the next run; ``--skip-if-unchanged`` submits nothing when the set of lists (names, sizes, ETags) is the one of the
last submission, recorded in ``<prefix>/_clipline_submitted.json``. The promote step compares the new model with the
current ``latest`` under ``models_prefix``, so each run's baseline is the previous promoted model.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from components.common import store

log = logging.getLogger("clipline.submit")

COMPILED = Path(__file__).parent / "compiled" / "clip_pretrain.yaml"
URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")
SUBMITTED = "_clipline_submitted.json"


class SubmitError(RuntimeError):
    pass


def compile_pipeline(path: Path = COMPILED, parts: int | None = None) -> Path:
    """Write the pipeline YAML; ``parts``: the fan-out of ingest and preprocess (default: the committed one's)."""
    from kfp import compiler

    from pipelines.pipeline import DEFAULT_PARTS, make_pipeline

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(make_pipeline(parts or DEFAULT_PARTS), str(path))
    return path


def url_lists_under(prefix: str) -> list[dict[str, Any]]:
    """The URL list files under ``prefix`` (by suffix), sorted by URI, with their sizes."""
    found = [{"uri": info.uri, "size": info.size} for info in store.list_objects(prefix.rstrip("/") + "/")
             if info.uri.endswith(URL_LIST_SUFFIXES)]
    return sorted(found, key=lambda item: item["uri"])


def combine_url_lists(lists: list[dict[str, Any]], destination: str) -> int:
    """Concatenate the lists (same columns) into one parquet at ``destination``; returns its row count."""
    import pandas as pd

    frames = []
    with tempfile.TemporaryDirectory(prefix="clipline-url-lists-") as tmp:
        for i, item in enumerate(lists):
            name = item["uri"].rsplit("/", 1)[-1]
            path = Path(tmp) / f"{i}-{name}"
            store.get_file(item["uri"], path)
            if ".parquet" in name:
                frames.append(pd.read_parquet(path))
            elif ".jsonl" in name:
                frames.append(pd.read_json(path, lines=True))
            else:
                frames.append(pd.read_csv(path, sep="\t" if ".tsv" in name else ","))
        columns = [set(f.columns) for f in frames]
        if any(c != columns[0] for c in columns):
            raise SubmitError("the URL lists have different columns: " + "; ".join(
                f"{item['uri']}: {sorted(c)}" for item, c in zip(lists, columns)))
        combined = pd.concat(frames, ignore_index=True)
        out = Path(tmp) / "url_list.parquet"
        combined.to_parquet(out, index=False)
        store.put_file(destination, out)
    return len(combined)


def submit(host: str, *, pipeline: Path = COMPILED, params: dict[str, Any], experiment: str,
           runs_root: str, url_lists: str | None = None, skip_if_unchanged: bool = False) -> dict[str, Any]:
    """Create a run of the compiled pipeline on the KFP server at ``host``; returns what was submitted (or why not)."""
    import kfp

    params = dict(params)
    params.setdefault("run_prefix", f"{runs_root.rstrip('/')}/clip-pretrain-{time.strftime('%Y%m%d-%H%M%S')}")
    record = None
    if url_lists:
        lists = url_lists_under(url_lists)
        if not lists:
            raise SubmitError(f"no URL list ({', '.join(URL_LIST_SUFFIXES)}) under {url_lists}")
        record_uri = store.join(url_lists.rstrip("/"), SUBMITTED)
        if skip_if_unchanged and store.exists(record_uri):
            previous = json.loads(store.get_bytes(record_uri))
            if previous.get("lists") == lists:
                log.info("the URL lists under %s are unchanged since %s: nothing submitted", url_lists,
                         previous.get("run_prefix"))
                return {"submitted": False, "reason": "URL lists unchanged", "lists": lists}
        combined = store.join(params["run_prefix"], "url_list.parquet")
        rows = combine_url_lists(lists, combined)
        params["url_list"] = combined
        record = (record_uri, {"lists": lists, "rows": rows, "run_prefix": params["run_prefix"]})
    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(str(pipeline), arguments=params, experiment_name=experiment,
                                                  run_name=params["run_prefix"].rsplit("/", 1)[-1],
                                                  enable_caching=False)
    if record:  # recorded only once the server accepted the run
        store.put_bytes(record[0], json.dumps({**record[1], "run_id": run.run_id}, indent=2).encode())
    return {"submitted": True, "run_id": run.run_id, "params": params}
