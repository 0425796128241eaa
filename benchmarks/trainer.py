"""Training samples/s: clipline's trainer vs open_clip_train, and the step speed-up of CLIPA stage 1 over full tokens.

    .venv/bin/python benchmarks/trainer.py [--per-source 1000] [--raw-side 64] [--model tiny] [--batch 128]
        [--epochs 4] [--workers 2] [--threads 2] [--log-every 5] [--warmup-share 0.2] [--repeats 2]
        [--clipa-model mid] [--clipa-batch 64] [--clipa-rounds 6] [--clipa-steps 1] [--only trainer|clipa]
        [--json PATH]

Part 1, trainer vs open_clip_train. The data is made by the real stages in this run, as in ``benchmarks/loader.py``
(``ingest_demo`` + ``preprocess`` of the offline demo source, images stored at the model's image size, file:// URIs).
clipline's trainer (``python -m components.train.main``) reads the training shards' manifest. open_clip_train cannot
read their field names (``<key>.img<S>.jpg``), so the same shards are copied with each sample's ``.jpg`` (the very
bytes of ``img<S>.jpg``: the same images at the same size) and ``.txt``; open_clip_train reads the copy as webdataset.
Only the first shards are used, a whole number per data worker, so that every worker of open_clip_train gets whole
batches; clipline's epoch is set to the same length (``data.epoch_samples``), so both runs take the same steps.

Both runs: the same open_clip model config (``--model``: tiny is the demo's CPU CLIP, ViT 2x64 at 32 px and text
2x64 at 16 tokens; small is ViT 4x256 at 64 px, text 4x256 at 32 tokens), full tokens, the clip loss, fp32 on the
CPU, one process, the same global batch, lr, AdamW settings, grad clipping, data workers and OMP_NUM_THREADS.
open_clip_train.main knows only registered model configs, so it runs as
``python -c "import open_clip, sys; open_clip.add_model_config(DIR); from open_clip_train.main import main;
main(sys.argv[1:])" --model NAME ...``: that IS open_clip_train.main, with the config registered first.
The figure is samples/s over windows of --log-every steps (clipline's ``samples_per_s`` log records; open_clip_train's
per-step times, logged every step and summed over the same windows), median over the windows after the first
--warmup-share of the steps; --repeats runs of each trainer in ABBA order, and the figure is the best run's median
(other work on a shared machine only slows a run down, so the best run is the closest to the trainer's own speed; the
JSON also has each run's median and the median pooled over the runs). Checkpoints fall outside the windows, epoch
starts in few, so the median leaves them out.
With the defaults: 10 shards of 256 samples per epoch, 20 steps of 128 per epoch, 4 epochs = 80 steps per run.
What differs is each trainer's own work: open_clip_train applies its RandomResizedCrop to the stored images,
clipline's loader does not (preprocess already sized them); clipline keeps its data workers between epochs.

Part 2, CLIPA stage 1 vs full tokens. One training step (forward, clip loss, backward, AdamW step) of the same model
built by ``components.train.clipa.build_stage_model`` for each setting, on random images and tokens (no data
loading, so the figure is compute only). Stage-1 settings use half the text length, and on the image side a half
image side, or at the full side CLIPA's grid mask, random mask (keep 0.25) or block mask (keep 0.25). The model
(--clipa-model) is mid by default: ViT 6x384 at 64 px (patch 8, 64 tokens), text 6x384 at 32 tokens; the shipped
clipline-ViT-B-16-CL32 also works (a name) but takes tens of seconds a full-token step at batch 8 on a 2-core CPU, and
every setting's model and AdamW state is held at once (~2.4 GB each). Batch 64 makes the token-bound work dominate the
fixed work (the 49408-row token embedding's gradient and AdamW update); at batch 32 the speed-ups come out lower.
Token ratio = (image + text tokens) / (full image + text tokens), image tokens without the class token. Step time =
median over --clipa-rounds interleaved rounds of --clipa-steps steps per setting, after one warm-up step each (one
step per round interleaves best when other work comes and goes on the machine).

The machine may be shared, so read the ratios rather than the absolute figures. Defaults take about 2.5 minutes on a
2-core CPU (data ~40 s, part 1 ~50 s, part 2 ~50 s). With --model small part 1 is compute-bound (~1.5 s a step, ~2
minutes a run), so its ratio shows the trainers' per-step overhead rather than their data pipelines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))  # loader.py's helpers, also when this file is imported rather than run

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from loader import SHARD_SIZE, make_shards  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402

from components.common import store  # noqa: E402
from components.common.open_clip_models import model_config, tower_sizes  # noqa: E402
from components.common.recipe import ImageTokens, Stage, TextTokens  # noqa: E402
from components.train.clipa import build_stage_model, token_counts  # noqa: E402

MODELS = {
    "tiny": dict(embed_dim=64,
                 vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=64, heads=2, layers=2)),
    "small": dict(embed_dim=128,
                  vision_cfg=dict(image_size=64, layers=4, width=256, patch_size=8, head_width=64),
                  text_cfg=dict(context_length=32, vocab_size=49408, width=256, heads=4, layers=4)),
    "mid": dict(embed_dim=256,
                vision_cfg=dict(image_size=64, layers=6, width=384, patch_size=8, head_width=64),
                text_cfg=dict(context_length=32, vocab_size=49408, width=384, heads=6, layers=6)),
}
OC_MODEL_NAME = "clipline-bench"
BASE_LR, WARMUP, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 1e-3, 0.1, 0.2, (0.9, 0.95), 1e-6, 1.0

# ------------------------------------------------------------------------------------------------ part 1: data


@dataclass(frozen=True)
class TrainerSettings:
    """One trainer comparison: what both trainers are given alike. ``main`` fills it from the command line for the
    CPU; benchmarks/gpu.py sets ViT-B/32 at 224 px in bf16 on CUDA."""

    model: str = "tiny"  # a key of MODELS or an open_clip config name (e.g. ViT-B-32)
    batch: int = 128
    epochs: int = 4
    workers: int = 2
    threads: int | None = 2  # OMP_NUM_THREADS of every process; None leaves torch's default (a GPU run)
    precision: str = "fp32"  # fp32 or amp_bf16, given to both trainers
    device: str = "cpu"
    log_every: int = 5
    warmup_share: float = 0.2
    repeats: int = 2
    per_source: int = 1000
    raw_side: int = 64
    # copy: open_clip_train reads the training shards' own images under its field names (the same bytes, no resize
    # left to do); raw: it reads img2dataset's raw shards (raw_side px) and crops them, as it would in real use
    open_clip_data: Literal["copy", "raw"] = "copy"

    @property
    def config(self) -> dict[str, Any]:
        return MODELS[self.model] if self.model in MODELS else model_config(self.model)

    @property
    def image_size(self) -> int:
        return tower_sizes(self.config).image_size


@dataclass(frozen=True)
class TrainerData:
    raw: list[tuple[Path, int]]  # img2dataset's shards: (path, samples)
    manifest: str  # the training shards' manifest
    samples: int  # training samples


def make_data(root: Path, settings: TrainerSettings) -> TrainerData:
    """The demo source through the real ingest and preprocess stages, images stored at the model's size."""
    with quiet_fds(root / "make_shards.log"):
        raw, manifest, n, _ = make_shards(root, settings.per_source, settings.image_size, settings.raw_side)
    return TrainerData(raw, manifest, n)


def whole_worker_shards(shards: list[Any], workers: int) -> list[Any]:
    """A multiple of ``workers`` of the shards: open_clip_train splits shards over its data workers, and a worker
    whose shards ran out before its share of batches would end the epoch early."""
    kept = shards[: len(shards) // max(1, workers) * max(1, workers)]
    if not kept:
        raise SystemExit(f"need at least {max(1, workers)} full shards of {SHARD_SIZE}; raise --per-source")
    return kept


def open_clip_copy(manifest_uri: str, out: Path, workers: int, image_size: int) -> tuple[str, int]:
    """Copy whole training shards with open_clip's field names; returns (brace pattern, samples)."""
    manifest = store.get_json(manifest_uri)
    full = whole_worker_shards([s for s in manifest["shards"] if s["samples"] == SHARD_SIZE], workers)
    out.mkdir(parents=True)
    image_suffix = f".img{image_size}.jpg"
    for i, shard in enumerate(full):
        with tarfile.open(store.local_path(shard["uri"])) as src, tarfile.open(out / f"shard-{i:05d}.tar", "w") as dst:
            for member in src:
                if member.name.endswith(image_suffix):
                    member.name = member.name[: -len(image_suffix)] + ".jpg"
                elif not member.name.endswith(".txt"):
                    continue
                dst.addfile(member, src.extractfile(member))
    return f"{out}/shard-{{00000..{len(full) - 1:05d}}}.tar", len(full) * SHARD_SIZE


def open_clip_data(root: Path, data: TrainerData, settings: TrainerSettings) -> tuple[str, int]:
    """open_clip_train's --train-data and the samples of one epoch (both trainers' epoch length)."""
    if settings.open_clip_data == "copy":
        return open_clip_copy(data.manifest, root / "open_clip_shards", settings.workers, settings.image_size)
    full = whole_worker_shards([path for path, samples in data.raw if samples == SHARD_SIZE], settings.workers)
    # preprocess may drop a few raw samples: clipline's epoch must not be longer than its training set
    epoch_samples = min(len(full) * SHARD_SIZE, data.samples // settings.batch * settings.batch)
    return "::".join(str(path) for path in full), epoch_samples


# ----------------------------------------------------------------------------------------------- part 1: runs


def thread_env(threads: int | None) -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_logged(name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> float:
    """Run a trainer to the end, its output to ``log_path``; returns the wall seconds (start-up included)."""
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}); last lines of {log_path}:\n"
                         + "\n".join(log_path.read_text().splitlines()[-30:]))
    return time.perf_counter() - started


def clipline_rates(root: Path, manifest: str, settings: TrainerSettings, epoch_samples: int,
                   attempt: int) -> dict[str, Any]:
    """clipline's trainer on the training shards: samples/s per log_every window, from its log.jsonl."""
    steps = settings.epochs * epoch_samples // settings.batch
    recipe = {  # one full-token stage; no checkpoint before the stage end, which the windows leave out
        "name": "bench-trainer", "seed": 0, "model": {"config": settings.config}, "objective": {"name": "clip"},
        "batch_size": settings.batch, "precision": settings.precision,
        "optimizer": {"name": "adamw", "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY,
                      "grad_clip_norm": GRAD_CLIP},
        "stages": [{"name": "full", "samples": steps * settings.batch, "base_lr": BASE_LR, "warmup": WARMUP}],
        "checkpoint": {"every_steps": 100_000, "every_minutes": None, "keep": 1},
        "data": {"workers": settings.workers, "epoch_samples": epoch_samples},
    }
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    output = root / f"clipline-run-{attempt}"
    wall = run_logged("clipline", [
        sys.executable, "-m", "components.train.main", "--recipe", str(recipe_path), "--data", manifest,
        "--output", output.as_uri(), "--log-every", str(settings.log_every), "--resume", "never",
        "--device", settings.device,
    ], root / f"clipline-{attempt}.log", thread_env(settings.threads))
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    windows = [(r["step"], r["samples_per_s"]) for r in records if "samples_per_s" in r]
    return {"steps": steps, "wall_s": wall, "windows": windows}


STEP_LINE = re.compile(r"Train Epoch: \d+ \[.*?Batch \(t\): [\d.]+, ([\d.eE+-]+)/s,")


def open_clip_rates(root: Path, train_data: str, epoch_samples: int, settings: TrainerSettings,
                    attempt: int) -> dict[str, Any]:
    """open_clip_train on its shards: per-step times from its log, summed into log_every windows."""
    config_dir = root / "open_clip_configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{OC_MODEL_NAME}.json").write_text(json.dumps(settings.config))
    steps = settings.epochs * epoch_samples // settings.batch
    launcher = ("import open_clip, sys; open_clip.add_model_config(sys.argv.pop(1)); "
                "from open_clip_train.main import main; main(sys.argv[1:])")
    lr = BASE_LR * settings.batch / 256  # clipline's rule (recipe.lr), given to open_clip_train as is
    wall = run_logged("open_clip_train", [
        sys.executable, "-c", launcher, str(config_dir), "--model", OC_MODEL_NAME,
        "--train-data", train_data, "--dataset-type", "webdataset", "--train-num-samples", str(epoch_samples),
        "--batch-size", str(settings.batch), "--epochs", str(settings.epochs), "--workers", str(settings.workers),
        "--precision", settings.precision, "--device", settings.device, "--lr", str(lr), "--wd", str(WEIGHT_DECAY),
        "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS), "--grad-clip-norm", str(GRAD_CLIP),
        "--warmup", str(round(WARMUP * steps)), "--log-every-n-steps", "1", "--save-frequency", "0",
        "--report-to", "", "--logs", str(root / "open_clip_logs"), "--name", f"bench-{attempt}", "--seed", "0",
    ], root / f"open_clip-{attempt}.log", thread_env(settings.threads))
    text = (root / "open_clip_logs" / f"bench-{attempt}" / "out.log").read_text()
    step_seconds = [settings.batch / float(rate) for rate in STEP_LINE.findall(text)]
    if len(step_seconds) != steps:
        raise SystemExit(f"open_clip_train logged {len(step_seconds)} steps, expected {steps}")
    every = settings.log_every
    windows = [(end, every * settings.batch / sum(step_seconds[end - every:end]))
               for end in range(every, steps + 1, every)]
    return {"steps": steps, "wall_s": wall, "windows": windows}


def after_warmup(run: dict[str, Any], share: float) -> list[float]:
    rates = [rate for step, rate in run["windows"] if step > share * run["steps"]]
    if not rates:
        raise SystemExit(f"no timing window after the first {share:.0%} of {run['steps']} steps: raise --epochs or "
                         "lower --log-every")
    return rates


@contextlib.contextmanager
def quiet_fds(log_path: Path) -> Iterator[None]:
    """Send fds 1 and 2 to a file: img2dataset's progress (its subprocesses write there too) would bury the tables."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with log_path.open("w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def compare_trainers(settings: TrainerSettings, root: Path, data: TrainerData) -> dict[str, Any]:
    """Both trainers on the same images, --repeats runs of each in ABBA order; prints the table, returns figures."""
    train_data, epoch_samples = open_clip_data(root, data, settings)
    steps = settings.epochs * epoch_samples // settings.batch
    print(f"data: {data.samples} training samples at {settings.image_size} px; both runs read {epoch_samples} "
          f"({epoch_samples // SHARD_SIZE} shards) per epoch, open_clip_train from "
          f"{'copies of the training shards' if settings.open_clip_data == 'copy' else 'the raw shards'}")
    print(f"model {settings.model}, batch {settings.batch}, {settings.epochs} epochs = {steps} steps, "
          f"{settings.precision}, {settings.device}, 1 process, {settings.workers} data workers, "
          f"OMP_NUM_THREADS={settings.threads or 'default'}, windows of {settings.log_every} steps, "
          f"median after the first {settings.warmup_share:.0%} of the steps, runs of each: {settings.repeats}")
    runs: dict[str, list[dict[str, Any]]] = {"open_clip_train": [], "clipline": []}
    for attempt in range(settings.repeats):  # ABBA order: a load that drifts during the runs hits both alike
        order = ("open_clip_train", "clipline") if attempt % 2 == 0 else ("clipline", "open_clip_train")
        for name in order:
            runs[name].append(open_clip_rates(root, train_data, epoch_samples, settings, attempt)
                              if name == "open_clip_train" else
                              clipline_rates(root, data.manifest, settings, epoch_samples, attempt))
    figures = {}
    for name, rs in runs.items():
        per_run = [statistics.median(after_warmup(run, settings.warmup_share)) for run in rs]
        figures[name] = {"samples_per_s": max(per_run), "per_run_samples_per_s": per_run,
                         "pooled_median_samples_per_s": statistics.median(
                             r for run in rs for r in after_warmup(run, settings.warmup_share)),
                         "steps": rs[0]["steps"], "wall_s": [round(run["wall_s"], 1) for run in rs]}
    ratio = figures["clipline"]["samples_per_s"] / figures["open_clip_train"]["samples_per_s"]
    print(f"{'trainer':<18}{'samples/s':>11}{'per run':>18}{'steps':>7}{'wall s per run':>18}")
    for name, fig in figures.items():
        print(f"{name:<18}{fig['samples_per_s']:>11.1f}{' '.join(f'{r:.0f}' for r in fig['per_run_samples_per_s']):>18}"
              f"{fig['steps']:>7}{' '.join(f'{w:.1f}' for w in fig['wall_s']):>18}")
    print(f"ratio clipline / open_clip_train: {ratio:.2f}x (target >= 1.0, goal >= 1.25)\n"
          "samples/s: the best run's median window; wall s: the whole process, start-up, data-worker starts and the "
          "final checkpoint included")
    return {**asdict(settings), "model_config": settings.config, "samples": data.samples,
            "epoch_samples": epoch_samples, **figures, "ratio": ratio}


def trainer_part(settings: TrainerSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="clipline-trainer-bench-") as tmp:
        t0 = time.perf_counter()
        data = make_data(Path(tmp), settings)
        print(f"data made in {time.perf_counter() - t0:.0f} s")
        return compare_trainers(settings, Path(tmp), data)


# ---------------------------------------------------------------------------------------------- part 2: CLIPA


def clipa_settings(config: dict[str, Any]) -> dict[str, Stage]:
    """Full tokens and CLIPA stage-1 variants: half the text, and on the image half the side or a mask at full side."""
    native = config["vision_cfg"]["image_size"]
    half_text = TextTokens(length=token_counts(config, Stage(name="full", samples=1, base_lr=1.0))[1] // 2)
    images = {"half side": ImageTokens(size=native // 2), "grid mask": ImageTokens(mask="grid"),
              "random mask 0.25": ImageTokens(mask="random", keep=0.25),
              "block mask 0.25": ImageTokens(mask="block", keep=0.25)}
    return {"full tokens": Stage(name="full", samples=1, base_lr=1.0),
            **{name: Stage(name="stage1", samples=1, base_lr=1.0, image=image, text=half_text)
               for name, image in images.items()}}


class StageStepper:
    """One setting's model, optimizer and random batch, stepped on demand so that settings can be timed in turns."""

    def __init__(self, model_ref: Any, stage: Stage, batch: int):
        torch.manual_seed(0)
        self.model = build_stage_model(model_ref, stage.image, output_dict=True).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=BETAS, eps=EPS,
                                           weight_decay=WEIGHT_DECAY)
        self.loss = ClipLoss()
        side = stage.image_size(self.model.visual.image_size[0])
        _, text_length = token_counts(model_ref, stage)
        self.images = torch.randn(batch, 3, side, side)
        self.texts = torch.randint(0, 49408, (batch, text_length))

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        start = time.perf_counter()
        out = self.model(self.images, self.texts)
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def step_times(model_ref: Any, settings: dict[str, Stage], batch: int, rounds: int, steps: int) -> dict[str, float]:
    """Median step time per setting, in interleaved rounds so that machine noise hits every setting alike."""
    steppers = {name: StageStepper(model_ref, stage, batch) for name, stage in settings.items()}
    for stepper in steppers.values():
        stepper.step()  # warm-up: allocator, oneDNN kernels, AdamW state
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, stepper in steppers.items():
            times[name] += [stepper.step() for _ in range(steps)]
    return {name: statistics.median(t) for name, t in times.items()}


def clipa_part(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning, once per model
    model_ref = MODELS.get(args.clipa_model, args.clipa_model)  # an inline config, or a registered name
    settings = clipa_settings(model_ref if isinstance(model_ref, dict) else model_config(model_ref))
    print(f"\nCLIPA stage 1 vs full tokens: model {args.clipa_model}, batch {args.clipa_batch}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.clipa_rounds} x {args.clipa_steps} interleaved steps "
          "after 1 warm-up step, random inputs (compute only)")
    seconds = step_times(model_ref, settings, args.clipa_batch, args.clipa_rounds, args.clipa_steps)
    rows = {}
    for name, stage in settings.items():
        image_tokens, text_tokens = token_counts(model_ref, stage)
        rows[name] = {"image_tokens": image_tokens, "text_tokens": text_tokens, "step_s": seconds[name]}
    full = rows["full tokens"]
    print(f"{'setting':<30}{'image tok':>10}{'text tok':>10}{'tok ratio':>10}{'step ms':>10}{'speed-up':>10}")
    for name, row in rows.items():
        row["token_ratio"] = (row["image_tokens"] + row["text_tokens"]) / (full["image_tokens"] + full["text_tokens"])
        row["speedup"] = full["step_s"] / row["step_s"]
        label = name if name == "full tokens" else f"{name} + text 1/2"
        print(f"{label:<30}{row['image_tokens']:>10}{row['text_tokens']:>10}{row['token_ratio']:>10.2f}"
              f"{row['step_s'] * 1e3:>10.1f}{row['speedup']:>9.2f}x")
    return {"model": args.clipa_model, "batch": args.clipa_batch, "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-source", type=int, default=1000, help="demo images per source (3 sources)")
    parser.add_argument("--raw-side", type=int, default=64, help="img2dataset's image size for the raw shards")
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny", help="the model of part 1")
    parser.add_argument("--batch", type=int, default=128, help="global batch of part 1")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of part 1 (each of 10 shards by default)")
    parser.add_argument("--workers", type=int, default=2, help="data workers of both trainers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of every process")
    parser.add_argument("--log-every", type=int, default=5, help="steps per samples/s window")
    parser.add_argument("--warmup-share", type=float, default=0.2, help="share of the steps left out as warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each trainer, in ABBA order")
    parser.add_argument("--clipa-model", default="mid", help="mid, tiny, small or an open_clip config name")
    parser.add_argument("--clipa-batch", type=int, default=64)
    parser.add_argument("--clipa-rounds", type=int, default=6, help="interleaved rounds over the settings")
    parser.add_argument("--clipa-steps", type=int, default=1, help="timed steps per setting per round")
    parser.add_argument("--only", choices=("trainer", "clipa"), help="run one part only")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    figures = {"cpu_count": os.cpu_count(), "torch": torch.__version__}
    if args.only in (None, "trainer"):
        figures["trainer"] = trainer_part(TrainerSettings(
            model=args.model, batch=args.batch, epochs=args.epochs, workers=args.workers, threads=args.threads,
            log_every=args.log_every, warmup_share=args.warmup_share, repeats=args.repeats,
            per_source=args.per_source, raw_side=args.raw_side))
    if args.only in (None, "clipa"):
        figures["clipa"] = clipa_part(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
