"""The training recipe: what model to train, with which objective, on how many samples, in which CLIPA stages.

A recipe is a YAML file under ``configs/`` (see ``configs/demo.yaml``); ``load_recipe`` turns it into the frozen,
validated ``Recipe`` below. Preprocess reads it for resolutions and text lengths, train for everything else, evaluate
for the model. Defaults follow ``docs/objectives.md`` (FastCLIP's and AmorLIP's released code) and CLIPA's
recipe (lr = base_lr x global batch / 256; betas 0.9/0.95; weight decay 0.2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from components.common.config import Config, load_yaml, parse_yaml
from components.common.open_clip_models import model_config, tower_sizes

# The names a recipe may use; the code that dispatches on them derives its lists from these (typing.get_args).
ObjectiveName = Literal["clip", "siglip", "fastclip", "amorlip"]
ImageMask = Literal["none", "random", "grid", "block"]
TextMask = Literal["truncate", "random", "block", "syntax"]
FastClipVersion = Literal["v0", "v1", "v2", "v3"]
Divergence = Literal["log_l2", "kl_div_asym", "js_div"]


class ModelSpec(Config):
    """An open_clip model: a registered config name (built in, or shipped in components/common/model_configs/) or an
    inline config."""

    name: str | None = None
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if (self.name is None) == (self.config is None):
            raise ValueError("give exactly one of 'name' (an open_clip config name) or 'config' (an inline config)")
        return self

    def native_image_size(self) -> int:
        """The image side the model is built for (the finetune stage's default)."""
        config = self.config
        if config is None:
            try:
                config = model_config(self.name)
            except ValueError:
                raise ValueError(f"model.name: {self.name!r} is not an open_clip model config") from None
        return tower_sizes(config).image_size


class SigLipSettings(Config):
    init_logit_scale: float = Field(math.log(10.0), ge=0.0, le=math.log(100.0))
    init_logit_bias: float = -10.0


class FastClipSettings(Config):
    """FastCLIP (Wei et al. 2024). v0: GCL, learnable tau; v1: constant tau; v2: per-sample tau; v3: RGCL-g."""

    version: FastClipVersion = "v3"
    gamma_schedule: Literal["cosine", "constant"] = "cosine"  # constant + v1/v2 = SogCLR / iSogCLR
    gamma_min: float = Field(0.2, gt=0.0, le=1.0)
    gamma_decay_epochs: int = Field(10, ge=1)
    rho: float = Field(8.0, ge=0.0)
    eps: float = Field(1e-14, gt=0.0, lt=1.0)
    temperature_init: float = Field(0.07, ge=0.01, le=1.0)
    lr_tau: float | None = Field(None, gt=0.0)  # None: the model's lr, as in the reference code
    # "code" reproduces the released implementation's temperature gradient (the published rho values were tuned with
    # it); "paper" uses the gradient of the objective as written in the paper. See docs/objectives.md A.3 item 6.
    tau_gradient: Literal["code", "paper"] = "code"


class AmorLipSettings(Config):
    """AmorLIP (Sun et al. 2025): lambda networks amortise each sample's partition function."""

    divergence: Divergence = "log_l2"
    div_reg_coef: float = Field(0.1, ge=0.0)
    hidden_factor: float = Field(1.0, gt=0.0)
    lambda_lr: float = Field(1e-3, gt=0.0)
    lambda_steps: int = Field(3, ge=1)  # T_lambda: inner Adam steps per training step
    lambda_every: int = Field(1, ge=1)  # T_online: fit lambda every n training steps
    target_every: int = Field(2, ge=1)  # T_target: EMA update of the target network every n steps
    ema_decay: float = Field(0.92, ge=0.0, lt=1.0)
    beta_max: float = Field(0.8, ge=0.0, le=1.0)
    beta_ramp_epochs: int = Field(16, ge=1)
    reinit_every_epochs: int = Field(1, ge=1)
    pos_coef: float = Field(1e-3, ge=0.0, le=1.0)
    rho: list[float] = Field(default_factory=lambda: [8.5, -8.5, -8.5], min_length=1)
    lr_tau: float = Field(1e-4, gt=0.0)
    temperature_init: float = Field(0.07, ge=0.01, le=1.0)


class ObjectiveSpec(Config):
    name: ObjectiveName = "clip"
    siglip: SigLipSettings = SigLipSettings()
    fastclip: FastClipSettings = FastClipSettings()
    amorlip: AmorLipSettings = AmorLipSettings()

    @model_validator(mode="before")
    @classmethod
    def _settings_match_name(cls, data: Any) -> Any:
        if isinstance(data, dict):
            name = data.get("name", "clip")
            for block in SETTINGS_BLOCKS:
                if block in data and block != name:
                    raise ValueError(f"settings block '{block}' given but objective.name is {name!r}")
        return data


# The objectives with a settings block of their own: the ObjectiveSpec fields named after an objective.
SETTINGS_BLOCKS = tuple(name for name in get_args(ObjectiveName) if name in ObjectiveSpec.model_fields)


class ImageTokens(Config):
    """How many image tokens a stage uses: a smaller size (fewer patches) and/or a patch mask."""

    size: int | None = Field(None, ge=8)  # None: the model's native image size
    mask: ImageMask = "none"
    keep: float = Field(1.0, gt=0.0, le=1.0)  # fraction of patches kept by the random and block masks

    @model_validator(mode="after")
    def _keep_matches_mask(self) -> "ImageTokens":
        if self.mask in ("random", "block") and self.keep == 1.0:
            raise ValueError(f"mask {self.mask!r} needs keep < 1 (the fraction of patches kept)")
        if self.mask in ("none", "grid") and self.keep != 1.0:
            raise ValueError(f"keep applies only to the random and block masks, not {self.mask!r}")
        return self


class TextTokens(Config):
    length: int | None = Field(None, ge=3)  # None: the model's context length; 3 = SOT + 1 token + EOT
    mask: TextMask = "truncate"


class Augmentation(Config):
    """Train-time image augmentation, applied per sample in the loader workers (``train/data/augment.py``).

    The defaults are open_clip_train's (``open_clip.transform.AugmentationCfg`` as ``image_transform(is_train=True)``
    uses it): a random resized crop of 90-100 % of the area at aspect ratios 3/4-4/3, bicubic, no colour jitter, no
    grayscale, no flip. CLIPA's L/H recipes use scale (0.4, 1.0), colour jitter (0.32, 0.32, 0.32, 0.08) at p 0.8 and
    grayscale p 0.2.
    """

    scale: tuple[float, float] = (0.9, 1.0)  # fraction of the image's area the crop covers
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio (width / height)
    color_jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    color_jitter_prob: float = Field(0.0, ge=0.0, le=1.0)
    grayscale_prob: float = Field(0.0, ge=0.0, le=1.0)
    hflip_prob: float = Field(0.0, ge=0.0, le=1.0)  # off by default: flipping breaks captions that say left/right

    @model_validator(mode="after")
    def _ranges(self) -> "Augmentation":
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {list(self.ratio)}")
        if self.color_jitter is not None:
            *bcs, hue = self.color_jitter
            if not all(v >= 0.0 for v in bcs) or not 0.0 <= hue <= 0.5:
                raise ValueError(f"color_jitter needs brightness, contrast, saturation >= 0 and hue in [0, 0.5], "
                                 f"got {list(self.color_jitter)}")
        if self.color_jitter_prob > 0.0 and self.color_jitter is None:
            raise ValueError("color_jitter_prob > 0 needs color_jitter (brightness, contrast, saturation, hue)")
        return self


class Stage(Config):
    """One CLIPA stage: stage 1 pretrains at reduced tokens, stage 2 finetunes at full tokens."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    samples: int = Field(gt=0)  # samples seen in this stage
    base_lr: float = Field(gt=0)  # lr = base_lr x global batch / 256 (CLIPA's rule)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)  # fraction of the stage's steps
    image: ImageTokens = ImageTokens()
    text: TextTokens = TextTokens()
    # none (or null): every epoch sees the stored pixels (resized and centre-cropped only if a shard holds another size)
    augment: Augmentation | None = Augmentation()

    @field_validator("augment", mode="before")
    @classmethod
    def _none_is_off(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "none":
                raise ValueError(f"augment is none or a block of settings (scale, ratio, ...), got {value!r}")
            return None
        return value

    # The one place the rule "a stage's own size, or else the model's" is written; StagePlan holds the results.
    def image_size(self, native: int) -> int:
        return self.image.size or native

    def text_length(self, context_length: int) -> int:
        return self.text.length or context_length


class OptimizerSpec(Config):
    name: Literal["adamw", "lamb"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.2, ge=0.0)
    grad_clip_norm: float | None = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimizerSpec":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class CheckpointSpec(Config):
    every_steps: int | None = Field(500, ge=1)
    every_minutes: float | None = Field(30.0, gt=0.0)
    keep: int = Field(3, ge=1)


class DataSpec(Config):
    workers: int = Field(4, ge=0)
    shuffle_buffer: int = Field(2000, ge=0)
    epoch_samples: int | None = Field(None, gt=0)  # virtual epoch length; None: the dataset's size


class Recipe(Config):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    seed: int = 0
    model: ModelSpec
    objective: ObjectiveSpec = ObjectiveSpec()
    batch_size: int = Field(gt=0)  # global batch, split evenly over the ranks
    precision: Literal["auto", "fp32", "amp_bf16"] = "auto"  # auto: amp_bf16 on CUDA, fp32 on a CPU
    grad_checkpointing: bool = False
    # Micro-batches per optimizer step: each rank's batch runs as this many forward/backward passes with the same
    # gradient as one (train/accumulation.py), for a global batch larger than fits in memory.
    grad_accumulation: int = Field(1, ge=1)
    compile: Literal["auto"] | bool = "auto"  # torch.compile the model; auto: on CUDA yes, on a CPU no
    optimizer: OptimizerSpec = OptimizerSpec()
    stages: list[Stage] = Field(min_length=1, max_length=2)
    checkpoint: CheckpointSpec = CheckpointSpec()
    data: DataSpec = DataSpec()

    @model_validator(mode="after")
    def _unique_stage_names(self) -> "Recipe":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    def document(self) -> dict[str, Any]:
        """The recipe as a YAML-ready dict that loads back to an equal Recipe (only the objective's own settings
        block; the validator refuses the blocks of other objectives)."""
        doc = self.model_dump(mode="json")
        name = self.objective.name
        doc["objective"] = {"name": name, **({name: doc["objective"][name]} if name in doc["objective"] else {})}
        return doc

    def lr(self, stage: Stage) -> float:
        return stage.base_lr * self.batch_size / 256

    def resolutions(self) -> tuple[int, ...]:
        """Every image side some stage trains at: what preprocess stores per sample."""
        native = self.model.native_image_size()
        return tuple(sorted({stage.image_size(native) for stage in self.stages}))


def load_recipe(path: str | Path) -> Recipe:
    return load_yaml(Recipe, path)


def parse_recipe(text: str, source: str = "<text>") -> Recipe:
    return parse_yaml(Recipe, text, source)
