"""Several URL lists into one, for a run: the pipeline's first step (``pipelines/steps.gather_url_lists_step``).

Lists are streamed batch by batch by the one URL-list reader (``url_list.read_batches``: every value as text exactly
as written), and the output parquet is written incrementally: memory holds one batch, disk the output plus one
parquet input, so lists of any size fit a small pod.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from components.common import store
from components.ingest.url_list import UrlListError, read_batches

log = logging.getLogger(__name__)


class GatherError(ValueError):
    """URL lists that cannot be gathered; the message names the lists."""



URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")
GATHERED = "url_list.parquet"  # under the run prefix


def url_lists_under(prefix: str) -> list[dict[str, Any]]:
    """The URL list files under ``prefix`` (by suffix), sorted by URI, with their sizes."""
    found = [{"uri": info.uri, "size": info.size} for info in store.list_objects(prefix.rstrip("/") + "/")
             if info.uri.endswith(URL_LIST_SUFFIXES)]
    return sorted(found, key=lambda item: item["uri"])


def url_list_uris(url_list: str) -> list[str]:
    """The lists ``url_list`` names: comma-separated URIs, each of which may be a prefix ending in "/" (every list
    under it, by suffix, in URI order)."""
    uris: list[str] = []
    for item in (part.strip() for part in url_list.split(",")):
        if not item:
            continue
        if item.endswith("/"):
            under = [found["uri"] for found in url_lists_under(item)]
            if not under:
                raise GatherError(f"no URL list ({', '.join(URL_LIST_SUFFIXES)}) under {item}")
            uris += under
        else:
            uris.append(item)
    if not uris:
        raise GatherError(f"url_list {url_list!r} names no URL list")
    return uris


def gather(url_list: str, run_prefix: str, *, scratch: str | None = None,
           batch_rows: int | None = None) -> dict[str, Any]:
    """The URL list ingest reads: a single list passes through untouched; several lists (comma-separated URIs, or a
    prefix ending in "/") are concatenated in order into ``<run>/url_list.parquet``. Every list must have the same
    columns (in any order); the first list's order is kept. ``scratch``: where the output is built (default:
    $CLIPLINE_SCRATCH when it exists, the pipeline's emptyDir, else the system temp directory)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.time()
    uris = url_list_uris(url_list)
    if len(uris) == 1:  # one list (or a prefix holding one): ingest reads it where it is
        return {"status": "done", "url_list": uris[0], "lists": uris, "gathered": False}
    scratch = scratch or os.environ.get("CLIPLINE_SCRATCH")
    if scratch and not os.path.isdir(scratch):
        scratch = None
    destination = store.join(run_prefix, GATHERED)
    columns: list[str] | None = None
    first = uris[0]
    rows_per_list: list[int] = []
    with tempfile.TemporaryDirectory(prefix="clipline-gather-", dir=scratch) as tmp:
        out = os.path.join(tmp, GATHERED)
        writer = None
        try:
            for i, uri in enumerate(uris):
                rows = 0
                for batch in _batches(uri, os.path.join(tmp, f"input-{i}"), batch_rows):
                    if columns is None:
                        columns = list(batch.schema.names)
                        schema = pa.schema([(name, pa.string()) for name in columns])
                        writer = pq.ParquetWriter(out, schema)
                    if set(batch.schema.names) != set(columns) or len(batch.schema.names) != len(columns):
                        raise GatherError(
                            f"the URL lists have different columns: {first} has {columns}, {uri} has "
                            f"{list(batch.schema.names)}; every list to gather needs the same columns")
                    writer.write_batch(pa.record_batch([batch.column(name) for name in columns], schema=schema))
                    rows += batch.num_rows
                rows_per_list.append(rows)
                log.info("gathered %s: %d rows", uri, rows)
        finally:
            if writer is not None:
                writer.close()
        total = sum(rows_per_list)
        if not total:
            raise GatherError(f"the URL lists {', '.join(uris)} have no rows")
        store.ensure_bucket(destination)
        store.put_file(destination, out)
    log.info("gathered %d URL lists (%d rows) into %s", len(uris), total, destination)
    return {"status": "done", "url_list": destination, "lists": uris, "rows": rows_per_list, "gathered": True,
            "columns": columns, "duration_s": round(time.time() - started, 2)}


def _batches(uri: str, local: str, batch_rows: int | None):
    try:
        yield from read_batches(uri, local, batch_rows=batch_rows)
    except UrlListError as exc:
        raise GatherError(str(exc)) from None
