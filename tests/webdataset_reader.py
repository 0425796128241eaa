"""Read shards with webdataset itself, as an independent check on what the stages write (the project reads its tars
with components/common/tars.py). webdataset opens s3:// URLs through the project's store: streaming, retried,
credentials from the environment."""

from __future__ import annotations

from typing import BinaryIO

import webdataset as wds

from components.common import store


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> BinaryIO:
    assert mode == "rb", f"webdataset may only read {url} here"
    return store.open_read(url)


wds.gopen_schemes["s3"] = _gopen_s3


def webdataset_samples(shard_uris: list[str]) -> list[dict]:
    """Every sample of the shards, in order, as webdataset yields them."""
    return list(wds.WebDataset(shard_uris, shardshuffle=False))
