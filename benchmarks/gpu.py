"""clipline on one GPU: MFU, trainer vs open_clip_train, objective overheads, loader, peak memory, in one command.

    .venv/bin/python benchmarks/gpu.py [--json PATH] [--profile] [--per-source 1000] [--quick]

Sections, in this order, each with its wall time (the step counts are chosen to fit 8 minutes on an H100,
compilation included; not yet measured on one):

- **mfu**: ViT-B/16 at 224 px, bf16 autocast, batch 256: clipline's training step (``components.train.loop.
  train_step``, timed by ``benchmarks/objectives.py``'s Runner) eager and compiled. Model FLOPs per step come from
  the config (``train_flops``: 3x the forward's matmul FLOPs); the peak from the device name (``PEAKS``); an unknown
  device gets its TFLOP/s printed and no MFU.
- **trainer**: clipline's trainer against ``open_clip_train`` (``benchmarks/trainer.py``'s ``compare_trainers``),
  ViT-B/32 at 224 px, bf16, the same per-GPU batch and workers, runs interleaved ABBA. open_clip_train reads the raw
  img2dataset shards (256 px, its RandomResizedCrop; its defaults otherwise: no compile), clipline its preprocessed
  shards (its defaults on a GPU: compiled).
- **objectives**: step time of siglip, fastclip-v3 and amorlip against clip, with clip measured twice (the control
  row's difference is the noise), ViT-B/32 eager at per-GPU batch 1024 and 4096 (a batch that does not fit is "OOM");
  each case's host syncs under ``torch.cuda.set_sync_debug_mode("error")``.
- **loader**: ``benchmarks/loader.py``'s comparison at 224 px: clipline's loader against open_clip's
  ``get_wds_dataset``, per worker and in total, on the trainer section's shards.

Peak GPU memory per case is ``torch.cuda.max_memory_allocated`` reset before the case's steps; in the objectives
section every case's model stays resident between rounds, so the JSON also has what they hold together. The floors
(``floors``) are printed next to the figures; a missed one says by how much, and with --profile the top kernels of
the case that missed it (``torch.profiler``) and, for the trainer, the share of step time spent waiting for data.

Nothing is downloaded: models are built from their configs (no pretrained weights) and the data comes from the
offline demo source, made by the real ingest and preprocess stages in this run. ``--quick`` runs every section on
the CPU in float32 with a tiny model, tiny data and a few steps (about 1-2 minutes on 2 cores), so that the script
is exercised without a GPU (tests/test_gpu_benchmark.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))  # the other benchmarks' functions
sys.path.insert(0, str(BENCHMARKS.parent))  # components, when run as a script

import torch  # noqa: E402
from loader import LoaderSettings, clipline_loader, compare_loaders, whole_batch_shards  # noqa: E402
from objectives import CASES, CaseTiming, Runner, StepSettings, measure  # noqa: E402
from trainer import MODELS, TrainerData, TrainerSettings, compare_trainers, make_data  # noqa: E402

from components.common.open_clip_models import model_config, tower_sizes  # noqa: E402
from components.common.recipe import ObjectiveSpec  # noqa: E402
from components.train import accelerator  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets, matched on torch.cuda.get_device_name()
# (e.g. "NVIDIA H100 80GB HBM3" is the SXM part): the first row whose words all appear in the name wins, so the
# specific rows come before the general ones.
PEAKS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("h100", "pcie"), "H100 PCIe", 756e12),
    (("h100", "nvl"), "H100 NVL", 835e12),
    (("h200", "nvl"), "H200 NVL", 835e12),
    (("gh200",), "GH200", 989e12),
    (("h100",), "H100 SXM", 989e12),
    (("h200",), "H200 SXM", 989e12),
    (("a100",), "A100", 312e12),
)

OVERHEAD_CASES = {name: CASES[name] for name in ("clip", "clip (control)", "siglip", "fastclip-v3", "amorlip-log_l2")}


@dataclass(frozen=True)
class GpuSettings:
    """Every size the run uses. FULL is the GPU run; QUICK the CPU check of the same code paths."""

    device: str = "cuda"
    precision: str = "amp_bf16"
    compile_backend: str = "inductor"
    mfu_model: str = "ViT-B-16"  # an open_clip config name, or a key of benchmarks/trainer.py's MODELS
    mfu_batch: int = 256
    model: str = "ViT-B-32"  # trainer, objectives and loader sections
    batch: int = 256  # per-GPU batch of the trainer and loader sections
    workers: int = 8
    per_source: int = 1000
    raw_side: int = 256  # img2dataset's default
    trainer_epochs: int = 4  # 8 steps an epoch with the defaults: 32 steps a run, 4 runs
    trainer_repeats: int = 2
    log_every: int = 4
    overhead_batches: tuple[int, ...] = (1024, 4096)  # the floors apply at the first
    warmup: int = 10
    rounds: int = 5
    steps: int = 6  # timed steps per case per round: 10 warm-up + 30 timed
    loader_epochs: int = 2
    profile_steps: int = 5
    profile_met: bool = False  # --profile profiles the cases that met their floor too (QUICK: to run that code)


FULL = GpuSettings()
QUICK = GpuSettings(device="cpu", precision="fp32", compile_backend="aot_eager", mfu_model="tiny", mfu_batch=16,
                    model="tiny", batch=32, workers=2, per_source=300, raw_side=64, trainer_epochs=2,
                    trainer_repeats=1, log_every=2, overhead_batches=(32, 64), warmup=2, rounds=2, steps=2,
                    loader_epochs=1, profile_steps=2, profile_met=True)


# --------------------------------------------------------------------------------------------------------- FLOPs


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Forward matmul FLOPs of one sample through a transformer (2 FLOPs a multiply-add): the q, k, v and output
    projections, the attention scores and their product with v, the MLP's two matmuls. Norms, softmax and
    activations are left out, as MFU conventionally counts only matmuls."""
    mlp = int(width * mlp_ratio)
    return layers * (2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width)


def forward_flops(config: Mapping[str, Any]) -> int:
    """Forward matmul FLOPs of one image-text pair through an open_clip CLIP with a ViT image tower."""
    vision, text = config["vision_cfg"], config["text_cfg"]
    if not isinstance(vision.get("layers"), int) or "timm_model_name" in vision or vision.get("attentional_pool"):
        raise ValueError("forward_flops counts open_clip's own ViT towers only")
    sizes = tower_sizes(config)
    patches = (sizes.image_size // sizes.patch_size) ** 2
    image = (2 * patches * 3 * sizes.patch_size ** 2 * vision["width"]  # the patch embedding (a convolution)
             + transformer_flops(patches + 1, vision["width"], vision["layers"], vision.get("mlp_ratio", 4.0))
             + 2 * vision["width"] * sizes.embed_dim)  # the pooled class token's projection
    caption = (transformer_flops(sizes.context_length, text["width"], text["layers"], text.get("mlp_ratio", 4.0))
               + 2 * text["width"] * sizes.embed_dim)
    return image + caption


def train_flops(config: Mapping[str, Any], batch: int) -> int:
    """Model FLOPs of one training step: the backward costs two forwards (gradients of inputs and of weights)."""
    return 3 * batch * forward_flops(config)


def peak_flops(device_name: str) -> tuple[str, float] | None:
    """(the PEAKS row's label, dense bf16 FLOP/s) for a device name, or None for a device not in the table."""
    name = device_name.lower()
    for words, label, flops in PEAKS:
        if all(word in name for word in words):
            return label, flops
    return None


# ------------------------------------------------------------------------------------------------------ sections


def step_settings(settings: GpuSettings, model: dict, compile_model: bool = False) -> StepSettings:
    return StepSettings(model=model, device=settings.device, precision=settings.precision, compile=compile_model,
                        compile_backend=settings.compile_backend, warmup=settings.warmup)


def config_of(model: str) -> dict:
    return model_config(MODELS.get(model, model))


def data_section(root: Path, trainer: TrainerSettings, made: list[TrainerData]) -> dict[str, Any]:
    """The demo source's shards, made once for the trainer and loader sections (appended to ``made``)."""
    made.append(make_data(root, trainer))
    print(f"{made[0].samples} training samples at {trainer.image_size} px, {len(made[0].raw)} raw shards at "
          f"{trainer.raw_side} px")
    return {"samples": made[0].samples, "raw_shards": len(made[0].raw), "image_size": trainer.image_size}


def mfu_section(settings: GpuSettings, peak: tuple[str, float] | None) -> dict[str, Any]:
    flops = train_flops(config_of(settings.mfu_model), settings.mfu_batch)
    rows = {}
    for mode, compiled in (("eager", False), ("compiled", True)):
        timing = measure({"clip": ObjectiveSpec()}, settings.mfu_batch, settings.rounds, settings.steps,
                         step_settings(settings, config_of(settings.mfu_model), compiled))["clip"]
        rows[mode] = {"step_s": timing.step_s, "samples_per_s": settings.mfu_batch / timing.step_s,
                      "tflop_per_s": flops / timing.step_s / 1e12,
                      "mfu": flops / timing.step_s / peak[1] if peak else None,
                      "peak_gpu_mb": timing.peak_gpu_bytes / 2**20}
    print(f"model FLOPs per step {flops / 1e12:.2f} TFLOP (batch {settings.mfu_batch}); peak "
          + (f"{peak[1] / 1e12:.0f} TFLOP/s ({peak[0]})" if peak else "unknown for this device: no MFU"))
    print(f"{'mode':<10}{'step ms':>10}{'samples/s':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak MB':>10}")
    for mode, row in rows.items():
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"{mode:<10}{row['step_s'] * 1e3:>10.1f}{row['samples_per_s']:>11.1f}{row['tflop_per_s']:>10.1f}"
              f"{mfu:>8}{row['peak_gpu_mb']:>10.0f}")
    return {"model": settings.mfu_model, "batch": settings.mfu_batch, "flops_per_step": flops, **rows}


def trainer_settings(settings: GpuSettings) -> TrainerSettings:
    return TrainerSettings(model=settings.model, batch=settings.batch, epochs=settings.trainer_epochs,
                           workers=settings.workers, threads=None if settings.device == "cuda" else 2,
                           precision=settings.precision, device=settings.device, log_every=settings.log_every,
                           repeats=settings.trainer_repeats, per_source=settings.per_source,
                           raw_side=settings.raw_side, open_clip_data="raw")


def host_syncs(spec: ObjectiveSpec, batch: int, step: StepSettings) -> str:
    """'none', or the first host sync a warmed-up step makes (library code included), on CUDA only."""
    if step.device != "cuda":
        return "n/a (CPU)"
    runner = Runner(spec, batch, step)
    runner.warm_up(2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.step()
        torch.cuda.set_sync_debug_mode("default")
        return "none"
    except RuntimeError as error:
        torch.cuda.set_sync_debug_mode("default")
        return str(error).splitlines()[0]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def overhead_rows(timings: dict[str, CaseTiming]) -> dict[str, dict[str, float]]:
    base = timings["clip"].step_s
    return {name: {"step_s": t.step_s, "overhead_pct": (t.step_s / base - 1) * 100,
                   "peak_gpu_mb": t.peak_gpu_bytes / 2**20, "resident_gpu_mb": t.resident_gpu_bytes / 2**20}
            for name, t in timings.items()}


def objectives_section(settings: GpuSettings) -> dict[str, Any]:
    step = step_settings(settings, config_of(settings.model))
    figures: dict[str, Any] = {}
    for batch in settings.overhead_batches:
        try:
            figures[str(batch)] = overhead_rows(measure(OVERHEAD_CASES, batch, settings.rounds, settings.steps, step))
        except torch.cuda.OutOfMemoryError:
            figures[str(batch)] = "OOM"  # a smaller GPU: the other batch sizes still report
        free_memory()
    syncs = {name: host_syncs(spec, settings.overhead_batches[0], step) for name, spec in OVERHEAD_CASES.items()}
    free_memory()
    print(f"{'objective':<16}" + "".join(f"{f'batch {b}: ms':>16}{'vs clip':>9}{'peak MB':>9}"
                                         for b in settings.overhead_batches) + "  host syncs")
    for name in OVERHEAD_CASES:
        cells = ""
        for batch in settings.overhead_batches:
            rows = figures[str(batch)]
            cells += (f"{'OOM':>16}{'':>9}{'':>9}" if rows == "OOM" else
                      f"{rows[name]['step_s'] * 1e3:>16.1f}{rows[name]['overhead_pct']:>+8.1f}%"
                      f"{rows[name]['peak_gpu_mb']:>9.0f}")
        print(f"{name:<16}{cells}  {syncs[name]}")
    return {"model": settings.model, "batches": figures, "host_syncs": syncs}


def loader_section(settings: GpuSettings, data: TrainerData, size: int) -> dict[str, Any]:
    loader = LoaderSettings(size=size, batch=settings.batch, workers=settings.workers)
    rates = compare_loaders(whole_batch_shards(data.raw, settings.batch), data.manifest, data.samples, loader,
                            settings.loader_epochs)
    theirs, ours = rates.values()
    print(f"ratio clipline / open_clip_train: {ours / theirs:.2f}x")
    return {"size": size, "batch": settings.batch, "workers": settings.workers,
            "samples_per_s": rates, "samples_per_s_per_worker": {k: v / settings.workers for k, v in rates.items()},
            "ratio": ours / theirs}


# -------------------------------------------------------------------------------------------- floors and profiles


@dataclass(frozen=True)
class Floor:
    label: str
    value: float | None  # None: not measured (an unknown device's MFU, an OOM)
    bound: float
    at_least: bool  # True: value >= bound; False: value <= bound
    unit: str

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        missed_by = self.bound - self.value if self.at_least else self.value - self.bound
        return "met" if missed_by <= 0 else f"MISSED by {missed_by:.3g}{self.unit}"


def floors(figures: dict[str, Any], settings: GpuSettings) -> list[Floor]:
    sections = figures["sections"]
    first = sections["objectives"]["batches"][str(settings.overhead_batches[0])]

    def overhead(name: str) -> float | None:
        return None if first == "OOM" else first[name]["overhead_pct"]

    mfu = sections["mfu"]["compiled"]["mfu"]
    return [
        Floor("trainer samples/s, clipline / open_clip_train", sections["trainer"]["ratio"], 1.25, True, "x"),
        Floor(f"MFU, {sections['mfu']['model']} compiled", None if mfu is None else mfu * 100, 40.0, True, " %"),
        Floor(f"fastclip-v3 overhead at batch {settings.overhead_batches[0]}", overhead("fastclip-v3"), 2.0, False,
              " %"),
        Floor(f"amorlip overhead at batch {settings.overhead_batches[0]}", overhead("amorlip-log_l2"), 5.0, False,
              " %"),
    ]


def kernel_table(runner: Runner, steps: int) -> str:
    """The top kernels of a few warmed-up steps: by CUDA time on a GPU, by CPU time on a CPU."""
    runner.warm_up(2)
    cuda = runner.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        runner.timed(steps)
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=12)


def loader_wait_share(settings: GpuSettings, data: TrainerData, step: StepSettings) -> float:
    """Share of clipline's step time spent waiting for the next batch: the real loader feeding the real step."""
    runner = Runner(CASES["clip"], settings.batch, step)
    runner.warm_up(2)
    sizes = tower_sizes(config_of(settings.model))
    loader = clipline_loader(data.manifest, LoaderSettings(sizes.image_size, settings.batch, settings.workers,
                                                           text_length=sizes.context_length))
    batches = accelerator.on_device(loader.epoch(0), runner.device)
    waited, started = 0.0, time.perf_counter()
    for _ in range(min(loader.steps_per_epoch, 4 * settings.profile_steps)):
        before = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - before
        runner.step(batch)
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    return waited / (time.perf_counter() - started)


def profiles(missed: list[Floor], settings: GpuSettings, data: TrainerData) -> dict[str, Any]:
    """What --profile prints for each missed floor: its label -> the report."""
    b32 = step_settings(settings, config_of(settings.model))
    reports: dict[str, Any] = {}
    for floor in missed:
        if floor.label.startswith("trainer"):
            share = loader_wait_share(settings, data, replace(b32, compile=settings.device == "cuda"))
            print(f"\n{floor.label}: data-loader wait {share:.1%} of step time")
            reports[floor.label] = {"loader_wait_share": share,
                                    "kernels": kernel_table(Runner(CASES["clip"], settings.batch, b32),
                                                            settings.profile_steps)}
        elif floor.label.startswith("MFU"):
            runner = Runner(CASES["clip"], settings.mfu_batch,
                            step_settings(settings, config_of(settings.mfu_model), True))
            reports[floor.label] = {"kernels": kernel_table(runner, settings.profile_steps)}
        else:
            spec = CASES["fastclip-v3" if floor.label.startswith("fastclip") else "amorlip-log_l2"]
            runner = Runner(spec, settings.overhead_batches[0], b32)
            reports[floor.label] = {"kernels": kernel_table(runner, settings.profile_steps)}
        print(f"\n{floor.label}: top kernels\n{reports[floor.label]['kernels']}")
        free_memory()
    return reports


# ------------------------------------------------------------------------------------------------------------ run


def timed_section(name: str, figures: dict[str, Any], run: Callable[[], dict[str, Any]]) -> None:
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    figures["sections"][name] = run()
    figures["sections"][name]["wall_s"] = time.perf_counter() - started
    print(f"({name}: {figures['sections'][name]['wall_s']:.0f} s)", flush=True)


def run_all(settings: GpuSettings, command: str, profile: bool) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device(settings.device)
    accelerator.configure(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name) if device.type == "cuda" else None
    print(f"command: {command}\ndevice: {name}; torch {torch.__version__}; peak used: "
          + (f"{peak[0]}, {peak[1] / 1e12:.0f} TFLOP/s dense bf16" if peak else "none (MFU not reported)"))
    figures: dict[str, Any] = {"command": command, "device": name, "torch": torch.__version__,
                               "peak": {"name": peak[0], "flop_per_s": peak[1]} if peak else None,
                               "settings": asdict(settings), "sections": {}}
    trainer = trainer_settings(settings)
    with tempfile.TemporaryDirectory(prefix="clipline-gpu-bench-") as tmp:
        root = Path(tmp)
        made: list[TrainerData] = []
        timed_section("data", figures, lambda: data_section(root, trainer, made))
        data = made[0]
        timed_section("mfu", figures, lambda: mfu_section(settings, peak))
        timed_section("trainer", figures, lambda: compare_trainers(trainer, root, data))
        timed_section("objectives", figures, lambda: objectives_section(settings))
        timed_section("loader", figures, lambda: loader_section(settings, data, trainer.image_size))
        checked = floors(figures, settings)
        print("\n== floors ==")
        for floor in checked:
            value = "n/a" if floor.value is None else f"{floor.value:.3g}{floor.unit}"
            print(f"{floor.label:<52}{value:>10}  {'>=' if floor.at_least else '<='} {floor.bound:g}{floor.unit}: "
                  f"{floor.verdict()}")
        figures["floors"] = [asdict(f) | {"verdict": f.verdict()} for f in checked]
        to_profile = [f for f in checked if settings.profile_met or f.verdict().startswith("MISSED")]
        if profile and to_profile:
            figures["profiles"] = profiles(to_profile, settings, data)
    figures["wall_s"] = time.perf_counter() - started
    print(f"\nwall time: {figures['wall_s']:.0f} s")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write every figure, with the command, here")
    parser.add_argument("--profile", action="store_true", help="profile the cases that miss a floor")
    parser.add_argument("--per-source", type=int, help="demo images per source (default: 1000; --quick 300)")
    parser.add_argument("--quick", action="store_true", help="the CPU check: tiny model and data, a few steps")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.per_source:
        settings = replace(settings, per_source=args.per_source)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or --quick for the CPU check")
    command = shlex.join([sys.executable, *sys.argv])
    figures = run_all(settings, command, args.profile)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
