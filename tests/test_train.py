"""The trainer end to end: real torchrun processes (gloo), a real S3 store, shards in the training-data contract.

The data is a learnable toy task (8 colours x 2 shapes, captioned "a red circle on a grey background"), so a tiny
model's loss falls within a few dozen steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from open_clip.tokenizer import SimpleTokenizer
from train_shards import draw_shape, write_shapes_dataset

from components.common import store
from components.common.config import ConfigError
from components.common.manifest import read_manifest
from components.common.recipe import parse_recipe
from components.evaluate.evaluate import load_model
from components.train import checkpoint as ckpt
from components.train.distributed import World
from components.train.export import MODEL, manifest_uri
from components.train.loop import RunOptions, TrainingError, train
from components.train.progress import LOG_NAME, METRICS_NAME, TENSORBOARD_DIR

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def recipe_dict(objective: dict | None = None, *, batch: int = 32, stage1: int = 1024, stage2: int = 256,
                image: dict | None = None, text: dict | None = None, every_steps: int = 8, keep: int = 2) -> dict:
    return {
        "name": "test",
        "seed": 0,
        "model": {"config": TINY},
        "objective": objective or {"name": "clip"},
        "batch_size": batch,
        "stages": [
            {"name": "pretrain", "samples": stage1, "base_lr": 4e-3, "warmup": 0.1,
             "image": image or {"size": 16}, "text": text or {"length": 8, "mask": "syntax"}},
            {"name": "finetune", "samples": stage2, "base_lr": 1e-3, "warmup": 0.1},
        ],
        "checkpoint": {"every_steps": every_steps, "keep": keep},
        "data": {"workers": 1, "shuffle_buffer": 64},
    }


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def data(s3_server, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("shapes")
    return write_shapes_dataset(f"s3://{s3_server.bucket}/tests/train-shapes", tmp, shards=4, per_shard=64,
                                resolutions=(16, 32))


def torchrun(recipe: Path, data: str, output: str, *extra: str, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
         "--rdzv_endpoint=localhost:0", *extra, "-m", "components.train.main", "--recipe", str(recipe),
         "--data", data, "--output", output, "--log-every", "1", "--deterministic"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "LOGLEVEL": "INFO"},
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_log(output: str) -> list[dict]:
    return [json.loads(line) for line in store.get_bytes(store.join(output, LOG_NAME)).decode().splitlines()]


def losses(log: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log if "loss" in r}


# ------------------------------------------------------------------------------------------------ every objective

CASES = {
    # objective block, stage-1 image tokens, stage-1 text tokens: together they cover every CLIPA mask
    "clip": ({"name": "clip"}, {"size": 16}, {"length": 8, "mask": "syntax"}),
    "siglip": ({"name": "siglip"}, {"mask": "random", "keep": 0.5}, {"length": 8, "mask": "truncate"}),
    "fastclip-v0": ({"name": "fastclip", "fastclip": {"version": "v0"}}, {"mask": "grid"},
                    {"length": 6, "mask": "random"}),
    "fastclip-v1": ({"name": "fastclip", "fastclip": {"version": "v1"}}, {"size": 16}, {"length": 8, "mask": "block"}),
    "fastclip-v2": ({"name": "fastclip", "fastclip": {"version": "v2"}}, {"mask": "block", "keep": 0.5},
                    {"length": 8, "mask": "syntax"}),
    "fastclip-v3": ({"name": "fastclip", "fastclip": {"version": "v3", "gamma_decay_epochs": 2}}, {"size": 16},
                    {"length": 8, "mask": "syntax"}),
    "amorlip": ({"name": "amorlip", "amorlip": {"divergence": "log_l2", "lambda_lr": 1e-2}}, {"size": 16},
                {"length": 8, "mask": "syntax"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_through_both_stages_lower_the_loss(case, data, s3_prefix, tmp_path):
    objective, image, text = CASES[case]
    doc = recipe_dict(objective, image=image, text=text, every_steps=16)
    output = store.join(s3_prefix, "train")
    finish(torchrun(write_recipe(tmp_path / "r.yaml", doc), data, output))

    log = read_log(output)
    curve = losses(log)
    assert sorted(curve) == list(range(1, 41))  # 32 + 8 steps, each logged once
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (30, 31, 32)) / 3
    assert last < first - 0.05 * abs(first), f"{case}: stage-1 loss {first:.4f} -> {last:.4f}"
    events = [r["event"] for r in log if "event" in r]
    assert events.count("stage_start") == 2 and events[-1] == "exported"
    assert all(r["temperature"] >= 0.01 - 1e-6 for r in log if "temperature" in r)  # the clamp held
    metrics = json.loads(store.get_bytes(store.join(output, METRICS_NAME)))
    assert metrics["world_size"] == 2 and metrics["samples_seen"] == 40 * 32
    assert [s["stage"] for s in metrics["stages"]] == ["pretrain", "finetune"]
    assert metrics["corrupt_skipped"] == 0 and metrics["samples_read"] >= 40 * 32
    tensorboard = list(store.list_objects(store.join(output, TENSORBOARD_DIR) + "/"))
    assert tensorboard and tensorboard[0].size > 0
    kept = ckpt.list_checkpoints(output)
    assert [step for step, _ in kept] == [32, 40]  # keep: 2 (step 16 pruned; stage ends always saved)


# ------------------------------------------------------------------------------------------------ fault and resume


def _worker_pids(torchrun_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "-P", str(torchrun_pid), "components.train.main"], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.slow
def test_sigkilled_rank_resumes_from_checkpoint_with_the_same_losses(data, s3_prefix, tmp_path):
    doc = recipe_dict({"name": "fastclip", "fastclip": {"version": "v3", "gamma_decay_epochs": 2}},
                      stage1=2048, stage2=512, every_steps=8, keep=3)
    for stage in doc["stages"]:  # every augmentation on (CLIPA's L/H settings plus a flip): resume repeats them
        stage["augment"] = {"scale": [0.4, 1.0], "color_jitter": [0.32, 0.32, 0.32, 0.08], "color_jitter_prob": 0.8,
                            "grayscale_prob": 0.2, "hflip_prob": 0.5}
    recipe = write_recipe(tmp_path / "r.yaml", doc)
    reference, faulted = store.join(s3_prefix, "reference"), store.join(s3_prefix, "faulted")
    finish(torchrun(recipe, data, reference))

    proc = torchrun(recipe, data, faulted, "--max-restarts=1")
    deadline = time.time() + 120
    while not any(step >= 16 for step, _ in ckpt.list_checkpoints(faulted)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    victims = _worker_pids(proc.pid)
    assert len(victims) == 2
    os.kill(victims[-1], signal.SIGKILL)
    out = finish(proc)
    assert "restart" in out.lower()

    log = read_log(faulted)
    resumed = [r for r in log if r.get("event") == "resumed"]
    assert len(resumed) == 1
    resume_step = resumed[0]["step"]
    assert 16 <= resume_step < 80
    expected, got = losses(read_log(reference)), losses(log)
    assert sorted(got) == sorted(expected) == list(range(1, 81))  # every step once, none lost or doubled
    assert got[resume_step + 1] == expected[resume_step + 1]  # deterministic mode: bit-for-bit
    assert got == expected


# ------------------------------------------------------------------------------------------------ in one process


def _train_here(doc: dict, data: str, output: str, resume: str = "auto"):
    recipe = parse_recipe(yaml.safe_dump(doc))
    return train(recipe, RunOptions(data=data, output=output, resume=resume, interactive=False), World(),
                 torch.device("cpu"))


def test_exported_model_loads_with_open_clip_and_gives_the_same_embeddings(data, s3_prefix):
    doc = recipe_dict({"name": "siglip"}, stage1=256, stage2=128)  # siglip: the export must carry the logit bias
    output = store.join(s3_prefix, "train")
    trained = _train_here(doc, data, output)
    # Loaded the way the pipeline's evaluate step loads it: config and weights named by the model manifest.
    exported = read_manifest(manifest_uri(output), MODEL)
    loaded_model = load_model(exported["config"], exported["weights"], device="cpu")
    loaded, preprocess = loaded_model.model, loaded_model.preprocess
    images = torch.stack([preprocess(draw_shape(i, 32)) for i in range(6)])
    texts = SimpleTokenizer(context_length=16)(["a red square", "a blue circle on a grey background", "a cat"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), trained.model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(texts), trained.model.encode_text(texts), rtol=0, atol=0)
    assert loaded.logit_bias is not None
    torch.testing.assert_close(loaded.logit_scale, trained.model.logit_scale)
    torch.testing.assert_close(loaded.logit_bias, trained.model.logit_bias)


def test_checkpoint_holds_everything_and_loads_weights_only(data, s3_prefix):
    output = store.join(s3_prefix, "train")
    _train_here(recipe_dict({"name": "fastclip"}, stage1=256, stage2=64, every_steps=4, keep=1), data, output)
    (step, uri), = ckpt.list_checkpoints(output)  # keep: 1
    assert step == 10
    state = ckpt.load(uri)  # torch.load(weights_only=True) inside
    assert set(state) >= {"model", "optimizer", "objective", "rng", "position", "recipe", "global_step"}
    assert state["position"] == {"stage": 1, "step": 2}
    assert any("log_u" in k or "table" in k or "_extra_state" in k for k in state["objective"])
    assert len(state["rng"]) == 1 and isinstance(state["rng"][0]["torch"], torch.Tensor)


def test_resume_refuses_another_recipe_and_never_refuses_existing_checkpoints(data, s3_prefix):
    output = store.join(s3_prefix, "train")
    doc = recipe_dict(stage1=128, stage2=64)
    _train_here(doc, data, output)
    changed = recipe_dict(stage1=128, stage2=64, batch=16)
    with pytest.raises(TrainingError, match="batch_size: checkpoint 32, recipe 16"):
        _train_here(changed, data, output)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        _train_here(doc, data, output, resume="never")
    # only the checkpoint settings may change between attempts
    _train_here({**doc, "checkpoint": {"every_steps": 3, "keep": 5}}, data, output)


# ------------------------------------------------------------------------------------------------ bad recipes


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(batch_size=33), "batch_size: 33 does not split evenly over 2 ranks"),
    (lambda d: d["objective"].update(name="infonce"), "objective.name: 'infonce' is not allowed"),
    (lambda d: d["stages"][0]["text"].update(length=40), "stages[0] (pretrain).text.length: 40 is above the model's "
                                                         "context length 16"),
])
def test_bad_recipe_fails_before_any_process_starts(change, key, tmp_path):
    doc = recipe_dict()
    change(doc)
    recipe = write_recipe(tmp_path / "bad.yaml", doc)
    output = (tmp_path / "out").as_uri()
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--recipe", str(recipe), "--data",
                          (tmp_path / "none.json").as_uri(), "--output", output, "--nproc-per-node", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert key in out.stderr
    assert "torch.distributed" not in out.stderr and "rank0" not in out.stderr  # torchrun never ran
    assert not (tmp_path / "out").exists()
    assert time.time() - started < 60


def test_check_recipe_lists_every_problem_at_once():
    from components.train.plan import check_recipe

    doc = recipe_dict(batch=30)
    doc["stages"][0]["image"] = {"size": 20}
    doc["stages"][0]["text"] = {"length": 17}
    with pytest.raises(ConfigError) as err:
        check_recipe(parse_recipe(yaml.safe_dump(doc)), 4)
    text = str(err.value)
    for fragment in ("batch_size: 30", "image.size: 20 is not a multiple of the model's patch size 8",
                     "text.length: 17 is above"):
        assert fragment in text
