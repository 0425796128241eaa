"""open_clip model configs by name: the ones open_clip ships, the ones clipline ships in ``model_configs/``
(upstream deleted the CLIPA configs; see components/train/clipa.py for what they are), and inline configs from a
recipe or a command line, registered under a name derived from their content so the same config always gets the
same name. Train, evaluate and the recipe's resolution logic all resolve models here."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered_inline: set[str] = set()


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def register_model_configs() -> list[str]:
    """Register ``model_configs/`` with open_clip (idempotent); returns the shipped config names."""
    import open_clip
    from open_clip import factory

    if not any(Path(p).resolve() == MODEL_CONFIG_DIR.resolve() for p in factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return shipped_config_names()


def register_inline(config: Mapping[str, Any]) -> str:
    """Register an inline open_clip config; returns its name, ``clipline-inline-<hash of the config>``."""
    import open_clip

    text = json.dumps(config, sort_keys=True)
    name = f"clipline-inline-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if name not in _registered_inline:
        # open_clip registers configs only from files: a directory holding exactly this one.
        config_dir = Path(tempfile.mkdtemp(prefix="clipline-model-config-"))
        (config_dir / f"{name}.json").write_text(text)
        open_clip.add_model_config(config_dir)
        _registered_inline.add(name)
    return name


def resolve_model_name(model: str | Mapping[str, Any] | Any) -> str:
    """An open_clip config name for a name, an inline config dict or a recipe ModelSpec (``.name`` / ``.config``)."""
    register_model_configs()
    if isinstance(model, str):
        return model
    if isinstance(model, Mapping):
        return register_inline(model)
    if getattr(model, "name", None) is not None:
        return model.name
    if getattr(model, "config", None) is not None:
        return register_inline(model.config)
    raise ValueError(f"not a model name, config or ModelSpec: {model!r}")


def model_config(model: str | Mapping[str, Any] | Any) -> dict[str, Any]:
    import open_clip

    name = resolve_model_name(model)
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"{name!r} is not an open_clip model config")
    return config


# open_clip's text towers default to 77 tokens when a config leaves text_cfg.context_length out (CLIPTextCfg).
DEFAULT_CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class TowerSizes:
    """The sizes an open_clip config builds its towers at: what "full tokens" means for that model."""

    image_size: int  # image side (configs give an int or a [h, w] pair; clipline trains square images)
    patch_size: int
    context_length: int
    embed_dim: int


def tower_sizes(config: Mapping[str, Any]) -> TowerSizes:
    vision, text = config["vision_cfg"], config["text_cfg"]

    def side(value: int | list[int] | tuple[int, ...]) -> int:
        return value if isinstance(value, int) else int(value[0])

    return TowerSizes(
        image_size=side(vision["image_size"]),
        patch_size=side(vision.get("patch_size", 1)),
        context_length=int(text.get("context_length", DEFAULT_CONTEXT_LENGTH)),
        embed_dim=int(config["embed_dim"]),
    )
