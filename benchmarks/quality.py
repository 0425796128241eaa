"""Zero-shot quality at small batch: clip, siglip, FastCLIP v3 and AmorLIP (log_l2), and CLIPA's token reductions.

    .venv/bin/python benchmarks/quality.py [--per-source 3000] [--raw-side 64] [--samples 98304] [--batches 64 256]
        [--seeds 3] [--objectives clip siglip fastclip-v3 amorlip-log_l2] [--evals 4] [--base-lr 2e-3]
        [--workers 1] [--threads 2] [--clipa-seeds 1] [--clipa-objective clip] [--clipa-finetune 0.2]
        [--only quality|clipa|variants] [--variant-batch 64] [--variant-seeds 2] [--variants PREFIX ...]
        [--no-augment] [--out DIR] [--json PATH]

Data: made once, in this run, by the real stages from the offline demo source (as in ``benchmarks/loader.py``):
``ingest_demo`` (--per-source images per source, raw JPEGs at --raw-side px, 10 % per source held out) and
``preprocess`` at 16 and 32 px, into a file:// temp dir. The benchmarks are the held-out split, written by
``components.demo.benchmarks.benchmarks_from_heldout`` (never trained on): animal_mnist, emoji_groups and
openclipart (zero-shot classification) and emoji_names (retrieval).

Part 1, objectives at small batch. For each objective x global batch (--batches) x seed (0 .. --seeds-1) the trainer
(``components.train.loop.train``, in this process, one rank, ``World()``, CPU, fp32) trains the same tiny open_clip
model (``trainer.py``'s tiny: embed 64, ViT 2x64 patch 8 at 32 px, text 2x64 at 16 tokens) at full tokens, one stage,
for the same number of samples (--samples), with the recipe's default train-time augmentation (open_clip_train's
random resized crop, scale 0.9-1.0) or, with --no-augment (the ablation), none: the evaluation transform. The
recipe's seed changes the model's initial weights and the data order.
Hyperparameters are the recipe defaults (``components/common/recipe.py``: every objective's own settings block,
AdamW betas 0.9/0.95, weight decay 0.2, grad clip 1.0, 5 % warmup then cosine) with lr = --base-lr x batch / 256
(the recipe's rule; 2e-3 is the demo recipe's pretrain base lr). A checkpoint is saved every 1/--evals of the steps;
each one's model weights are evaluated zero-shot with ``components.evaluate.evaluate.evaluate`` (CLIP_benchmark's
metrics, text at the full 16 tokens). The table shows, per objective and batch, mean +- sample standard deviation
over the seeds of the final model's animal_mnist acc1, the mean acc1 over the classification benchmarks, emoji_names
retrieval R@5 in both directions (t->i: texts whose image is in their top 5 images; i->t: images with a caption in
their top 5 texts), the training wall seconds (checkpoints included, evaluation not) and the final temperature
tau = 1 / exp(logit_scale) (FastCLIP v2's per-sample temperatures are not in it). ``accuracy_vs_samples.png``
(under --out) plots the mean classification acc1 and animal_mnist acc1 against samples seen, one curve per objective
in one panel per batch, the mean over seeds with a band of +- one standard deviation. matplotlib is not among the
project's dependencies, so the plot is drawn with Pillow.

Part 2, CLIPA. The same model, sample budget and data, batch 256 (the last of --batches), --clipa-objective, seeds
0 .. --clipa-seeds-1: full tokens (the part-1 run with the same settings, reused) against CLIPA's two stages, stage 1
on 1 - --clipa-finetune of the samples at a quarter of the image tokens and text cut to 8 tokens by the syntax mask,
then a finetune at full tokens on the rest (base lr 10x lower, 10 % warmup, as ``configs/demo.yaml``). Stage 1's
image tokens come from resizing to 16 px (CLIPA's choice) or, at 32 px, from each image mask: random (keep 0.25),
grid (one patch per 2x2 window) and block (keep 0.25); all four keep 4 of the 16 patches. The table has the same
metrics, the wall seconds and the speed-up in wall time over full tokens; ``clipa.png`` plots mean acc1 against
samples seen. The tiny model's step is dominated by the fixed work on its 49408 x 64 token embedding (gradient and
AdamW update), so the wall-clock saving is far smaller here than CLIPA's at ViT-B scale (``trainer.py`` part 2 times
the steps of a bigger model).

Part 3, only with --only variants (not in ``make bench``: 26 runs): why FastCLIP and AmorLIP do or do not beat clip
here. At --variant-batch, --variant-seeds seeds, the defaults of clip, fastclip-v3 and amorlip-log_l2 as controls
against settings scaled to this run's length E epochs (``variants``): FastCLIP's gamma decayed over E / 2 epochs (its
README's advice; the default 10 is tuned for longer runs) or constant from epoch 1 (the earliest any schedule can
decay, which brackets a per-step schedule: that differs from the per-epoch one by less than an epoch's shift), a floor
gamma_min 0.8 (the reference code's default) instead of 0.2, rho 6.5 (its CC3M value), v0 (one temperature learnt from
its loss's gradient, as clip's); AmorLIP's beta ramped over E epochs (the paper's formula; the default 16 is longer
than this run), its lambda networks kept across epochs instead of refitted from scratch at each one (an epoch here is
~120 steps), its temperature lr 1e-3 instead of 1e-4, all three, and lr 1e-3 with rho 8.5 throughout (the default rho
list turns to -8.5 after a third of the epochs, which pushes tau up). The table is part 1's; each setting is compared
with clip and with its objective's defaults. ``--variants`` picks settings by label prefix, so two processes can share
the work (``--variants clip fastclip`` and ``--variants amorlip``, ``--threads 1`` each).

The machine may be shared: wall seconds are this run's. Measured on the 2-core CPU: data ~75 s (7,845 training
samples, ~12.5 epochs at the default budget); a run trains at ~1,000 samples/s at batch 64 and ~1,430 at batch 256
(full tokens) and each evaluation takes ~1.6 s, so the defaults take about 0.023 s x --samples + 260 s: 2,413 s in
one ``make bench`` (24 part-1 runs + 4 CLIPA runs). For a smoke run: --seeds 1 --samples 2048 --per-source 300.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # loader.py's and trainer.py's helpers

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from loader import SHARD_SIZE  # noqa: E402
from results_md import points  # noqa: E402
from trainer import MODELS, quiet_fds  # noqa: E402

from components.common import store  # noqa: E402
from components.common.config import load  # noqa: E402
from components.common.recipe import SETTINGS_BLOCKS, Recipe  # noqa: E402
from components.demo.benchmarks import benchmarks_from_heldout  # noqa: E402
from components.demo.dataset import ingest_demo  # noqa: E402
from components.evaluate.evaluate import evaluate  # noqa: E402
from components.ingest.options import IngestOptions  # noqa: E402
from components.preprocess.options import PreprocessOptions  # noqa: E402
from components.preprocess.preprocess import preprocess  # noqa: E402
from components.train import checkpoint as ckpt  # noqa: E402
from components.train.distributed import World  # noqa: E402
from components.train.export import export_config  # noqa: E402
from components.train.loop import RunOptions, train  # noqa: E402
from components.train.plan import model_sizes  # noqa: E402

MODEL = MODELS["tiny"]
NATIVE = MODEL["vision_cfg"]["image_size"]
RESOLUTIONS = (16, NATIVE)
OBJECTIVES = {
    "clip": {"name": "clip"},
    "siglip": {"name": "siglip"},
    "fastclip-v3": {"name": "fastclip", "fastclip": {"version": "v3"}},
    "amorlip-log_l2": {"name": "amorlip", "amorlip": {"divergence": "log_l2"}},
}
STAGE1_TEXT = {"length": 8, "mask": "syntax"}
CLIPA_IMAGES = {  # stage-1 image tokens: 4 of the 16 patches in every variant
    "resize 16 px": {"size": 16},
    "random mask 0.25": {"mask": "random", "keep": 0.25},
    "grid mask": {"mask": "grid"},
    "block mask 0.25": {"mask": "block", "keep": 0.25},
}
FINETUNE_LR_FACTOR, FINETUNE_WARMUP = 0.1, 0.1  # configs/demo.yaml's finetune: 10x lower base lr, 10 % warmup
RETRIEVAL = "emoji_names"
ANIMALS = "animal_mnist"

# ------------------------------------------------------------------------------------------------------------- data


def make_data(root: Path, per_source: int, raw_side: int, workers: int,
              resolutions: tuple[int, ...] = RESOLUTIONS) -> dict[str, Any]:
    """Ingest the demo source, preprocess it at ``resolutions`` (16 and 32 px), and write the held-out benchmarks.
    "raw_shards" lists the ingest's img2dataset shards (the training split only) as (local path, samples)."""
    ingest_uri, train_uri = (root / "ingest").as_uri(), (root / "train").as_uri()
    t0 = time.perf_counter()
    with quiet_fds(root / "make_data.log"):  # img2dataset's progress would bury the tables
        ingested = ingest_demo(ingest_uri, IngestOptions(image_size=raw_side, number_sample_per_shard=SHARD_SIZE),
                               limit=per_source)
        prepared = preprocess(store.join(ingest_uri, "manifest.json"), train_uri,
                              PreprocessOptions(resolutions=resolutions, shard_size=SHARD_SIZE,
                                                min_image_side=min(resolutions), min_shards=max(1, workers)))
        benches = benchmarks_from_heldout(ingested, (root / "benchmarks").as_uri())
    return {"manifest": store.join(train_uri, "manifest.json"), "num_samples": prepared["num_samples"],
            "raw_shards": [(store.local_path(s["uri"]), s["samples"]) for s in ingested["shards"]],
            "sources": ingested.get("demo", {}).get("sources"), "seconds": time.perf_counter() - t0,
            "benchmarks": {name: b["uri"] for name, b in sorted(benches.items())}}


# ------------------------------------------------------------------------------------------------------------- runs


def recipe_doc(objective: dict[str, Any], batch: int, seed: int, samples: int, base_lr: float, evals: int,
               workers: int, stage1_image: dict | None = None, finetune_share: float = 0.0,
               augment: bool = True) -> dict[str, Any]:
    """One run's recipe: one full-token stage, or CLIPA's stage 1 (``stage1_image``) + a full-token finetune; every
    stage with the recipe's default train-time augmentation, or none (``augment=False``, the eval transform)."""
    steps = samples // batch
    if stage1_image is None:
        stages = [{"name": "full", "samples": steps * batch, "base_lr": base_lr}]
    else:
        finetune_steps = round(steps * finetune_share)
        stages = [{"name": "pretrain", "samples": (steps - finetune_steps) * batch, "base_lr": base_lr,
                   "image": stage1_image, "text": STAGE1_TEXT},
                  {"name": "finetune", "samples": finetune_steps * batch, "base_lr": base_lr * FINETUNE_LR_FACTOR,
                   "warmup": FINETUNE_WARMUP}]
    if not augment:
        stages = [{**stage, "augment": "none"} for stage in stages]
    return {
        "name": "bench-quality", "seed": seed, "model": {"config": MODEL}, "objective": objective,
        "batch_size": batch, "precision": "fp32", "stages": stages,
        "checkpoint": {"every_steps": max(1, steps // evals), "every_minutes": None, "keep": evals + 3},
        "data": {"workers": workers},
    }


def summarise(doc: dict[str, Any]) -> dict[str, float]:
    """The table's figures from an evaluate() document (fractions, not percent)."""
    results = doc["datasets"]
    out = {f"{name}/acc1": r["metrics"]["acc1"] for name, r in results.items()
           if r["task"] == "zeroshot_classification"}
    out["mean_acc1"] = statistics.mean(out.values())
    retrieval = results[RETRIEVAL]["metrics"]
    out["t2i_r5"] = retrieval["image_retrieval_recall@5"]  # text -> image
    out["i2t_r5"] = retrieval["text_retrieval_recall@5"]  # image -> text
    return out


def chance_levels(doc: dict[str, Any]) -> dict[str, float]:
    results = doc["datasets"]
    out = {f"{name}/acc1": 1.0 / len(r["classnames"]) for name, r in results.items()
           if r["task"] == "zeroshot_classification"}
    out["mean_acc1"] = statistics.mean(out.values())
    r = results[RETRIEVAL]
    out["t2i_r5"] = min(1.0, 5 / r["num_images"])
    # image -> text: P(one of an image's ~T/I captions among 5 random texts of T), with the mean caption count
    texts, per_image = r["num_texts"], round(r["num_texts"] / r["num_images"])
    out["i2t_r5"] = 1.0 - math.prod((texts - per_image - j) / (texts - j) for j in range(min(5, texts - per_image)))
    return out


def run_one(root: Path, data: dict[str, Any], doc: dict[str, Any], tag: str) -> dict[str, Any]:
    """Train one recipe in this process, evaluate every checkpoint, delete the run's files; returns the figures."""
    recipe = load(Recipe, doc, tag)
    output = root / "runs" / tag
    started = time.perf_counter()
    trained = train(recipe, RunOptions(data=data["manifest"], output=output.as_uri(), resume="never",
                                       interactive=False), World(), torch.device("cpu"))
    wall = time.perf_counter() - started
    config = export_config(model_sizes(recipe).config, NATIVE)  # SigLIP's logit bias included
    points, eval_seconds, chance = [], 0.0, None
    t0 = time.perf_counter()
    for step, uri in ckpt.list_checkpoints(output.as_uri()):
        state = ckpt.load(uri)
        weights = output / f"eval-{step}.pt"
        # open_clip's loader resizes a stage-1 (16 px) positional embedding to the model's 32 px, as CLIPA does.
        torch.save({"state_dict": state["model"]}, weights)
        result = evaluate(config, list(data["benchmarks"].values()), (output / f"eval-{step}").as_uri(),
                          checkpoint=str(weights), device="cpu")
        chance = chance or chance_levels(result)
        points.append({"step": step, "samples": step * recipe.batch_size,
                       "stage": recipe.stages[state["position"]["stage"]].name, **summarise(result),
                       "tau": math.exp(-state["model"]["logit_scale"].item())})  # FastCLIP v2's own taus aside
    eval_seconds = time.perf_counter() - t0
    shutil.rmtree(output, ignore_errors=True)
    stages = trained.metrics["stages"]
    return {"tag": tag, "seed": recipe.seed, "batch": recipe.batch_size, "wall_s": wall, "eval_s": eval_seconds,
            "samples_seen": trained.metrics["samples_seen"],
            "samples_per_s": trained.metrics["samples_seen"] / sum(s["seconds"] for s in stages),
            "stages": stages, "points": points, "final": points[-1], "chance": chance,
            "lr": [recipe.lr(s) for s in recipe.stages]}


# ------------------------------------------------------------------------------------------------------ statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def difference(ours: list[float], theirs: list[float]) -> tuple[float, float | None]:
    """(mean(ours) - mean(theirs), its standard error; None where a side has one run: no spread to estimate)."""
    (a, sa), (b, sb) = mean_std(ours), mean_std(theirs)
    if min(len(ours), len(theirs)) < 2:
        return a - b, None
    return a - b, math.sqrt(sa * sa / len(ours) + sb * sb / len(theirs))


def pct(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:5.1f} ± {100 * s:4.1f}"


def summary(groups: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per group: (mean, std) over its runs of every final metric and of the training wall seconds."""
    return {label: {key: mean_std([r["final"][key] for r in rs]) for key in rs[0]["final"]
                    if key not in ("step", "samples", "stage")} | {"wall_s": mean_std([r["wall_s"] for r in rs])}
            for label, rs in groups.items()}


def curve(runs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over the runs at every checkpoint (the runs share their checkpoint steps)."""
    xs = [p["samples"] for p in runs[0]["points"]]
    means, stds = [], []
    for i in range(len(xs)):
        m, s = mean_std([r["points"][i][key] for r in runs])
        means.append(m)
        stds.append(s)
    return xs, means, stds


COLUMNS = (("animal_mnist acc1", f"{ANIMALS}/acc1"), ("mean cls acc1", "mean_acc1"),
           ("emoji t→i R@5", "t2i_r5"), ("emoji i→t R@5", "i2t_r5"))


def print_table(title: str, groups: dict[str, list[dict[str, Any]]], first: str, extra: dict[str, str] | None = None,
                chance: dict[str, float] | None = None) -> None:
    print(title)
    head = (f"{first:<30}" + "".join(f"{name:>17}" for name, _ in COLUMNS)
            + f"{'wall s':>15}{'samples/s':>11}{'final τ':>9}")
    if extra:
        head += "".join(f"{k:>12}" for k in extra)
    print(head)
    for label, runs in groups.items():
        row = f"{label:<30}" + "".join(f"{pct([r['final'][key] for r in runs]):>17}" for _, key in COLUMNS)
        m, s = mean_std([r["wall_s"] for r in runs])
        row += (f"{m:>9.1f} ± {s:3.0f}" + f"{statistics.mean(r['samples_per_s'] for r in runs):>11.0f}"
                + f"{statistics.mean(r['final']['tau'] for r in runs):>9.3f}")
        if extra:
            row += "".join(f"{v[label]:>12}" for v in extra.values())
        print(row)
    if chance:
        print(f"{'chance':<30}" + "".join(f"{100 * chance[key]:>11.1f}      " for _, key in COLUMNS))


# ------------------------------------------------------------------------------------------------------ the parts


def quality_part(root: Path, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {o: {b: [] for b in args.batches} for o in args.objectives}
    print(f"\nPart 1: objectives at small batch. Model tiny ({json.dumps(MODEL)}), full tokens, one stage of "
          f"{args.samples} samples, base lr {args.base_lr} (lr = base lr x batch / 256), recipe defaults otherwise, "
          f"seeds 0..{args.seeds - 1}, evaluation every {args.samples // args.evals} samples", flush=True)
    for seed in range(args.seeds):  # seeds outermost: a cut-short run still has every objective and batch
        for batch in args.batches:
            for objective in args.objectives:
                tag = f"{objective}-b{batch}-s{seed}"
                run = run_one(root, data, recipe_doc(OBJECTIVES[objective], batch, seed, args.samples, args.base_lr,
                                                     args.evals, args.workers, augment=args.augment), tag)
                runs[objective][batch].append(run)
                if args.json:  # partial figures after every run: a run cut short still leaves them
                    args.json.write_text(json.dumps({"partial_runs": runs}, default=str) + "\n")
                f = run["final"]
                print(f"  {tag:<26} wall {run['wall_s']:6.1f} s ({run['samples_per_s']:5.0f} samples/s), eval "
                      f"{run['eval_s']:4.1f} s; animal_mnist {100 * f[f'{ANIMALS}/acc1']:5.1f}, mean acc1 "
                      f"{100 * f['mean_acc1']:5.1f}, t→i R@5 {100 * f['t2i_r5']:5.1f}, i→t R@5 "
                      f"{100 * f['i2t_r5']:5.1f}", flush=True)
    groups = {f"{o} batch {b}": runs[o][b] for b in args.batches for o in args.objectives}
    chance = next(iter(groups.values()))[0]["chance"]
    print()
    print_table(f"Zero-shot on the held-out split after {args.samples} samples: mean ± std over {args.seeds} seeds "
                f"(%; std is the sample standard deviation)", groups, "objective, global batch", chance=chance)
    print("per dataset (acc1 %, mean ± std): "
          + "; ".join(f"{label}: " + ", ".join(f"{k.split('/')[0]} {pct([r['final'][k] for r in rs]).strip()}"
                                               for k in rs[0]["final"] if k.endswith("/acc1"))
                      for label, rs in groups.items()))
    verdict = compare_to_clip(runs, args)
    for line in verdict:
        print(line)
    hyper = {o: load(Recipe, recipe_doc(OBJECTIVES[o], args.batches[0], 0, args.samples, args.base_lr, args.evals,
                                        args.workers), o).objective.model_dump(mode="json")[OBJECTIVES[o]["name"]]
             if OBJECTIVES[o]["name"] in SETTINGS_BLOCKS else {} for o in args.objectives}
    print("objective settings (recipe defaults): " + "; ".join(f"{o}: {json.dumps(h)}" for o, h in hyper.items()))
    png = None
    if args.out:
        png = args.out / "accuracy_vs_samples.png"
        panels = []
        for key, what in (("mean_acc1", "mean zero-shot acc1 (3 classification sets)"),
                          (f"{ANIMALS}/acc1", "animal_mnist zero-shot acc1")):
            for batch in args.batches:
                series = [(o, *curve(runs[o][batch], key)) for o in args.objectives]
                panels.append((f"{what}, batch {batch}", series, chance[key]))
        draw_panels(png, panels, f"accuracy vs samples seen: mean over {args.seeds} seeds, band ± 1 std; "
                                 f"dashed: chance", "samples seen", "acc1")
        print(f"plot: {png}")
    return {"samples": args.samples, "base_lr": args.base_lr, "seeds": args.seeds, "batches": args.batches,
            "model": MODEL, "objective_settings": hyper, "chance": chance, "comparison": verdict,
            "plot": str(png) if png else None,
            "runs": {label: rs for label, rs in groups.items()},
            "summary": summary(groups)}


def compare_to_clip(runs: dict[str, dict[int, list[dict]]], args: argparse.Namespace) -> list[str]:
    """Each objective minus clip, per batch, in mean classification acc1 and in retrieval, with standard errors."""
    if "clip" not in runs:
        return []
    lines = []
    for metric in COMPARED:
        lines.append(DIFFERENCE_HEAD.format(base="clip", metric=metric))
        lines += [f"  batch {batch}: " + differences({o: runs[o][batch] for o in args.objectives if o != "clip"},
                                                     runs["clip"][batch], COMPARED[metric]) for batch in args.batches]
    return lines


COMPARED = {"mean cls acc1": "mean_acc1", "emoji t→i R@5": "t2i_r5"}
DIFFERENCE_HEAD = ("difference to {base} in {metric} (percentage points; ± the standard error of the difference of "
                   "two means over seeds):")


def differences(groups: dict[str, list[dict[str, Any]]], base: list[dict[str, Any]], key: str) -> str:
    """'label +d ± se, ...': each group's mean final ``key`` minus the base runs', with the standard error."""
    base_values = [r["final"][key] for r in base]
    parts = []
    for label, runs in groups.items():
        parts.append(f"{label} {points(*difference([r['final'][key] for r in runs], base_values))}")
    return ", ".join(parts)


def clipa_part(root: Path, data: dict[str, Any], args: argparse.Namespace,
               quality: dict[str, Any] | None) -> dict[str, Any]:
    batch = args.batches[-1]
    objective = args.clipa_objective
    print(f"\nPart 2: CLIPA, {objective}, batch {batch}, {args.samples} samples, seeds 0..{args.clipa_seeds - 1}; "
          f"stage 1 on {1 - args.clipa_finetune:.0%} of the samples (4 of 16 image patches, text 8 tokens by the "
          f"syntax mask), finetune at full tokens on {args.clipa_finetune:.0%} (base lr x{FINETUNE_LR_FACTOR})",
          flush=True)
    groups: dict[str, list[dict[str, Any]]] = {"full tokens": []}
    reused = quality["runs"].get(f"{objective} batch {batch}", []) if quality else []
    for seed in range(args.clipa_seeds):
        if seed < len(reused):
            groups["full tokens"].append(reused[seed])
            print(f"  full tokens, seed {seed}: the part-1 run {reused[seed]['tag']}", flush=True)
        else:
            run = run_one(root, data, recipe_doc(OBJECTIVES[objective], batch, seed, args.samples, args.base_lr,
                                                 args.evals, args.workers, augment=args.augment),
                         f"clipa-full-s{seed}")
            groups["full tokens"].append(run)
            print(f"  full tokens, seed {seed}: wall {run['wall_s']:.1f} s", flush=True)
        for name, image in CLIPA_IMAGES.items():
            tag = f"clipa-{name.split()[0]}-s{seed}"
            run = run_one(root, data, recipe_doc(OBJECTIVES[objective], batch, seed, args.samples, args.base_lr,
                                                 args.evals, args.workers, stage1_image=image,
                                                 finetune_share=args.clipa_finetune, augment=args.augment), tag)
            label = f"{name} + ft"
            groups.setdefault(label, []).append(run)
            f = run["final"]
            print(f"  {tag:<26} wall {run['wall_s']:6.1f} s (stages "
                  + ", ".join(f"{s['stage']} {s['seconds']:.1f} s" for s in run["stages"])
                  + f"), mean acc1 {100 * f['mean_acc1']:5.1f}", flush=True)
    full_wall = statistics.mean(r["wall_s"] for r in groups["full tokens"])
    speedup = {label: f"{full_wall / statistics.mean(r['wall_s'] for r in rs):.2f}x" for label, rs in groups.items()}
    stage1 = {}
    for label, rs in groups.items():
        pre = [p for r in rs for p in r["points"] if p["stage"] == "pretrain"]
        ends = [max((p for p in r["points"] if p["stage"] == "pretrain"), key=lambda p: p["step"])["mean_acc1"]
                for r in rs if any(p["stage"] == "pretrain" for p in r["points"])]
        stage1[label] = f"{100 * statistics.mean(ends):.1f}" if pre else "-"
    print()
    print_table(f"CLIPA vs full tokens ({objective}, batch {batch}, {args.samples} samples; %, mean ± std over "
                f"{args.clipa_seeds} seed(s); wall s = training)", groups, "setting",
                extra={"speed-up": speedup, "acc1@stage1": stage1})
    print("acc1@stage1: mean cls acc1 at the end of stage 1 (before the finetune), evaluated at full tokens")
    png = None
    if args.out:
        png = args.out / "clipa.png"
        chance = groups["full tokens"][0]["chance"]
        draw_panels(png, [(f"mean zero-shot acc1, {objective}, batch {batch}",
                           [(label, *curve(rs, "mean_acc1")) for label, rs in groups.items()], chance["mean_acc1"])],
                    f"CLIPA stage 1 + finetune vs full tokens: mean over {args.clipa_seeds} seed(s); dashed: chance",
                    "samples seen", "acc1")
        print(f"plot: {png}")
    return {"objective": objective, "batch": batch, "samples": args.samples, "finetune_share": args.clipa_finetune,
            "seeds": args.clipa_seeds, "plot": str(png) if png else None, "speedup": speedup,
            "runs": groups,
            "summary": summary(groups)}


def variants(epochs: int) -> dict[str, dict[str, Any]]:
    """Part 3's settings: what might keep FastCLIP and AmorLIP from beating clip on a small dataset, each scaled to
    this run's length (``epochs``), with every objective's defaults as its control."""
    def fastclip(version: str = "v3", **settings: Any) -> dict[str, Any]:
        return {"name": "fastclip", "fastclip": {"version": version, **settings}}

    def amorlip(**settings: Any) -> dict[str, Any]:
        return {"name": "amorlip", "amorlip": {"divergence": "log_l2", **settings}}

    half = max(1, epochs // 2)
    return {
        "clip": OBJECTIVES["clip"],
        "fastclip-v3": OBJECTIVES["fastclip-v3"],
        f"fastclip-v3 γ decay {half} ep": fastclip(gamma_decay_epochs=half),  # FastCLIP's README: epochs / 2
        "fastclip-v3 γ constant": fastclip(gamma_schedule="constant"),  # γ_min from epoch 1: the earliest schedule
        "fastclip-v3 γ_min 0.8": fastclip(gamma_min=0.8),  # the reference code's default: u trusts new batches more
        "fastclip-v3 ρ 6.5": fastclip(rho=6.5),  # FastCLIP's CC3M value (8.0: its default)
        "fastclip-v0": fastclip(version="v0"),  # one temperature learnt as clip's is
        "amorlip-log_l2": OBJECTIVES["amorlip-log_l2"],
        f"amorlip β ramp {epochs} ep": amorlip(beta_ramp_epochs=epochs),  # the paper's formula: the run's epochs
        "amorlip λ nets kept": amorlip(reinit_every_epochs=epochs),  # fitted across epochs, not refitted per epoch
        "amorlip lr_tau 1e-3": amorlip(lr_tau=1e-3),  # 1e-4 per step moves ln(1/τ) little in a ~1,500-step run
        "amorlip all three": amorlip(beta_ramp_epochs=epochs, reinit_every_epochs=epochs, lr_tau=1e-3),
        "amorlip lr_tau 1e-3 ρ 8.5": amorlip(lr_tau=1e-3, rho=[8.5]),  # no late -8.5 blocks pushing τ back up
    }


def variant_comparisons(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Every setting against clip, and each objective's settings against its defaults."""
    lines = []
    for control in ("clip", "fastclip-v3", "amorlip-log_l2"):
        family = "" if control == "clip" else control.split("-")[0]
        others = {label: rs for label, rs in groups.items() if label != control and label.startswith(family)}
        if control in groups and others:
            for metric, key in COMPARED.items():
                lines += [DIFFERENCE_HEAD.format(base=control, metric=metric),
                          "  " + differences(others, groups[control], key)]
    return lines


def variants_part(root: Path, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    batch, epochs = args.variant_batch, math.ceil(args.samples / data["num_samples"])
    chosen = {label: objective for label, objective in variants(epochs).items()
              if not args.variants or label.startswith(tuple(args.variants))}
    print(f"\nPart 3: why (not) better than clip here. Batch {batch}, {args.samples} samples ({epochs} epochs), seeds "
          f"0..{args.variant_seeds - 1}; each setting changes the objective's defaults as its label says", flush=True)
    groups: dict[str, list[dict[str, Any]]] = {label: [] for label in chosen}
    for seed in range(args.variant_seeds):
        for n, (label, objective) in enumerate(chosen.items()):
            run = run_one(root, data, recipe_doc(objective, batch, seed, args.samples, args.base_lr, args.evals,
                                                 args.workers, augment=args.augment), f"variant{n}-s{seed}")
            groups[label].append(run)
            print(f"  {label:<28} seed {seed}: mean acc1 {100 * run['final']['mean_acc1']:5.1f}, final τ "
                  f"{run['final']['tau']:.3f}, wall {run['wall_s']:.0f} s", flush=True)
    print()
    print_table(f"Settings against the defaults (batch {batch}, {args.samples} samples; %, mean ± std over "
                f"{args.variant_seeds} seeds)", groups, "setting")
    lines = variant_comparisons(groups)
    for line in lines:
        print(line)
    return {"batch": batch, "samples": args.samples, "epochs": epochs, "seeds": args.variant_seeds,
            "settings": chosen, "comparison": lines, "runs": groups,
            "summary": summary(groups)}


# ------------------------------------------------------------------------------------------------------------ plots

PALETTE = [(37, 99, 235), (220, 38, 38), (22, 163, 74), (217, 119, 6), (147, 51, 234), (8, 145, 178),
           (100, 116, 139), (219, 39, 119)]


def draw_panels(path: Path, panels: list[tuple[str, list[tuple], float | None]], title: str, x_label: str,
                y_label: str) -> None:
    """Line charts with shaded bands, drawn with Pillow. panels: (title, [(label, xs, means, stds)], chance)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(size: int):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow without FreeType
            return ImageFont.load_default()

    f_title, f_text, f_small = font(18), font(14), font(12)
    pw = 620
    legend_rows = max(math.ceil(len(series) / 2) for _, series, _ in panels)
    ph = 380 + 18 * legend_rows
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    width = max(cols * pw + 20, int(draw_text_width(title, f_title)) + 30)
    height = rows * ph + 50
    image = Image.new("RGBA", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 12), title, fill="black", font=f_title)
    row_top: dict[int, float] = {}  # panels in a row share the y scale (the same metric at each batch)
    for n, (_, series, chance) in enumerate(panels):
        ys = [y + e for s in series for y, e in zip(s[2], s[3])] + ([chance] if chance is not None else [])
        row_top[n // cols] = max(row_top.get(n // cols, 0.05), *ys)
    for n, (ptitle, series, chance) in enumerate(panels):
        ox, oy = 10 + (n % cols) * pw, 45 + (n // cols) * ph
        left, top, right, bottom = ox + 60, oy + 28, ox + pw - 20, oy + 330
        xs_all = [x for s in series for x in s[1]] or [1]
        x_max = max(xs_all)
        y_max = row_top[n // cols] * 1.08
        tick = _nice_step(y_max / 5)
        y_max = math.ceil(y_max / tick) * tick

        # called only within this iteration of the panel loop, so the loop variables they read are this panel's
        def sx(x: float) -> float:
            return left + (right - left) * x / x_max  # noqa: B023

        def sy(y: float) -> float:
            return bottom - (bottom - top) * y / y_max  # noqa: B023

        draw.text((ox + 10, oy + 4), f"{ptitle} ({y_label})", fill="black", font=f_text)
        y = 0.0
        while y <= y_max + 1e-9:
            draw.line([(left, sy(y)), (right, sy(y))], fill=(229, 231, 235))
            draw.text((left - 45, sy(y) - 7), f"{100 * y:.0f}%", fill=(75, 85, 99), font=f_small)
            y += tick
        xtick = _nice_step(x_max / 5)
        x = 0.0
        while x <= x_max + 1e-9:
            draw.line([(sx(x), bottom), (sx(x), bottom + 4)], fill="black")
            draw.text((sx(x) - 14, bottom + 7), f"{x / 1000:g}k", fill=(75, 85, 99), font=f_small)
            x += xtick
        draw.rectangle([left, top, right, bottom], outline=(156, 163, 175))
        draw.text(((left + right) // 2 - 40, bottom + 22), x_label, fill="black", font=f_small)
        if chance is not None:
            cx = left
            while cx < right:
                draw.line([(cx, sy(chance)), (min(cx + 6, right), sy(chance))], fill=(107, 114, 128), width=1)
                cx += 12
        overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
        shade = ImageDraw.Draw(overlay)
        for k, (_label, xs, means, stds) in enumerate(series):
            color = PALETTE[k % len(PALETTE)]
            upper = [(sx(x), sy(m + s)) for x, m, s in zip(xs, means, stds)]
            lower = [(sx(x), sy(max(0.0, m - s))) for x, m, s in zip(xs, means, stds)]
            if len(xs) > 1 and any(stds):
                shade.polygon(upper + lower[::-1], fill=(*color, 50))
        image.alpha_composite(overlay)
        draw = ImageDraw.Draw(image)
        for k, (label, xs, means, _stds) in enumerate(series):
            color = PALETTE[k % len(PALETTE)]
            pts = [(sx(x), sy(m)) for x, m in zip(xs, means)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=3)
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            lx, ly = left + (k % 2) * (right - left) // 2, bottom + 44 + 18 * (k // 2)
            draw.line([(lx, ly + 7), (lx + 20, ly + 7)], fill=color, width=3)
            draw.text((lx + 26, ly), label, fill="black", font=f_small)
    image.convert("RGB").save(path)


def draw_text_width(text: str, font) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else 7 * len(text)


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


# ------------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-source", type=int, default=3000, help="demo images per source (3 sources)")
    parser.add_argument("--raw-side", type=int, default=64, help="img2dataset's image size for the raw shards")
    parser.add_argument("--samples", type=int, default=98304, help="samples seen per run (the sample budget)")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="global batch sizes")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per objective and batch")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--evals", type=int, default=4, help="evaluations per run (every 1/N of the steps)")
    parser.add_argument("--base-lr", type=float, default=2e-3, help="lr = base lr x batch / 256")
    parser.add_argument("--workers", type=int, default=1, help="data workers of the training loader")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--clipa-seeds", type=int, default=1)
    parser.add_argument("--clipa-objective", default="clip", choices=list(OBJECTIVES))
    parser.add_argument("--clipa-finetune", type=float, default=0.2, help="share of the samples in the finetune")
    parser.add_argument("--variant-batch", type=int, default=64, help="part 3's global batch")
    parser.add_argument("--variant-seeds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", help="part 3: only the settings whose label starts with one of these")
    parser.add_argument("--only", choices=("quality", "clipa", "variants"), help="run one part only")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="train without augmentation (every stage's augment: none), the ablation of the default")
    parser.add_argument("--out", type=Path, help="directory for the PNG plots")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    quantum = max(args.batches) * args.evals
    if args.samples % quantum:
        args.samples = max(quantum, round(args.samples / quantum) * quantum)
        print(f"--samples rounded to {args.samples} (a multiple of the largest batch x --evals)")
    # open_clip warns "No pretrained weights loaded" at every model it builds; Pillow about palette PNGs in the
    # held-out emoji: neither says anything about the figures.
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore", message="Palette images with Transparency")
    torch.set_num_threads(args.threads)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    figures: dict[str, Any] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="clipline-quality-bench-") as tmp:
        root = Path(tmp)
        data = make_data(root, args.per_source, args.raw_side, args.workers)
        figures["data"] = data
        print(f"data: {data['num_samples']} training samples (16 + 32 px) from {args.per_source} per source, made in "
              f"{data['seconds']:.0f} s; held-out benchmarks: {', '.join(data['benchmarks'])}; "
              f"{torch.get_num_threads()} torch threads, {args.workers} data worker(s), "
              f"os.cpu_count()={os.cpu_count()}", flush=True)
        epochs = args.samples / data["num_samples"]
        print(f"sample budget {args.samples} = {epochs:.1f} epochs of the training split", flush=True)
        quality = None
        if args.only in (None, "quality"):
            quality = figures["quality"] = quality_part(root, data, args)
        if args.only in (None, "clipa"):
            figures["clipa"] = clipa_part(root, data, args, quality)
        if args.only == "variants":  # not in the default run: 26 runs, see the module docstring
            figures["variants"] = variants_part(root, data, args)
    figures["wall_s"] = time.perf_counter() - started
    print(f"\nquality.py total {figures['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
