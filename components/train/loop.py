"""The training loop: one recipe, its CLIPA stages in order, on every rank of a torchrun job (or one process).

Read top to bottom: ``train`` resumes or starts, then for each stage builds the stage's model (the previous stage's
weights carried over by ``clipa.switch_stage``), its optimizer and its data loader, and runs its steps. The objective
(with its u tables or lambda networks) is built once and lives across the stages. Distributed details stay in
``distributed.py`` and DDP; checkpoint contents in ``checkpoint.py``; logs in ``progress.py``.

A step: lr from the schedule -> forward under the recipe's precision -> objective loss -> backward (DDP averages the
gradients) -> gradient clipping -> optimizer step -> the objective's after-step hook (temperature clamp, its own lr
rules). Checkpoints are saved every ``checkpoint.every_steps`` steps, when ``checkpoint.every_minutes`` have passed
(checked at log steps, agreed on by all ranks), and at the end of every stage; the model is exported at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from components.common import datasets
from components.common.manifest import read_manifest
from components.common.recipe import Recipe
from components.train import accelerator
from components.train import checkpoint as ckpt
from components.train.accumulation import gradients
from components.train.clipa import build_stage_model, switch_stage, token_counts
from components.train.data import Batch, stage_loader
from components.train.distributed import World, all_reduce_mean
from components.train.export import export_config, export_model, manifest_uri
from components.train.objectives import Objective, ObjectiveContext, ObjectiveOutput, build_objective
from components.train.optim import build_optimizer, schedule_factor, set_lr
from components.train.plan import ModelSizes, StagePlan, TrainPlan, check_recipe, train_plan
from components.train.progress import TrainLog, write_metrics
from components.train.seeds import derive_seed

log = logging.getLogger("clipline.train")

# Recipe keys that may change between a checkpoint and the run resuming it: they do not change what is computed.
RESUMABLE_CHANGES = ("checkpoint.",)


@dataclass(frozen=True)
class RunOptions:
    data: str  # the TRAIN_SHARDS manifest (preprocess's output)
    output: str  # prefix for checkpoints, logs, TensorBoard, metrics and the exported model
    resume: str = "auto"  # auto: from the latest checkpoint under output, if any; never; or a checkpoint URI
    deterministic: bool = False  # deterministic kernels: a resumed run repeats the uninterrupted run's losses
    log_every: int = 10  # steps between log lines (and between checks of the time-based checkpoint)
    interactive: bool | None = None  # progress bar; None: when stderr is a terminal


class TrainingError(RuntimeError):
    pass


@dataclass
class Trained:
    model: nn.Module  # the last stage's model (full tokens after a CLIPA finetune), as exported
    metrics: dict[str, Any]  # also in <output>/metrics.json


@dataclass(frozen=True)
class Run:
    """What every stage of one run shares: built once in ``train``, read by everything below it."""

    recipe: Recipe
    options: RunOptions
    plan: TrainPlan
    sizes: ModelSizes
    world: World
    device: torch.device
    objective: Objective  # with its u tables or lambda networks: lives across the stages
    progress: TrainLog | None  # rank 0 only


@dataclass
class StageState:
    """One stage in progress: what a checkpoint saves besides the objective."""

    plan: StagePlan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps done in this stage


def train(recipe: Recipe, options: RunOptions, world: World, device: torch.device) -> Trained:
    """Run (or finish) the recipe's stages, export the model, and return it with the run's metrics."""
    sizes = check_recipe(recipe, world.size)
    accelerator.configure(device)
    # Per-rank streams (image masks, dropout): reproducible, and different on each rank.
    torch.manual_seed(derive_seed(recipe.seed, "rank", world.rank))
    random.seed(derive_seed(recipe.seed, "python", world.rank))
    if options.deterministic:
        torch.use_deterministic_algorithms(True)
    manifest = read_manifest(options.data, datasets.TRAIN_SHARDS)
    epoch_samples = recipe.data.epoch_samples or int(manifest["num_samples"])
    plan = train_plan(recipe, sizes, epoch_samples // recipe.batch_size)
    recipe_doc = recipe.model_dump(mode="json")

    state = _checkpoint_to_resume(options, recipe_doc)
    position = ckpt.Position(**state["position"]) if state else ckpt.Position(0, 0)
    resume_step = plan.global_step(position.stage, position.step) if state else None
    progress = TrainLog(options.output, plan.total_steps, resume_step, options.interactive) if world.rank == 0 else None
    if progress and state:
        progress.event(resume_step, "resumed", checkpoint=state["uri"], world_size=world.size)

    objective = build_objective(recipe.objective, ObjectiveContext(
        world=world,
        dataset_size=int(manifest["num_samples"]),
        embed_dim=sizes.embed_dim,
        total_epochs=plan.total_epochs,
        seed=recipe.seed,
        optimizer_betas=recipe.optimizer.betas,
        optimizer_eps=recipe.optimizer.eps,
        device=str(device),
        run_id=_run_id(options.output),
    )).to(device)
    if state:
        objective.load_state_dict(state["objective"])
    run = Run(recipe, options, plan, sizes, world, device, objective, progress)

    model: nn.Module | None = None
    stage_metrics = []
    for stage_plan in plan.stages[position.stage:]:
        saved = state if state is not None and stage_plan.index == position.stage else None
        model = _stage_model(run, stage_plan, model, saved["model"] if saved else None)
        stage_metrics.append(_run_stage(run, stage_plan, model, saved, position.step if saved else 0))
        state = None  # only the stage it was saved in resumes from it

    assert model is not None
    metrics = _summary(run, stage_metrics)
    if progress:
        metrics["model_manifest"] = manifest_uri(options.output)
        export_model(options.output, model, export_config(sizes.config, plan.stages[-1].image_size),
                     {"recipe": recipe_doc, "metrics": metrics})
        write_metrics(options.output, metrics)
        progress.event(plan.total_steps, "exported", model=metrics["model_manifest"])
        progress.upload()
        progress.close()
    return Trained(model.eval(), metrics)


# ---------------------------------------------------------------------------------------------------------- resume


def _checkpoint_to_resume(options: RunOptions, recipe_doc: dict) -> dict | None:
    if options.resume == "never":
        existing = ckpt.latest_checkpoint(options.output)
        if existing:
            raise TrainingError(f"{options.output} already holds checkpoints ({existing}); resume with --resume auto "
                                "or train into another output prefix")
        return None
    uri = ckpt.latest_checkpoint(options.output) if options.resume == "auto" else options.resume
    if uri is None:
        return None
    state = ckpt.load(uri)
    diffs = [d for d in ckpt.recipe_differences(state["recipe"], recipe_doc)
             if not d.startswith(RESUMABLE_CHANGES)]
    if diffs:
        raise TrainingError(f"{uri} was trained with another recipe; differences:\n  " + "\n  ".join(diffs))
    state["uri"] = uri
    log.info("resuming from %s (stage %d, step %d)", uri, state["position"]["stage"], state["position"]["step"])
    return state


def _run_id(output: str) -> str:
    """Names node-shared memory: the same on every local rank of this attempt, different for other runs/attempts."""
    digest = hashlib.sha256(output.encode()).hexdigest()[:10]
    return f"{digest}-{os.environ.get('TORCHELASTIC_RUN_ID', 'x')}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"


# ---------------------------------------------------------------------------------------------------------- stages


def _stage_model(run: Run, stage_plan: StagePlan, previous: nn.Module | None, saved: dict | None) -> nn.Module:
    """The model for a stage: fresh (first stage), carried over from the previous stage, or from a checkpoint."""
    image = stage_plan.stage.image
    if previous is not None:
        model = switch_stage(previous, run.sizes.config, image, output_dict=True)
    else:
        # Every rank builds the same initial weights (DDP would broadcast rank 0's anyway; this keeps one process
        # equal).
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            torch.manual_seed(run.recipe.seed)
            model = build_stage_model(run.sizes.config, image, device=run.device, output_dict=True)
        run.objective.init_model(model)
        if saved is not None:
            model.load_state_dict(saved)
    if run.recipe.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _run_stage(run: Run, stage_plan: StagePlan, model: nn.Module, saved: dict | None,
               first_step: int) -> dict[str, Any]:
    recipe, plan, world, device, objective = run.recipe, run.plan, run.world, run.device, run.objective
    stage = stage_plan.stage
    optimizer = build_optimizer(model, objective, recipe.lr(stage), recipe.optimizer)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world.size > 1 else model
    forward = torch.compile(ddp) if accelerator.compiles(recipe, device) else ddp
    no_sync = ddp.no_sync if isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext
    loader = stage_loader(run.options.data, recipe, stage_plan, world=world,
                          model_context_length=run.sizes.context_length)
    if loader.steps_per_epoch != plan.steps_per_epoch:
        raise TrainingError(f"loader has {loader.steps_per_epoch} steps per epoch, the plan {plan.steps_per_epoch}")
    if saved is not None:
        _restore_rng(saved, world)
    if run.progress and first_step == 0:
        image_tokens, text_tokens = token_counts(run.sizes.config, stage)
        run.progress.event(plan.global_step(stage_plan.index, 0), "stage_start", stage=stage.name,
                           steps=stage_plan.steps, image_tokens=image_tokens, text_tokens=text_tokens,
                           lr=recipe.lr(stage), precision=accelerator.precision(recipe, device))

    warmup_steps = round(stage.warmup * stage_plan.steps)
    autocast = accelerator.autocast(recipe, device)
    model.train()
    current = StageState(stage_plan, model, optimizer, first_step)
    started = interval_start = time.time()
    last_checkpoint = time.time()
    interval_steps = 0
    while current.step < stage_plan.steps:
        epoch, epoch_step = divmod(current.step, plan.steps_per_epoch)
        objective.on_epoch_start(stage_plan.first_epoch + epoch)
        for batch in accelerator.on_device(loader.epoch(epoch, start_step=epoch_step), device):
            lr = set_lr(optimizer, schedule_factor(current.step, stage_plan.steps, warmup_steps))
            result = train_step(model, forward, objective, optimizer, batch,
                                grad_clip_norm=recipe.optimizer.grad_clip_norm,
                                micro_batches=recipe.grad_accumulation, autocast=autocast, no_sync=no_sync)
            current.step += 1
            interval_steps += 1
            step, global_step = current.step, plan.global_step(stage_plan.index, current.step)

            due = recipe.checkpoint.every_steps is not None and global_step % recipe.checkpoint.every_steps == 0
            if step % run.options.log_every == 0 or step == stage_plan.steps:
                # The only host reads of a step's values: at log steps (each one waits for the GPU).
                loss = all_reduce_mean(result.loss.detach().float(), world).item()
                if not math.isfinite(loss):
                    raise TrainingError(f"stage {stage.name} step {step}: the loss is {loss}; lower the lr or check "
                                        "the data")
                elapsed = time.time() - interval_start
                if run.progress:
                    metrics = result.metrics
                    run.progress.scalars({
                        "step": global_step, "stage": stage.name, "epoch": stage_plan.first_epoch + epoch,
                        "samples": global_step * recipe.batch_size, "loss": loss, "lr": lr,
                        "temperature": float(metrics["tau"] if "tau" in metrics else 1.0 / metrics["logit_scale"]),
                        "samples_per_s": interval_steps * recipe.batch_size / max(elapsed, 1e-9),
                    })
                interval_start, interval_steps = time.time(), 0
                due = due or _minutes_passed(last_checkpoint, recipe.checkpoint.every_minutes, world, device)
            if due or step == stage_plan.steps:
                _save(run, current)
                last_checkpoint = time.time()
            if step == stage_plan.steps:
                break
    return {
        "stage": stage.name,
        "steps": stage_plan.steps - first_step,
        "seconds": round(time.time() - started, 3),
        "samples_read": loader.total.read,
        "corrupt_skipped": loader.total.corrupt,
    }


def train_step(model: nn.Module, forward: Callable, objective: Objective, optimizer: torch.optim.Optimizer,
               batch: Batch, *, grad_clip_norm: float | None = None, micro_batches: int = 1,
               autocast: ContextManager | None = None,
               no_sync: Callable[[], ContextManager] = contextlib.nullcontext) -> ObjectiveOutput:
    """One training step: forward, the objective's loss and backward (DDP averages the gradients; micro-batches when
    the recipe accumulates), clipping, and the optimizer step with the objective's temperature rules. ``forward`` is
    ``model`` or its DDP / compiled wrapper. Public so that benchmarks/ time this very step. Nothing here reads a
    device value on the host, so on a GPU the host queues the next step while this one runs
    (tests/test_host_syncs.py)."""
    optimizer.zero_grad(set_to_none=True)
    result = gradients(forward, objective, batch.images, batch.texts, batch.indices, micro_batches=micro_batches,
                       autocast=autocast, no_sync=no_sync)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    objective.optimizer_step(model, optimizer)
    return result


def _restore_rng(state: dict, world: World) -> None:
    states = state["rng"]
    if len(states) == world.size:
        ckpt.set_rng_state(states[world.rank])
    else:
        # Another world size: per-rank streams cannot be matched up; derive fresh ones from the position instead.
        log.warning("checkpoint has RNG states for %d ranks, this run has %d: reseeding", len(states), world.size)
        torch.manual_seed(derive_seed(state["global_step"], "rank", world.rank))


def _minutes_passed(since: float, minutes: float | None, world: World, device: torch.device) -> bool:
    """True on every rank when any rank's clock says ``minutes`` have passed (ranks must agree to checkpoint)."""
    if minutes is None:
        return False
    flag = torch.tensor([float(time.time() - since >= 60 * minutes)], device=device)
    if world.size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _save(run: Run, current: StageState) -> None:
    rng = ckpt.gather_rng_states(run.world)  # a collective: every rank takes part
    global_step = run.plan.global_step(current.plan.index, current.step)
    if run.progress:
        uri = ckpt.save(run.options.output, global_step=global_step,
                        position=ckpt.Position(current.plan.index, current.step), model=current.model,
                        optimizer=current.optimizer, objective=run.objective, rng_states=rng,
                        recipe=run.recipe.model_dump(mode="json"), keep=run.recipe.checkpoint.keep)
        run.progress.event(global_step, "checkpoint", uri=uri)
        run.progress.upload()
    # Nobody runs ahead (or exits) before the checkpoint is published: a failure right after it resumes from it.
    if run.world.size > 1:
        dist.barrier()


def _summary(run: Run, stage_metrics: list[dict]) -> dict[str, Any]:
    recipe = run.recipe
    read = torch.tensor([sum(m["samples_read"] for m in stage_metrics),
                         sum(m["corrupt_skipped"] for m in stage_metrics)], dtype=torch.float64)
    if run.world.size > 1:
        dist.all_reduce(read)
    for m in stage_metrics:
        seconds = m["seconds"]
        m["samples_per_s"] = round(m["steps"] * recipe.batch_size / seconds, 2) if seconds > 0 else None
    return {
        "recipe": recipe.name,
        "objective": recipe.objective.name,
        "world_size": run.world.size,
        "global_batch": recipe.batch_size,
        "total_steps": run.plan.total_steps,
        "samples_seen": run.plan.total_steps * recipe.batch_size,
        "stages": stage_metrics,
        "samples_read": int(read[0]),
        "corrupt_skipped": int(read[1]),
    }
