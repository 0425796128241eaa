"""The trained model, exported for open_clip and the evaluate stage.

Under ``<output>/model/``:

    open_clip_model.pt       {"state_dict": tensors}: what open_clip's checkpoint loader reads
    open_clip_config.json    the open_clip config it was trained as (SigLIP's logit bias and the last stage's image
                             size included), so that ``open_clip.create_model_and_transforms(name, pretrained=path)``
                             loads it once the config is registered (``components.evaluate.evaluate.load_model``,
                             the one loader, does both)
    manifest.json            kind "model": both URIs, the sha256 of the weights, the recipe, the training metrics

The manifest is written last: its presence means the model is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import torch

from components.common import store
from components.common.manifest import write_manifest

MODEL = "model"  # the manifest kind
WEIGHTS_NAME = "open_clip_model.pt"
CONFIG_NAME = "open_clip_config.json"


def model_prefix(output: str) -> str:
    return store.join(output, "model")


def manifest_uri(output: str) -> str:
    return store.join(model_prefix(output), "manifest.json")


def export_config(config: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The open_clip config of the exported model: ``config`` at the image size the last stage trained at."""
    exported = json.loads(json.dumps(config))
    exported["vision_cfg"]["image_size"] = image_size
    return exported


def export_model(output: str, model: torch.nn.Module, config: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    prefix = model_prefix(output)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    weights = buffer.getvalue()
    weights_uri, config_uri = store.join(prefix, WEIGHTS_NAME), store.join(prefix, CONFIG_NAME)
    store.put_bytes(weights_uri, weights)
    store.put_json(config_uri, config)
    return write_manifest(manifest_uri(output), MODEL, {
        "weights": weights_uri,
        "config": config_uri,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "bytes": len(weights),
        **body,
    })
