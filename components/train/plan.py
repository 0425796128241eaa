"""What a recipe means for one run: the model's sizes, each stage's steps and epochs, and every check that needs them.

``check_recipe`` runs before any training process starts (``clipline train``, the torchx component) and again in
each process, so a bad value fails in seconds with the key named instead of minutes later in one rank's traceback.
``TrainPlan`` then tells the loop how many steps each stage has and where epochs begin; positions are counted in
steps within a stage, and the objectives' epoch counter runs on across the stages (FastCLIP's gamma schedule and
AmorLIP's lambda re-initialisation do not restart at the stage switch: the objective's state is carried over).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.common.config import ConfigError
from components.common.open_clip_models import TowerSizes, model_config, tower_sizes
from components.common.recipe import ObjectiveSpec, Recipe, Stage


@dataclass(frozen=True)
class ModelSizes(TowerSizes):
    config: dict  # the open_clip config the run trains (model_kwargs applied)


def model_kwargs(objective: ObjectiveSpec) -> dict:
    """Arguments ``open_clip.create_model`` needs beyond the config: SigLIP needs a logit bias in the model."""
    if objective.name == "siglip":
        return {"init_logit_bias": objective.siglip.init_logit_bias}
    return {}


def model_sizes(recipe: Recipe) -> ModelSizes:
    try:
        config = dict(model_config(recipe.model))
    except ValueError:
        raise ConfigError("recipe", [f"model.name: {recipe.model.name!r} is not an open_clip model config"]) from None
    config.update(model_kwargs(recipe.objective))
    return ModelSizes(**vars(tower_sizes(config)), config=config)


def check_recipe(recipe: Recipe, world_size: int, source: str = "recipe") -> ModelSizes:
    """Every problem of ``recipe`` for a run on ``world_size`` ranks at once, as a ConfigError naming the keys."""
    problems = []
    if world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
    elif recipe.batch_size % world_size:
        problems.append(f"batch_size: {recipe.batch_size} does not split evenly over {world_size} ranks "
                        f"(nnodes x nproc_per_node); use a multiple of {world_size}")
    elif recipe.batch_size % (world_size * recipe.grad_accumulation):
        problems.append(f"batch_size: {recipe.batch_size} does not split into {world_size} ranks x "
                        f"grad_accumulation {recipe.grad_accumulation} equal micro-batches; use a multiple of "
                        f"{world_size * recipe.grad_accumulation}")
    sizes = model_sizes(recipe)
    for i, stage in enumerate(recipe.stages):
        key = f"stages[{i}] ({stage.name})"
        if stage.text.length is not None and stage.text.length > sizes.context_length:
            problems.append(f"{key}.text.length: {stage.text.length} is above the model's context length "
                            f"{sizes.context_length}")
        size = stage.image_size(sizes.image_size)
        if size % sizes.patch_size:
            problems.append(f"{key}.image.size: {size} is not a multiple of the model's patch size {sizes.patch_size}")
        if size > sizes.image_size:
            problems.append(f"{key}.image.size: {size} is above the model's image size {sizes.image_size}; CLIPA "
                            "stages reduce tokens")
        if stage.samples < recipe.batch_size:
            problems.append(f"{key}.samples: {stage.samples} is less than one global batch ({recipe.batch_size})")
    last = recipe.stages[-1]
    if len(recipe.stages) == 2 and (last.image_size(sizes.image_size) != sizes.image_size or last.image.mask != "none"
                                    or last.text_length(sizes.context_length) != sizes.context_length):
        problems.append(f"stages[1] ({last.name}): the finetune stage trains at full tokens; leave its image and text "
                        "settings unset")
    if problems:
        raise ConfigError(source, problems)
    return sizes


@dataclass(frozen=True)
class StagePlan:
    index: int
    stage: Stage
    steps: int  # optimizer steps in this stage: samples // global batch
    first_epoch: int  # the objectives' epoch number of this stage's epoch 0
    epochs: int  # epochs this stage starts (the last one may be partial)
    image_size: int  # the side its images are trained at (the stage's, or the model's)
    text_length: int  # the tokens its texts are trained at (the stage's, or the model's context length)


@dataclass(frozen=True)
class TrainPlan:
    stages: tuple[StagePlan, ...]
    steps_per_epoch: int

    @property
    def total_epochs(self) -> int:
        return self.stages[-1].first_epoch + self.stages[-1].epochs

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def global_step(self, stage: int, step: int) -> int:
        """Steps done before (stage, step): the run-wide step counter used in logs and checkpoint names."""
        return sum(s.steps for s in self.stages[:stage]) + step


def train_plan(recipe: Recipe, sizes: ModelSizes, steps_per_epoch: int) -> TrainPlan:
    """Lay the stages out in steps and epochs. ``steps_per_epoch``: the loader's (epoch samples // global batch)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    plans, first_epoch = [], 0
    for i, stage in enumerate(recipe.stages):
        steps = stage.samples // recipe.batch_size
        epochs = math.ceil(steps / steps_per_epoch)
        plans.append(StagePlan(i, stage, steps, first_epoch, epochs, image_size=stage.image_size(sizes.image_size),
                               text_length=stage.text_length(sizes.context_length)))
        first_epoch += epochs
    return TrainPlan(tuple(plans), steps_per_epoch)
