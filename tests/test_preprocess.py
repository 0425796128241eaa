"""Preprocess: real img2dataset-format tars in, training shards out, through the real S3 server (and file://)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.common import datasets, store
from components.common.manifest import write_manifest
from components.common.tars import read_samples
from components.preprocess import filters, nltk_data, plan, reshard
from components.preprocess.errors import PreprocessError
from components.preprocess.options import PreprocessOptions
from components.preprocess.preprocess import preprocess
from components.preprocess.syntax_mask import caption_pos
from components.train.text_masks import syntax_masked_text


@pytest.fixture(scope="module", autouse=True)
def nltk_ready():
    nltk_data.build()  # what `make install` runs; a no-op when the data is there


# ----------------------------------------------------------------------------------------------------------------
# Raw input: img2dataset's webdataset layout, written here so these tests do not depend on the ingest stage.


def _image(seed: int, size: tuple[int, int], fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format=fmt)
    return buf.getvalue()


def _raw_tar(path: Path, shard: int, samples: list[dict]) -> None:
    """img2dataset's naming: key = 10**ceil(log10(shard_size)) * shard + i, 9 digits; .jpg, .txt, .json members."""
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(samples):
            key = f"{100 * shard + i:09d}"
            members = {k: v for k, v in sample.items() if k != "caption_text"}
            members["json"] = json.dumps({"key": key, "status": "success", "url": f"http://x/{key}"}).encode()
            for field, data in members.items():
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


RED_CAR = _image(0, (64, 48))
DOG = _image(1, (40, 80))

SHARD_A = [
    {"jpg": RED_CAR, "txt": b"a red car on the street"},                       # kept: 0
    {"jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"broken"},          # undecodable_image
    {"jpg": DOG, "txt": b"  A dog playing in the park  \n"},                   # kept: 1 (caption stripped)
    {"jpg": _image(2, (50, 50)), "txt": b""},                                  # empty_caption
    {"jpg": _image(3, (50, 50)), "txt": b" \t\n "},                            # empty_caption
    {"jpg": _image(4, (50, 50)), "txt": b"caf\xe9 au lait"},                   # non_utf8_caption
    {"jpg": _image(5, (20, 30)), "txt": b"tiny"},                              # too_small
    {"jpg": RED_CAR, "txt": b"the same car again"},                            # duplicate (same shard)
    {"png": _image(6, (33, 70), "PNG", "RGBA"), "txt": "Three birds flying over a lake at dawn, "
     "with 'quotes' and a café.".encode()},                                    # kept: 2 (PNG with alpha)
]
SHARD_B = [
    {"jpg": _image(7, (100, 60)), "txt": b"Mountains under snow"},             # kept: 3
    {"jpg": DOG, "txt": b"another dog"},                                       # duplicate (of shard A)
    {"jpg": _image(8, (32, 32)), "txt": b"a small square"},                    # kept: 4 (exactly min side)
    {"txt": b"no image at all"},                                               # missing_image
    {"jpg": _image(9, (48, 64)), "txt": b"People walking in the rain."},       # kept: 5
]
KEPT = [("000000000", "a red car on the street"), ("000000002", "A dog playing in the park"),
        ("000000008", SHARD_A[8]["txt"].decode()), ("000000100", "Mountains under snow"),
        ("000000102", "a small square"), ("000000104", "People walking in the rain.")]
REJECTED = {"missing_image": 1, "empty_caption": 2, "non_utf8_caption": 1, "undecodable_image": 1, "too_small": 1,
            "duplicate": 2}
OPTIONS = PreprocessOptions(resolutions=(32, 16), shard_size=4, min_image_side=32, max_reject_fraction=0.9,
                            processes=2)


def _raw_dataset(prefix: str, tmp_path: Path, shards=(SHARD_A, SHARD_B)) -> str:
    entries = []
    for i, samples in enumerate(shards):
        local = tmp_path / f"raw-{i:05d}.tar"
        _raw_tar(local, i, samples)
        uri = store.join(prefix, "raw", f"{i:05d}.tar")
        store.put_file(uri, local)
        entries.append({"uri": uri, "samples": len(samples)})
    manifest_uri = store.join(prefix, "raw", "manifest.json")
    write_manifest(manifest_uri, datasets.RAW_SHARDS, {
        "shards": entries, "counts": {"total": 14, "success": 14, "failed": {}}, "duration_s": 0.0,
        "images_per_s": 0.0, "options": {}})
    return manifest_uri


def _read_train_shards(doc: dict) -> list[dict]:
    samples = []
    for shard in doc["shards"]:
        with store.open_read(shard["uri"]) as stream:
            samples.extend(read_samples(stream, shard["uri"]))
    return samples


# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_preprocess_filters_indexes_resizes_and_reshards(s3_prefix, tmp_path):
    raw = _raw_dataset(s3_prefix, tmp_path)
    out = store.join(s3_prefix, "train")
    doc = preprocess(raw, out, OPTIONS)

    assert doc["kind"] == datasets.TRAIN_SHARDS
    assert doc["num_samples"] == len(KEPT) and doc["input_samples"] == 14
    assert doc["rejected"] == REJECTED
    assert doc["resolutions"] == [16, 32]
    assert [(s["uri"], s["samples"], s["first_index"]) for s in doc["shards"]] == [
        (store.join(out, "shards", "00000.tar"), 4, 0), (store.join(out, "shards", "00001.tar"), 2, 4)]
    for shard in doc["shards"]:
        assert shard["sha256"] == hashlib.sha256(store.get_bytes(shard["uri"])).hexdigest()
    assert doc["sizes_uri"] == store.join(out, "shards", "sizes.json")
    assert json.loads(store.get_bytes(doc["sizes_uri"])) == {"00000.tar": 4, "00001.tar": 2}
    assert store.exists(store.join(out, "manifest.json"))
    assert not list(store.list_objects(store.join(out, "work") + "/")), "work/ is removed after the commit"

    samples = _read_train_shards(doc)
    assert [s["__key__"] for s in samples] == [datasets.sample_key(i) for i in range(len(KEPT))]
    for i, (sample, (source_key, text)) in enumerate(zip(samples, KEPT)):
        meta = json.loads(sample["json"])
        assert meta["index"] == i and meta["source_key"] == source_key
        assert sample["txt"].decode() == text
        assert (meta["words"], meta["pos_order"]) == tuple(map(list, caption_pos(text)))
        for size in (16, 32):
            img = Image.open(io.BytesIO(sample[datasets.image_field(size)]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size)
        assert set(sample) == {"__key__", "img16.jpg", "img32.jpg", "txt", "json"}

    # A rerun of a finished run changes nothing and returns the same result.
    again = preprocess(raw, out, OPTIONS)
    assert again["shards"] == doc["shards"] and again["created_unix"] == doc["created_unix"]

    # One process gives the same bytes as two.
    single = preprocess(raw, store.join(s3_prefix, "train-1proc"), OPTIONS.model_copy(update={"processes": 1}))
    assert [s["sha256"] for s in single["shards"]] == [s["sha256"] for s in doc["shards"]]
    assert single["rejected"] == doc["rejected"] and single["num_samples"] == doc["num_samples"]


def test_rerun_after_crashes_reuses_work_and_gives_the_same_bytes(tmp_path, monkeypatch):
    prefix = (tmp_path / "store").as_uri()
    raw = _raw_dataset(prefix, tmp_path)
    out = store.join(prefix, "train")
    options = OPTIONS.model_copy(update={"processes": 1})
    reference = preprocess(raw, store.join(prefix, "reference"), options)

    # Crash 1, while filtering: the second raw shard is unreadable, after the first was filtered.
    second = store.join(prefix, "raw", "00001.tar")
    hidden = tmp_path / "hidden.tar"
    store.get_file(second, hidden)
    store.delete(second)
    with pytest.raises(store.ObjectNotFound):
        preprocess(raw, out, options)
    store.put_file(second, hidden)

    # Crash 2, while re-sharding: the second output shard fails to upload after the first one is committed.
    real_commit = reshard._Assembler._commit

    def commit_then_crash(self, shard, path):
        if shard == 1:
            raise OSError("simulated crash")
        return real_commit(self, shard, path)

    monkeypatch.setattr(reshard._Assembler, "_commit", commit_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        preprocess(raw, out, options)
    monkeypatch.undo()
    first_shard = store.local_path(store.join(out, "shards", "00000.tar"))
    committed = first_shard.stat()
    assert not store.exists(store.join(out, "manifest.json"))

    doc = preprocess(raw, out, options)
    assert first_shard.stat().st_ino == committed.st_ino, "a committed shard is not written again"
    assert doc["filter_processes"] == 0, "both input shards were filtered before the crash and are reused"
    assert doc["shards"] == [{**s, "uri": s["uri"].replace("/reference/", "/train/")} for s in reference["shards"]]
    assert doc["rejected"] == reference["rejected"]


def test_too_many_rejections_fail_with_the_reasons(tmp_path):
    prefix = (tmp_path / "store").as_uri()
    raw = _raw_dataset(prefix, tmp_path, shards=(SHARD_A,))
    with pytest.raises(PreprocessError) as err:
        preprocess(raw, store.join(prefix, "train"), PreprocessOptions(resolutions=(16,), processes=1))
    message = str(err.value)
    assert "6 of 9 samples rejected (66.7%)" in message and "max_reject_fraction 50.0%" in message
    for reason in ("undecodable_image 1", "empty_caption 2", "non_utf8_caption 1", "too_small 1", "duplicate 1"):
        assert reason in message
    assert not store.exists(store.join(prefix, "train", "manifest.json"))


def test_a_broken_raw_tar_fails_naming_the_shard(tmp_path):
    prefix = (tmp_path / "store").as_uri()
    raw = _raw_dataset(prefix, tmp_path, shards=(SHARD_B,))
    shard = store.local_path(store.join(prefix, "raw", "00000.tar"))
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]  # the last sample's last member
    shard.write_bytes(shard.read_bytes()[:last.offset_data + last.size // 2])
    with pytest.raises(PreprocessError, match=r"raw shard .*00000\.tar is not a readable tar after 4 samples"):
        preprocess(raw, store.join(prefix, "train"), PreprocessOptions(resolutions=(16,), processes=1))


def test_cli_runs_the_stage(tmp_path, capsys):
    import argparse

    from components.preprocess import cli

    prefix = (tmp_path / "store").as_uri()
    raw = _raw_dataset(prefix, tmp_path, shards=(SHARD_B,))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    parser.set_defaults(func=cli.run)
    out = store.join(prefix, "train")
    args = parser.parse_args(["--raw-manifest", raw, "--output", out, "--resolution", "16",
                              "--resolution", "24", "--shard-size", "3", "--processes", "1"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"manifest": store.join(out, "manifest.json"), "num_samples": 4, "shards": 2,
                       "rejected": {**{reason: 0 for reason in REJECTED}, "missing_image": 1}}
    bad = parser.parse_args(["--raw-manifest", raw, "--output", store.join(prefix, "other"),
                             "--max-reject-fraction", "0.1", "--processes", "1"])
    assert bad.func(bad) == 1  # the stage ran and failed on its input (exit-code rule in pipelines/cli.py)
    assert "max_reject_fraction" in capsys.readouterr().err


def test_refuses_a_prefix_built_from_other_options(tmp_path):
    prefix = (tmp_path / "store").as_uri()
    raw = _raw_dataset(prefix, tmp_path, shards=(SHARD_B,))
    out = store.join(prefix, "train")
    options = PreprocessOptions(resolutions=(16,), processes=1)
    preprocess(raw, out, options)
    with pytest.raises(PreprocessError, match="other inputs or options"):
        preprocess(raw, out, options.model_copy(update={"jpeg_quality": 80}))


def test_min_shards_gives_every_reader_a_shard(tmp_path):
    prefix = (tmp_path / "store").as_uri()
    raw = _raw_dataset(prefix, tmp_path, shards=(SHARD_B,))  # 4 kept: no duplicate without shard A
    doc = preprocess(raw, store.join(prefix, "train"),
                     PreprocessOptions(resolutions=(16,), processes=1, shard_size=1000, min_shards=3))
    assert [s["samples"] for s in doc["shards"]] == [1, 1, 1, 1] and doc["shard_size"] == 1
    assert [s["first_index"] for s in doc["shards"]] == [0, 1, 2, 3]


@pytest.mark.parametrize("n, max_size, min_shards, counts", [
    (10, 4, 1, [4, 4, 2]), (10, 1000, 2, [5, 5]), (100, 1000, 3, [34, 34, 32]), (4, 1000, 3, [1, 1, 1, 1]),
    (2, 1000, 8, [1, 1]), (7, 7, 1, [7]),
])
def test_shard_sizes(n, max_size, min_shards, counts):
    assert plan.shard_counts(n, plan.shard_size(n, max_size, min_shards)) == counts


# ----------------------------------------------------------------------------------------------------------------
# Pieces checked against the libraries they imitate.


CAPTIONS = [
    "a red car on the street",
    "A photo of a big brown dog, running happily through the tall green grass near an old wooden fence at sunset.",
    "Dr. Smith's \"new\" lab isn't open yet; visitors can't enter before 9 a.m. on Mondays -- or so they say!",
    "the the the the the the the the the the the the the the the the the the the the cat cat cat dog dog run run",
    "Close-up of two kittens sleeping on a blue blanket, with toys, yarn, a basket and sunlight from the window.",
    "café crème brûlée in Paris",
    "ok",
]


@pytest.mark.parametrize("context_length", [3, 5, 8, 16, 32, 77])
def test_syntax_mask_matches_open_clip(context_length, monkeypatch):
    from open_clip import tokenizer as oc_tokenizer

    # open_clip downloads NLTK data on first use; the data is installed, and nothing can be downloaded here.
    monkeypatch.setattr(oc_tokenizer, "_nltk_init", True)
    masked = oc_tokenizer.SimpleTokenizer(context_length=context_length, reduction_mask="syntax")
    plain = oc_tokenizer.SimpleTokenizer(context_length=context_length)
    for caption in CAPTIONS:
        words, orders = caption_pos(caption)
        words, orders = json.loads(json.dumps([words, orders]))  # as the loader reads them from <key>.json
        ours = plain([syntax_masked_text(words, orders, context_length)])
        assert ours.tolist() == masked([caption]).tolist(), (caption, context_length)


def test_resize_matches_open_clip_eval_geometry():
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize

    for (w, h), size in [((64, 48), 32), ((40, 80), 32), ((33, 70), 16), ((100, 60), 224), ((32, 32), 32),
                         ((31, 97), 24)]:
        img = Image.open(io.BytesIO(_image(w * h, (w, h)))).convert("RGB")
        expected = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size)])(img)
        assert np.array_equal(np.asarray(filters.resize_center_crop(img, size)), np.asarray(expected)), (w, h, size)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert filters.decode_rgb(buf.getvalue()).getpixel((5, 5)) == (255, 255, 255)


def test_options_validate():
    assert PreprocessOptions(resolutions=(224, 64)).resolutions == (64, 224)
    with pytest.raises(ValueError, match="distinct"):
        PreprocessOptions(resolutions=(64, 64))
    with pytest.raises(ValueError, match="between 8 and 4096"):
        PreprocessOptions(resolutions=(4,))
