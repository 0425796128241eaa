"""Read a URL list (parquet, csv, tsv or jsonl; local, file:// or s3://) into the one table img2dataset is given.

Normalising here, rather than letting img2dataset parse each format, gives one code path, errors that name the file
and the column, and a content hash that tells a resumed run whether the list it resumes is the same list.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from components.common import store
from components.ingest.options import IngestOptions, InputFormat

URL, CAPTION = "url", "caption"  # the column names img2dataset is given
_SUFFIXES: dict[str, InputFormat] = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


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
    """Fetch the list (s3:// through the store), check its columns and write the normalised parquet under scratch."""
    fmt = options.input_format or infer_format(uri)
    local = _fetch(uri, scratch)
    wanted = [options.url_col, options.caption_col, *options.extra_columns]
    table = _read(local, fmt, uri, wanted)
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise UrlListError(
            f"URL list {uri} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(repr, table.columns))} (set url_col / caption_col / extra_columns to match)"
        )
    if table.empty:
        raise UrlListError(f"URL list {uri} has no rows")
    table = table[wanted].rename(columns={options.url_col: URL, options.caption_col: CAPTION})
    # A missing caption becomes "" (as img2dataset writes it); numbers and other scalars become their text.
    for col in table.columns:
        table[col] = table[col].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    table = table.reset_index(drop=True)
    out = scratch / "url_list.parquet"
    table.to_parquet(out, index=False)
    digest = hashlib.sha256(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    digest.update("\0".join(table.columns).encode())
    return UrlList(path=out, rows=len(table), sha256=digest.hexdigest())


def _fetch(uri: str, scratch: Path) -> Path:
    if uri.startswith("s3://"):
        local = scratch / ("source-" + Path(store.split_s3(uri)[1]).name)
        store.get_file(uri, local)
        return local
    local = store.local_path(uri)
    if not local.is_file():
        raise UrlListError(f"URL list {uri} does not exist")
    return local


def _read(path: Path, fmt: InputFormat, uri: str, wanted: list[str]) -> pd.DataFrame:
    try:
        if fmt == "parquet":
            present = set(pq.read_schema(path).names)
            return pd.read_parquet(path, columns=[c for c in wanted if c in present] or None)
        if fmt in ("csv", "tsv"):
            # dtype=str with keep_default_na=False keeps captions such as "NA" or "null" as written.
            return pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False)
        return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise UrlListError(f"cannot read URL list {uri} as {fmt}: {exc}") from None


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
