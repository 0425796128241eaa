"""Read a URL list (parquet, csv, tsv or jsonl; csv, tsv and jsonl may be gzipped; local, file:// or s3://).

One reader, ``read_batches``, streams any list as batches of text columns, every value exactly as written (a caption
"NA" or "null" stays that text: csv and tsv are read with no null markers); ``gather`` concatenates lists with it,
and ``load_url_list`` normalises one list into the table img2dataset is given. Normalising here, rather than letting
img2dataset parse each format, gives one code path, errors that name the file and the column, and a content hash
that tells a resumed run whether the list it resumes is the same list.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from components.common import store
from components.ingest.options import IngestOptions, InputFormat

URL, CAPTION = "url", "caption"  # the column names img2dataset is given
_SUFFIXES: dict[str, InputFormat] = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
BATCH_ROWS = 65_536  # rows read and converted at a time (one parquet row group when gathered)


class UrlListError(ValueError):
    pass


@dataclass(frozen=True)
class UrlList:
    path: Path  # the normalised parquet: url, caption, then the extra columns
    rows: int
    sha256: str  # of the normalised content; the same list gives the same hash in any format


def infer_format(name: str) -> InputFormat:
    """The format from a file name, ignoring a trailing .gz (csv, tsv and jsonl may be gzipped)."""
    gzipped = name.endswith(".gz")
    stem = name[:-3] if gzipped else name
    fmt = next((f for suffix, f in _SUFFIXES.items() if stem.endswith(suffix)), None)
    if fmt is not None and not (gzipped and fmt == "parquet"):
        return fmt
    raise UrlListError(
        f"cannot tell the format of URL list {name!r} from its name; name it *.parquet, *.csv, *.tsv or *.jsonl "
        "(csv, tsv and jsonl may end in .gz) or set input_format"
    )


def load_url_list(uri: str, options: IngestOptions, scratch: Path) -> UrlList:
    """Read the list (s3:// through the store), check its columns and write the normalised parquet under scratch."""
    fmt = options.input_format or infer_format(uri)
    if not store.exists(uri):
        raise UrlListError(f"URL list {uri} does not exist")
    batches = list(read_batches(uri, str(scratch / "source"), fmt=fmt))
    if not sum(batch.num_rows for batch in batches):
        raise UrlListError(f"URL list {uri} has no rows")
    table = pa.Table.from_batches(batches).to_pandas()
    wanted = [options.url_col, options.caption_col, *options.extra_columns]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise UrlListError(
            f"URL list {uri} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, table.columns))} (set url_col / caption_col / extra_columns to match)"
        )
    table = table[wanted].rename(columns={options.url_col: URL, options.caption_col: CAPTION})
    table = table.fillna("").reset_index(drop=True)  # a missing caption becomes "", as img2dataset writes it
    out = scratch / "url_list.parquet"
    table.to_parquet(out, index=False)
    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    digest.update("\0".join(table.columns).encode())
    return UrlList(path=out, rows=len(table), sha256=digest.hexdigest())


def read_batches(uri: str, local: str, *, fmt: InputFormat | None = None,
                 batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """The list's rows as RecordBatches of string columns; a missing value is null. csv, tsv and jsonl stream from
    the store; parquet, which needs random access (its footer first), is copied to ``local`` and read row group by
    row group. ``fmt``: the format (default: from the name); ``batch_rows``: rows per batch (default BATCH_ROWS)."""
    fmt = fmt or infer_format(uri.rsplit("/", 1)[-1])
    batch_rows = batch_rows or BATCH_ROWS
    gz = uri.endswith(".gz")
    try:
        if fmt == "parquet":
            store.get_file(uri, local)
            try:
                for batch in pq.ParquetFile(local).iter_batches(batch_size=batch_rows):
                    yield _as_text_batch(batch)
            finally:
                os.unlink(local)
        elif fmt in ("csv", "tsv"):
            yield from _delimited_batches(uri, "," if fmt == "csv" else "\t", gz)
        else:
            yield from _jsonl_batches(uri, gz, batch_rows)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        if isinstance(exc, UrlListError):
            raise
        raise UrlListError(f"cannot read URL list {uri} as {fmt}{' (gzip)' if gz else ''}: {exc}") from None


def _open(uri: str, gz: bool):
    raw = store.open_read(uri)
    return gzip.GzipFile(fileobj=raw) if gz else raw


def _delimited_batches(uri: str, delimiter: str, gz: bool) -> Iterator[pa.RecordBatch]:
    with _open(uri, gz) as head:  # the header, to read every column as text
        header = next(csv.reader([head.readline().decode("utf-8-sig").rstrip("\r\n")], delimiter=delimiter), [])
    if not header:
        return
    with _open(uri, gz) as source:
        reader = pacsv.open_csv(
            source, read_options=pacsv.ReadOptions(block_size=16 << 20),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                                 null_values=[], strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
        for batch in reader:
            yield _as_text_batch(batch)


def _jsonl_batches(uri: str, gz: bool, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """One object per line; the first line names the columns, a later line may leave some out but add none."""
    with _open(uri, gz) as source:
        names: list[str] | None = None
        rows: list[dict] = []
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise UrlListError(f"URL list {uri} line {number}: not a JSON object")
            if names is None:
                names = list(row)
            elif set(row) - set(names):
                raise UrlListError(f"URL list {uri} line {number}: columns {sorted(set(row) - set(names))} are not "
                                   f"in its first line's {names}")
            rows.append(row)
            if len(rows) == batch_rows:
                yield _rows_batch(rows, names)
                rows = []
        if rows:
            yield _rows_batch(rows, names)


def _rows_batch(rows: list[dict], names: list[str]) -> pa.RecordBatch:
    return pa.record_batch([pa.array([_text(row.get(name)) for row in rows], type=pa.string()) for name in names],
                           names=names)


def _as_text_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Every column of a RecordBatch as string."""
    arrays = []
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind = column.dictionary_decode(), kind.value_type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            arrays.append(pc.cast(column, pa.string()))
        else:  # numbers, booleans, ... as Python writes them (1 -> "1", 1.0 -> "1.0", True -> "True")
            arrays.append(pa.array([_text(v) for v in column.to_pylist()], type=pa.string()))
    return pa.record_batch(arrays, names=batch.schema.names)


def _text(value: Any) -> str | None:
    """A URL-list value as text; a missing value (None, NaN) stays missing."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def slice_url_list(urls: UrlList, part: int, parts: int) -> UrlList:
    """Rows [part * n // parts, (part + 1) * n // parts) of a normalised list: one of ``parts`` contiguous parts (a
    fan-out of ingest over pods). The parts, in order, are the whole list in order, so the samples keep their order."""
    if not 0 <= part < parts:
        raise UrlListError(f"part {part} is not one of 0..{parts - 1}")
    table = pd.read_parquet(urls.path)
    n = len(table)
    table = table.iloc[part * n // parts:(part + 1) * n // parts].reset_index(drop=True)
    if table.empty:
        raise UrlListError(f"part {part} of {parts} of a {n}-row URL list is empty: use fewer parts")
    out = urls.path.with_name(f"url_list-part{part}-of{parts}.parquet")
    table.to_parquet(out, index=False)
    digest = hashlib.sha256(urls.sha256.encode() + f"/{part}/{parts}".encode())
    return UrlList(path=out, rows=len(table), sha256=digest.hexdigest())
