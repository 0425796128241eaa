"""Quality parity: clipline's clip against open_clip_train on the same raw shards, model and hyperparameters.

    .venv/bin/python benchmarks/parity.py [--per-source 3000] [--raw-side 256] [--epochs 5] [--batch 128]
        [--seeds 3] [--workers 1] [--variant 'LABEL:KEY=VALUE[;KEY=VALUE]' ...] [--no-default-variants] [--quick]
        [--out DIR] [--json PATH]

Data: made once, in this run, by the real stages from the offline demo source (``quality.make_data``): the demo's
ingest (img2dataset over a loopback HTTP server, --per-source images per source, JPEGs at --raw-side px, 10 % per
source held out), preprocess at the model's 64 px, and the held-out benchmarks (``benchmarks_from_heldout``: never
trained on). open_clip_train reads the raw img2dataset shards, as a user would give them to it; clipline reads the
training shards that preprocess made from the same shards.

Both train the same model (``trainer.py``'s small: ViT 4x256 at 64 px, patch 8; text 4x256 at 32 tokens; embed 128)
with the hyperparameters a new user would give both: global batch --batch, peak lr 1e-3, weight decay 0.1, AdamW
betas 0.9/0.98, eps 1e-6, 31 warmup steps then cosine to 0, fp32, --epochs passes over the training split (an epoch
is the whole batches of it), --workers data workers, one process, seeds 0 .. --seeds-1. Everything else is each
tool's default: open_clip_train's RandomResizedCrop (scale 0.9-1.0) and no gradient clipping; clipline's recipe
defaults (its ``augment`` block, grad_clip_norm 1.0, shuffle buffer 2000). open_clip_train runs as
``python -c "import open_clip, sys; open_clip.add_model_config(DIR); from open_clip_train.main import main; ..."``
(open_clip_train.main itself, with the model config registered first); clipline trains in this process
(``components.train.loop.train``). Both final models are evaluated by ``components.evaluate.evaluate.evaluate`` on
the held-out benchmarks (open_clip_train's checkpoint loads as is).

The table shows every metric of every benchmark: mean ± sample standard deviation over the seeds for each trainer,
and clipline minus open_clip_train with its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b); "BELOW" marks a metric
where clipline is lower by more than two standard errors. Ablation rows (``--variant``, and by default the settings
that differ between the two tools) rerun clipline with recipe keys changed (dotted paths into the recipe, list items
by index; values are YAML: ``augment-none:stages.0.augment=none``), each with the same seeds, and show the headline
metrics' differences from open_clip_train.

Measured on the 2-core CPU: data 140 s at the defaults (7,846 training samples after preprocess's filters; raw
256 px); a run ~10 minutes (5 epochs of 61 steps, evaluation included), so the defaults (3 seeds x open_clip_train,
clipline and one ablation) take ~95 minutes. --quick (a tiny model on 60 images per source, one epoch, one seed)
takes ~1 minute and only shows the script works.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # quality.py's and trainer.py's helpers

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from quality import difference, make_data, mean_std  # noqa: E402
from results_md import pct, points  # noqa: E402
from trainer import MODELS, quiet_fds, run_logged, thread_env  # noqa: E402

from components.common import store  # noqa: E402
from components.common.config import load  # noqa: E402
from components.common.recipe import Recipe  # noqa: E402
from components.evaluate.evaluate import evaluate  # noqa: E402
from components.train.distributed import World  # noqa: E402
from components.train.export import manifest_uri  # noqa: E402
from components.train.loop import RunOptions, train  # noqa: E402

LR, WEIGHT_DECAY, BETAS, EPS, WARMUP_STEPS = 1e-3, 0.1, (0.9, 0.98), 1e-6, 31
OC_MODEL_NAME = "clipline-parity"
# One row per cause found: clipline before train-time augmentation (the gap the issue reported). Other candidates
# run with --variant, e.g. "no grad clipping:optimizer.grad_clip_norm=null" (open_clip_train clips none).
DEFAULT_VARIANTS = ["augment none (no train-time augmentation):stages.0.augment=none"]
HEADLINE = ("mean_acc1", "mean_t2i_r10", "mean_i2t_r10")


# ------------------------------------------------------------------------------------------------------ the runs


def clipline_recipe(model: dict, seed: int, steps: int, epoch_samples: int, batch: int, workers: int
                    ) -> dict[str, Any]:
    return {
        "name": "bench-parity", "seed": seed, "model": {"config": model}, "objective": {"name": "clip"},
        "batch_size": batch, "precision": "fp32",
        "optimizer": {"name": "adamw", "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY},
        # lr = base_lr x batch / 256 (the recipe's rule), so this base lr gives the peak lr LR.
        "stages": [{"name": "full", "samples": steps * batch, "base_lr": LR * 256 / batch,
                    "warmup": min(WARMUP_STEPS, steps - 1) / steps}],
        "checkpoint": {"every_steps": steps, "every_minutes": None, "keep": 1},
        "data": {"workers": workers, "epoch_samples": epoch_samples},
    }


def with_overrides(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with each dotted key (``stages.0.augment``) set; every key but the last must exist."""
    doc = copy.deepcopy(doc)
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node: Any = doc
        for part in path:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError):
                raise SystemExit(f"variant key {dotted!r}: the recipe has no {part!r} here") from None
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return doc


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'LABEL:KEY=VALUE;KEY=VALUE' -> (label, {key: YAML value}); the label ends at the last ':' before the first
    '=', so values may hold YAML's colons (``stages.0.augment={scale: [0.4, 1.0]}``)."""
    label, sep, _ = text[: text.find("=")].rpartition(":")
    body = text[len(label) + 1:]
    if "=" not in text or not sep or not label:
        raise SystemExit(f"--variant {text!r}: expected LABEL:KEY=VALUE[;KEY=VALUE]")
    pairs = [item.split("=", 1) for item in body.split(";") if item.strip()]
    return label, {key.strip(): yaml.safe_load(value) for key, value in pairs}


def metrics_of(doc: dict[str, Any]) -> dict[str, float]:
    """Every metric of every benchmark in an evaluate() document, plus the means the headline uses."""
    out: dict[str, float] = {}
    for name, result in sorted(doc["datasets"].items()):
        for metric, value in sorted(result["metrics"].items()):
            if isinstance(value, (int, float)):
                out[f"{name}/{metric}"] = float(value)
    classification = [v for k, v in out.items() if k.endswith("/acc1")]
    out["mean_acc1"] = statistics.mean(classification)
    for short, metric in (("t2i", "image_retrieval_recall@10"), ("i2t", "text_retrieval_recall@10")):
        values = [v for k, v in out.items() if k.endswith(f"/{metric}")]
        out[f"mean_{short}_r10"] = statistics.mean(values)
    return out


def evaluated(model: dict, checkpoint: str, data: dict[str, Any], out: Path) -> dict[str, float]:
    result = evaluate(model, list(data["benchmarks"].values()), out.as_uri(), checkpoint=checkpoint, device="cpu")
    return metrics_of(result)


def run_clipline(root: Path, data: dict[str, Any], doc: dict[str, Any], tag: str) -> dict[str, Any]:
    recipe = load(Recipe, doc, tag)
    output = root / "runs" / tag
    started = time.perf_counter()
    with quiet_fds(root / f"{tag}.log"):
        train(recipe, RunOptions(data=data["manifest"], output=output.as_uri(), resume="never", interactive=False),
              World(), torch.device("cpu"))
    wall = time.perf_counter() - started
    exported = store.get_json(manifest_uri(output.as_uri()))
    model = store.get_json(exported["config"])
    return {"tag": tag, "wall_s": wall, "metrics": evaluated(model, exported["weights"], data, output / "eval")}


def run_open_clip(root: Path, data: dict[str, Any], model: dict, seed: int, epoch_samples: int,
                  args: argparse.Namespace, tag: str) -> dict[str, Any]:
    config_dir = root / "open_clip_configs"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{OC_MODEL_NAME}.json").write_text(json.dumps(model))
    launcher = ("import open_clip, sys; open_clip.add_model_config(sys.argv.pop(1)); "
                "from open_clip_train.main import main; main(sys.argv[1:])")
    steps = args.epochs * epoch_samples // args.batch
    wall = run_logged("open_clip_train", [
        sys.executable, "-c", launcher, str(config_dir), "--model", OC_MODEL_NAME,
        "--train-data", "::".join(str(path) for path, _ in data["raw_shards"]), "--dataset-type", "webdataset",
        "--train-num-samples", str(epoch_samples), "--batch-size", str(args.batch), "--epochs", str(args.epochs),
        "--workers", str(args.workers), "--precision", "fp32", "--device", "cpu", "--lr", str(LR),
        "--wd", str(WEIGHT_DECAY), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS),
        "--warmup", str(min(WARMUP_STEPS, steps - 1)), "--save-frequency", str(args.epochs), "--report-to", "",
        "--logs", str(root / "open_clip_logs"), "--name", tag, "--seed", str(seed),
    ], root / f"{tag}.log", thread_env(args.threads))
    checkpoint = root / "open_clip_logs" / tag / "checkpoints" / f"epoch_{args.epochs}.pt"
    return {"tag": tag, "wall_s": wall, "metrics": evaluated(model, str(checkpoint), data, root / "eval" / tag)}


# ------------------------------------------------------------------------------------------------------ statistics


def below(diff: float, se: float | None) -> bool:
    """Lower by more than two standard errors; no verdict without one (a side with one run, or no spread)."""
    return bool(se) and diff < -2 * se


def compare(ours: list[dict], theirs: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for metric in theirs[0]["metrics"]:
        a = [r["metrics"][metric] for r in ours]
        b = [r["metrics"][metric] for r in theirs]
        diff, se = difference(a, b)
        rows.append({"metric": metric, "clipline": mean_std(a), "open_clip_train": mean_std(b), "diff": diff,
                     "se": se, "below": below(diff, se)})
    return rows


def print_tables(groups: dict[str, list[dict]], comparisons: dict[str, list[dict]]) -> None:
    main = comparisons["clipline"]
    n = len(groups["open_clip_train"])
    print(f"\nclipline clip vs open_clip_train, same raw shards and hyperparameters, {n} seed(s) each "
          f"(mean ± std, %; diff = clipline - open_clip_train ± SE, percentage points):")
    print(f"{'metric':44} {'open_clip_train':>20} {'clipline':>20} {'diff ± SE':>20}")
    for row in main:
        flag = "  BELOW" if row["below"] else ""
        print(f"{row['metric']:44} {pct(row['open_clip_train']):>20} {pct(row['clipline']):>20} "
              f"{points(row['diff'], row['se']):>20}{flag}")
    for name in ("open_clip_train", "clipline"):
        print(f"{name} wall s per run: {statistics.mean(r['wall_s'] for r in groups[name]):.0f}")
    print("\nablations: clipline with one setting changed, diff from open_clip_train ± SE in points "
          f"(BELOW: > 2 SE lower), and how many of the {len(main)} metrics are BELOW:")
    print(f"{'clipline setting':58} " + " ".join(f"{h:>20}" for h in HEADLINE) + f" {'BELOW':>6}")
    for label, rows in comparisons.items():
        by_metric = {r["metric"]: r for r in rows}
        cells = [points(by_metric[h]["diff"], by_metric[h]["se"]) for h in HEADLINE]
        name = "defaults (the recipe a user starts from)" if label == "clipline" else label
        print(f"{name:58} " + " ".join(f"{c:>20}" for c in cells) + f" {sum(r['below'] for r in rows):>6}")


# ------------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-source", type=int, default=3000)
    parser.add_argument("--raw-side", type=int, default=256, help="img2dataset's image size for the raw shards")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the open_clip_train process")
    parser.add_argument("--variant", action="append", default=[], help="LABEL:KEY=VALUE[;KEY=VALUE] (repeatable)")
    parser.add_argument("--no-default-variants", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny model and data, one seed: shows the script works")
    parser.add_argument("--out", type=Path, help="keep the data, logs and runs here (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = MODELS["small"]
    if args.quick:
        args.per_source, args.raw_side, args.epochs, args.batch, args.seeds = 60, 64, 1, 32, 1
        model = MODELS["tiny"]
    variants = dict(parse_variant(v) for v in ([] if args.no_default_variants else DEFAULT_VARIANTS) + args.variant)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="clipline-parity-") as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        side = model["vision_cfg"]["image_size"]
        (root / "data").mkdir(exist_ok=True)
        data = make_data(root / "data", args.per_source, args.raw_side, args.workers, resolutions=(side,))
        epoch_samples = data["num_samples"] // args.batch * args.batch
        steps = args.epochs * epoch_samples // args.batch
        print(f"data: {data['num_samples']} training samples (raw {args.raw_side} px, stored {side} px), "
              f"made in {data['seconds']:.0f} s; {args.epochs} epochs of {epoch_samples // args.batch} steps at "
              f"batch {args.batch}; benchmarks {', '.join(data['benchmarks'])}", flush=True)
        groups: dict[str, list[dict]] = {"open_clip_train": [], "clipline": [], **{label: [] for label in variants}}
        for seed in range(args.seeds):  # interleaved, so a change in the machine's load hits every group alike
            groups["open_clip_train"].append(
                run_open_clip(root, data, model, seed, epoch_samples, args, f"open_clip-{seed}"))
            doc = clipline_recipe(model, seed, steps, epoch_samples, args.batch, args.workers)
            groups["clipline"].append(run_clipline(root, data, doc, f"clipline-{seed}"))
            for i, (label, overrides) in enumerate(variants.items()):
                groups[label].append(run_clipline(root, data, with_overrides(doc, overrides), f"variant{i}-{seed}"))
            print(f"seed {seed} done: " + ", ".join(f"{name} {runs[-1]['metrics']['mean_acc1']:.3f}"
                                                   for name, runs in groups.items()), flush=True)
        comparisons = {name: compare(runs, groups["open_clip_train"])
                       for name, runs in groups.items() if name != "open_clip_train"}
        print_tables(groups, comparisons)
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join([".venv/bin/python", "benchmarks/parity.py", *sys.argv[1:]]),
            "samples": data["num_samples"], "epochs": args.epochs, "batch": args.batch, "seeds": args.seeds,
            "variants": variants, "runs": groups, "comparisons": comparisons,
        }, indent=2))


if __name__ == "__main__":
    main()
