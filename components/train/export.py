"""The trained model, exported for open_clip and the evaluate stage.

Under ``<output>/model/``:

    open_clip_model.pt       {"state_dict": tensors}: what open_clip's checkpoint loader reads
    open_clip_config.json    the open_clip config it was trained as (SigLIP's logit bias and the last stage's image
                             size included), so that ``open_clip.create_model_and_transforms(name, pretrained=path)``
                             loads it once the config is registered (``load_exported`` does both)
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
from components.common.manifest import read_manifest, write_manifest

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
    store.put_bytes(config_uri, json.dumps(config, indent=2, sort_keys=True).encode())
    return write_manifest(manifest_uri(output), MODEL, {
        "weights": weights_uri,
        "config": config_uri,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "bytes": len(weights),
        **body,
    })


def load_exported(output_or_manifest: str, device: str | torch.device = "cpu"):
    """(model, preprocess) of an exported model, through open_clip's own loader (weights_only=True)."""
    import tempfile
    from pathlib import Path

    import open_clip

    from components.common.open_clip_models import register_inline

    uri = output_or_manifest if output_or_manifest.endswith(".json") else manifest_uri(output_or_manifest)
    doc = read_manifest(uri, MODEL)
    name = register_inline(json.loads(store.get_bytes(doc["config"])))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS_NAME
        store.get_file(doc["weights"], path)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device,
                                                                     weights_only=True)
    return model, preprocess
