"""Ingest end to end: real img2dataset, a real loopback HTTP server, the real SeaweedFS store (no mocks)."""

from __future__ import annotations

import argparse
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image
from webdataset_reader import webdataset_samples

from components.common import store
from components.common.datasets import RAW_SHARDS
from components.common.manifest import read_manifest
from components.ingest import cli as ingest_cli
from components.ingest.counts import bomb_reason
from components.ingest.http_server import QuietFileHandler, serve_directory
from components.ingest.ingest import MANIFEST, IngestError, ingest
from components.ingest.options import IngestOptions
from components.ingest.shard_committer import ShardCommitter
from components.ingest.url_list import UrlListError, infer_format, load_url_list

SLOW_S = 6.0  # the slow endpoint answers after this; the timeout option is 2 s (generous for a loaded CI machine)
REFUSED = "<urlopen error [Errno 111] Connection refused>"
NOT_FOUND = "HTTP Error 404: File not found"
UNDECODABLE = "Image decoding error"


class SlowHandler(QuietFileHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            self.server.count(self.path)
            time.sleep(SLOW_S)
            self.send_error(500)
            return
        super().do_GET()


def _png_bomb(side: int) -> bytes:
    """A valid 1-bit PNG of side x side pixels, all zero: a few kB that decode to side**2 pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + side // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    img = Image.effect_noise(size, 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A loopback site with good images and every kind of bad URL, plus the captions the good ones must keep."""
    root = tmp_path_factory.mktemp("site")
    good = {}
    for i in range(7):
        name = f"good/{i}.jpg"
        (root / "good").mkdir(exist_ok=True)
        (root / name).write_bytes(_jpeg((48 + 8 * i, 40 + 4 * i), i))
        good[name] = f"picture number {i}"
    (root / "page.jpg").write_bytes(b"<html><body>not an image</body></html>")
    whole = _jpeg((200, 160), 99)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) * 6 // 10])
    (root / "bomb.png").write_bytes(_png_bomb(20_000))
    with serve_directory(root, handler=SlowHandler) as server:
        rows = [(server.url(name), caption) for name, caption in good.items()]
        bad = [
            (f"http://127.0.0.1:{_refused_port()}/gone.jpg", "dead host"),
            (server.url("missing/1.jpg"), "not found 1"),
            (server.url("missing/2.jpg"), "not found 2"),
            (server.url("page.jpg"), "html page"),
            (server.url("truncated.jpg"), "cut short"),
            (server.url("bomb.png"), "bomb"),
            (server.url("slow/1.jpg"), "too slow"),
        ]
        # Interleave so every shard mixes good and bad URLs.
        mixed = [r for pair in zip(rows, bad, strict=True) for r in pair]
        yield server, pd.DataFrame(mixed, columns=["url", "caption"]), good


def _options(**kw) -> IngestOptions:
    # the site is on loopback, which ingest refuses unless allowed (tests/test_ingest_security.py)
    base = dict(image_size=32, number_sample_per_shard=5, processes=1, threads=8, timeout=2,
                allow_networks=("127.0.0.1/32",))
    return IngestOptions(**{**base, **kw})


def _samples(shard_uris: list[str]) -> list[dict]:
    return webdataset_samples(shard_uris)


@pytest.mark.slow
def test_ingest_counts_every_failure_exactly(site, s3_prefix, tmp_path):
    server, table, good = site
    url_list = tmp_path / "urls.parquet"
    table.to_parquet(url_list)

    doc = ingest(str(url_list), s3_prefix, _options())

    assert doc == read_manifest(store.join(s3_prefix, MANIFEST), RAW_SHARDS)
    assert doc["counts"] == {
        "total": 14,
        "success": 7,
        "failed": {
            UNDECODABLE: 2,  # the HTML page and the truncated JPEG
            NOT_FOUND: 2,
            REFUSED: 1,
            bomb_reason(IngestOptions().max_image_pixels): 1,
            "timed out": 1,
        },
    }
    assert [s["uri"].rsplit("/", 1)[1] for s in doc["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sum(s["samples"] for s in doc["shards"]) == 7
    assert doc["success_rate"] == 0.5 and doc["images_per_s"] > 0
    for shard in doc["shards"]:  # img2dataset's per-shard files sit next to each tar
        assert store.exists(shard["uri"].replace(".tar", ".parquet"))
        assert store.exists(shard["uri"].replace(".tar", "_stats.json"))

    samples = _samples([s["uri"] for s in doc["shards"]])
    by_url = {json.loads(s["json"])["url"]: s for s in samples}
    assert set(by_url) == {server.url(name) for name in good}
    for name, caption in good.items():
        sample = by_url[server.url(name)]
        assert sample["txt"].decode() == caption
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert img.format == "JPEG" and img.size == (32, 32)


@pytest.mark.slow
def test_success_rate_below_threshold_fails_without_manifest(site, s3_prefix, tmp_path):
    server, table, _ = site
    url_list = tmp_path / "urls.csv"
    table[table["caption"].isin(["not found 1", "not found 2", "html page", "picture number 0"])].to_csv(
        url_list, index=False
    )
    with pytest.raises(IngestError) as err:
        ingest(str(url_list), s3_prefix, _options(min_success_rate=0.5))
    message = str(err.value)
    assert "success rate 25.0% (1 of 4 URLs)" in message
    assert "min_success_rate 50.0%" in message
    assert repr(NOT_FOUND) in message and repr(UNDECODABLE) in message
    assert not store.exists(store.join(s3_prefix, MANIFEST))


@pytest.mark.slow
def test_rerun_resumes_only_uncommitted_shards(site, s3_prefix, tmp_path):
    server, table, good = site
    urls = table[~table["caption"].isin(["too slow", "dead host"])].reset_index(drop=True)  # 12 rows, 3 shards
    url_list = tmp_path / "urls.parquet"
    urls.to_parquet(url_list)
    first = ingest(str(url_list), s3_prefix, _options(number_sample_per_shard=4))
    assert first["resumed_shards"] == 0

    # Lose shard 1 (as if the first run had died while writing it): a rerun must fetch only its 4 URLs again.
    lost = first["shards"][1]["uri"]
    for suffix in (".tar", ".parquet", "_stats.json"):
        store.delete(lost.replace(".tar", suffix))
    before = server.requests()
    second = ingest(str(url_list), s3_prefix, _options(number_sample_per_shard=4))
    fetched = server.requests() - before

    shard1_paths = {u.removeprefix(server.base_url) for u in urls["url"][4:8]}
    assert set(fetched) == shard1_paths and all(n == 1 for n in fetched.values())
    assert second["resumed_shards"] == 2
    assert second["counts"] == first["counts"]
    assert second["shards"] == first["shards"]

    # A third run with everything committed downloads nothing and rewrites the same manifest.
    before = server.requests()
    third = ingest(str(url_list), s3_prefix, _options(number_sample_per_shard=4))
    assert server.requests() == before
    assert third["counts"] == first["counts"] and third["resumed_shards"] == 3


def test_resume_refuses_different_options(site, s3_prefix, tmp_path):
    _, table, _ = site
    url_list = tmp_path / "urls.parquet"
    table.head(1).to_parquet(url_list)
    store.put_bytes(store.join(s3_prefix, "ingest-state.json"), json.dumps({"rows": 1, "image_size": 64}).encode())
    store.put_bytes(store.join(s3_prefix, MANIFEST), b"{}")
    with pytest.raises(IngestError, match=r"image_size: 64 -> 32"):
        ingest(str(url_list), s3_prefix, _options())
    assert store.exists(store.join(s3_prefix, MANIFEST))  # a refused rerun leaves the earlier result alone


@pytest.mark.slow
def test_s3_tsv_url_list_with_custom_columns(site, s3_prefix, tmp_path):
    server, table, good = site
    renamed = table.head(4).rename(columns={"url": "image_link", "caption": "alt text"})
    renamed["label"] = [f"L{i}" for i in range(4)]
    local = tmp_path / "links.tsv"
    renamed.to_csv(local, sep="\t", index=False)
    remote = store.join(s3_prefix, "input/links.tsv")
    store.put_file(remote, local)

    options = _options(url_col="image_link", caption_col="alt text", extra_columns=("label",), min_success_rate=0.0)
    doc = ingest(remote, store.join(s3_prefix, "out"), options)

    assert doc["counts"]["total"] == 4 and doc["counts"]["success"] == 2
    samples = _samples([s["uri"] for s in doc["shards"]])
    metas = [json.loads(s["json"]) for s in samples]
    assert [(m["caption"], m["label"]) for m in sorted(metas, key=lambda m: m["label"])] == [
        ("picture number 0", "L0"), ("picture number 1", "L2"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# URL list formats (no download)

ROWS = pd.DataFrame({"link": ["http://a/1.jpg", "http://a/2.jpg"], "text": ["one", None], "tag": [1, 2]})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "csv.gz", "jsonl.gz"])
def test_every_format_gives_the_same_table(fmt, tmp_path):
    path = tmp_path / f"list.{fmt}"
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        ROWS.to_parquet(path)
    elif base == "jsonl":
        ROWS.to_json(path, orient="records", lines=True)
    else:
        ROWS.to_csv(path, sep="," if base == "csv" else "\t", index=False)
    assert infer_format(path.name) == base
    options = IngestOptions(url_col="link", caption_col="text", extra_columns=("tag",))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    loaded = load_url_list(str(path), options, scratch)
    table = pd.read_parquet(loaded.path)
    assert table.to_dict("list") == {"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["one", ""],
                                     "tag": ["1", "2"]}
    reference = tmp_path / "ref.parquet"
    ROWS.to_parquet(reference)
    assert loaded.sha256 == load_url_list(str(reference), options, scratch).sha256


def test_url_list_errors_name_the_problem(tmp_path):
    path = tmp_path / "list.csv"
    ROWS.to_csv(path, index=False)
    with pytest.raises(UrlListError, match=r"no column 'url'.*'link', 'text', 'tag'"):
        load_url_list(str(path), IngestOptions(caption_col="text"), tmp_path)
    with pytest.raises(UrlListError, match=r"cannot tell the format of URL list 'list.xlsx'"):
        infer_format("list.xlsx")
    with pytest.raises(UrlListError, match=r"does not exist"):
        load_url_list(str(tmp_path / "nope.csv"), IngestOptions(), tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("url,caption\n")
    with pytest.raises(UrlListError, match=r"has no rows"):
        load_url_list(str(empty), IngestOptions(), tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Shard commits (no download)


def _fake_shard(local: Path, shard_id: int, images: int, reported: int, stats_text: str | None = None) -> None:
    name = f"{shard_id:05d}"
    with wds.TarWriter(str(local / f"{name}.tar")) as tar:
        for i in range(images):
            tar.write({"__key__": f"{name}{i:04d}", "jpg": _jpeg((16, 16), i), "txt": "x", "json": "{}"})
    (local / f"{name}.parquet").write_bytes(b"parquet")
    stats = {"count": images + 1, "successes": reported, "status_dict": {"success": reported, "HTTP Error 404": 1}}
    (local / f"{name}_stats.json").write_text(stats_text if stats_text is not None else json.dumps(stats))


def test_committer_publishes_finished_shards_and_frees_scratch(any_prefix, tmp_path):
    local = tmp_path / "scratch"
    local.mkdir()
    shards_uri = store.join(any_prefix, "shards")
    committer = ShardCommitter(local, shards_uri, skip=set(), total_shards=3, poll_s=3600)  # sweeps driven here
    committer.start()
    _fake_shard(local, 0, images=2, reported=2)
    _fake_shard(local, 1, images=2, reported=2, stats_text='{"count": 3, "succe')  # still being written
    _fake_shard(local, 2, images=2, reported=3)  # stats and tar disagree

    committer.sweep(final=False)
    assert sorted(committer.committed) == [0] and 2 in committer.rejected
    assert sorted(p.name for p in local.iterdir()) == ["00000_stats.json", "00001.parquet", "00001.tar",
                                                       "00001_stats.json", "00002_stats.json"]
    assert [o.uri.rsplit("/", 1)[1] for o in store.list_objects(shards_uri + "/")] == [
        "00000.parquet", "00000.tar", "00000_stats.json"]

    _fake_shard(local, 1, images=2, reported=2)  # img2dataset finished writing it
    assert sorted(committer.finish()) == [0, 1]
    assert "its tar holds 2 images but its stats report 3" in committer.rejected[2]
    assert not list(local.glob("*.tar")) and not store.exists(store.join(shards_uri, "00002.tar"))


# ---------------------------------------------------------------------------------------------------------------
# Command line (no download)


def _parse(*argv: str):
    parser = argparse.ArgumentParser()
    ingest_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_override_the_config_file(tmp_path):
    config = tmp_path / "ingest.yaml"
    config.write_text("image_size: 128\nthreads: 4\nurl_col: link\n")
    args = _parse("urls.csv", "-o", "s3://b/p", "--config", str(config), "--image-size", "64", "--shard-size", "500",
                  "--extra-col", "label", "--extra-col", "source", "--no-incremental", "--resize-mode", "keep_ratio")
    options = ingest_cli.options_from_args(args)
    assert (options.image_size, options.threads, options.url_col) == (64, 4, "link")
    assert options.number_sample_per_shard == 500 and options.extra_columns == ("label", "source")
    assert options.incremental is False and options.resize_mode == "keep_ratio"
    assert ingest_cli.options_from_args(_parse("u.csv", "-o", "x")) == IngestOptions()


def test_cli_reports_a_bad_url_list_without_a_traceback(tmp_path, capsys):
    assert ingest_cli.run(_parse(str(tmp_path / "missing.csv"), "-o", (tmp_path / "out").as_uri())) == 1
    assert "missing.csv does not exist" in capsys.readouterr().err
    assert ingest_cli.run(_parse("-o", "s3://b/p")) == 2  # neither a URL list nor --demo
    assert ingest_cli.run(_parse("--demo", "--demo-limit", "0", "-o", "s3://b/p")) == 2
