"""Several URL lists into one, for a run: the pipeline's first step (``pipelines/steps.gather_url_lists_step``).

Lists are streamed batch by batch (csv/tsv/jsonl straight from the store, parquet row group by row group from a
local copy), every value as text exactly as written (a caption "NA" or "null" stays that text; csv and tsv are read
with no null markers, as ``url_list.load_url_list`` reads a single list), and the output parquet is written
incrementally: memory holds one batch, disk the output plus one parquet input, so lists of any size fit a small pod.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from components.common import store

log = logging.getLogger(__name__)


class GatherError(ValueError):
    """URL lists that cannot be gathered; the message names the lists."""



URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")
GATHERED = "url_list.parquet"  # under the run prefix
GATHER_BATCH_ROWS = 65_536  # rows read, converted and written at a time (one parquet row group each)


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
           batch_rows: int = GATHER_BATCH_ROWS) -> dict[str, Any]:
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
                for batch in _url_list_batches(uri, os.path.join(tmp, f"input-{i}"), batch_rows):
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


def _text(value: Any) -> str | None:
    """A URL-list value as text, the way ingest turns a single list's values into text (components/ingest/
    url_list.py); a missing value stays missing (ingest makes it "")."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _as_text_batch(batch):
    """Every column of a pyarrow RecordBatch as string."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays = []
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind = column.dictionary_decode(), kind.value_type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            arrays.append(pc.cast(column, pa.string()))
        else:  # numbers, booleans, ... as Python writes them (1.0 -> "1.0", True -> "True"), as ingest does
            arrays.append(pa.array([_text(v) for v in column.to_pylist()], type=pa.string()))
    return pa.record_batch(arrays, names=batch.schema.names)


def _url_list_batches(uri: str, local: str, batch_rows: int):
    """The list's rows as RecordBatches of string columns (see ``gather_url_lists_step``)."""
    import csv
    import gzip

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from components.ingest.url_list import UrlListError, infer_format

    try:
        fmt = infer_format(uri.rsplit("/", 1)[-1])
    except UrlListError as exc:
        raise GatherError(str(exc)) from None
    gz = uri.endswith(".gz")
    try:
        if fmt == "parquet":
            store.get_file(uri, local)  # parquet needs random access (the footer first)
            try:
                for batch in pq.ParquetFile(local).iter_batches(batch_size=batch_rows):
                    yield _as_text_batch(batch)
            finally:
                os.unlink(local)
        elif fmt in ("csv", "tsv"):
            delimiter = "," if fmt == "csv" else "\t"
            with store.open_read(uri) as raw:  # the header, to read every column as text
                head = gzip.GzipFile(fileobj=raw) if gz else raw
                header = next(csv.reader([head.readline().decode("utf-8-sig").rstrip("\r\n")],
                                         delimiter=delimiter), [])
            if not header:
                return
            with store.open_read(uri) as raw:
                source = gzip.GzipFile(fileobj=raw) if gz else raw
                reader = pacsv.open_csv(
                    source, read_options=pacsv.ReadOptions(block_size=16 << 20),
                    parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                    convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                                         null_values=[], strings_can_be_null=False,
                                                         quoted_strings_can_be_null=False))
                for batch in reader:
                    yield _as_text_batch(batch)
        else:  # jsonl: one object per line; values as text
            with store.open_read(uri) as raw:
                source = gzip.GzipFile(fileobj=raw) if gz else raw
                names: list[str] | None = None
                rows: list[dict] = []
                for number, line in enumerate(source, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise GatherError(f"URL list {uri} line {number}: not a JSON object")
                    if names is None:
                        names = list(row)
                    elif set(row) - set(names):
                        raise GatherError(f"URL list {uri} line {number}: columns {sorted(set(row) - set(names))} "
                                        f"are not in its first line's {names}")
                    rows.append(row)
                    if len(rows) == batch_rows:
                        yield _jsonl_batch(rows, names)
                        rows = []
                if rows:
                    yield _jsonl_batch(rows, names)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise GatherError(f"cannot read URL list {uri} as {fmt}{' (gzip)' if gz else ''}: {exc}") from None


def _jsonl_batch(rows: list[dict], names: list[str]):
    import pyarrow as pa

    return pa.record_batch([pa.array([_text(row.get(name)) for row in rows], type=pa.string()) for name in names],
                           names=names)
