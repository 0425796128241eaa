"""The evaluate stage: zero-shot classification and retrieval of an open_clip model on benchmark datasets.

Writes ``<output_prefix>/metrics.json`` (atomically) and returns the same document:

    {"model": {"name_or_config", "checkpoint"}, "notes": [...], "datasets": {name: result}}

A classification result holds task, num_samples, metrics (acc1, acc5 with >= 5 classes, mean_per_class_recall),
classnames, per_class_recall, confusion_matrix (<= 30 classes) and 8 examples with their top-5 classes; a retrieval
result holds task, num_images, num_texts, metrics (image_/text_retrieval_recall@1/5/10) and 8 examples with their
top-5 captions. Metric definitions: metrics.py.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from components.common import store
from components.common.device import resolve_device
from components.common.open_clip_models import register_inline, register_model_configs
from components.evaluate import metrics as M
from components.evaluate.benchmark_data import Benchmark, Sample, iter_samples, open_benchmark
from components.evaluate.report import write_report

METRICS_FILE = "metrics.json"
NUM_EXAMPLES = 8
THUMBNAIL = 64
MAX_CONFUSION_CLASSES = 30
RECALL_KS = (1, 5, 10)

ModelSpec = str | dict[str, Any]


class EvaluateError(RuntimeError):
    """The model or a dataset cannot be evaluated; the message says why."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    context_length: int
    device: torch.device


# ----------------------------------------------------------------------------------------------------------------
# Model


def model_name(spec: ModelSpec) -> str:
    """An open_clip model name for ``spec``: a built-in name, or an inline config (dict, JSON text or a JSON file
    path/URI) registered with open_clip under a name derived from its content."""
    if isinstance(spec, str) and not spec.lstrip().startswith("{") and not spec.endswith(".json"):
        register_model_configs()  # clipline's shipped configs resolve by name too
        return spec
    if isinstance(spec, dict):
        config = spec
    elif spec.lstrip().startswith("{"):
        config = json.loads(spec)
    else:
        try:
            config = store.get_json(spec)
        except store.ObjectNotFound:
            raise EvaluateError(f"model config {spec} is missing") from None
    config = config.get("model_cfg", config)  # open_clip's own open_clip_config.json nests it
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise EvaluateError(f"model config lacks {missing}: {json.dumps(config)[:200]}")
    return register_inline(config)


def load_model(spec: ModelSpec, checkpoint: str | None, device: str = "auto",
               text_length: int | None = None) -> LoadedModel:
    """An open_clip model in eval mode, weights from ``checkpoint`` (a path, file:// or s3:// URI; None: random init).

    open_clip loads .pt/.pth checkpoints with torch.load(weights_only=True), takes the weights from "state_dict"
    when present and strips DistributedDataParallel's "module." prefixes, so open_clip_train checkpoints load as is."""
    import open_clip

    name = model_name(spec)
    with _local_checkpoint(checkpoint) as path:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=path, weights_only=True)
        except RuntimeError as exc:
            if path is not None and any(s in str(exc) for s in ("size mismatch", "Missing key", "Unexpected key")):
                raise EvaluateError(
                    f"checkpoint {checkpoint} does not fit model {spec if isinstance(spec, str) else name}: "
                    f"the checkpoint is {_describe_checkpoint(path)}, the model is {_describe_config(name)}"
                ) from None
            raise EvaluateError(f"cannot build model {name} from checkpoint {checkpoint}: {exc}") from None
    dev = resolve_device(device)
    model = model.to(dev).eval()
    context_length = int(getattr(model, "context_length", 77))
    if text_length is not None and not 1 <= text_length <= context_length:
        raise EvaluateError(f"text_length {text_length} must be in [1, {context_length}] for model {name}")
    tokenizer = open_clip.get_tokenizer(name, context_length=text_length or context_length)
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, name=name,
                       context_length=text_length or context_length, device=dev)


@contextlib.contextmanager
def _local_checkpoint(uri: str | None) -> Iterator[str | None]:
    if uri is None or "://" not in uri or uri.startswith("file://"):
        path = None if uri is None else str(store.local_path(uri))
        if path is not None and not Path(path).is_file():
            raise EvaluateError(f"checkpoint {uri} is missing")
        yield path
        return
    # open_clip reads local files only; the suffix is kept because it picks the loader (.safetensors or torch).
    suffix = Path(uri).suffix or ".pt"
    with tempfile.TemporaryDirectory(prefix="clipline-ckpt-") as tmp:
        path = Path(tmp) / f"checkpoint{suffix}"
        try:
            store.get_file(uri, path)
        except store.ObjectNotFound:
            raise EvaluateError(f"checkpoint {uri} is missing") from None
        yield str(path)


def _describe_checkpoint(path: str) -> str:
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - only for the message
        return f"unreadable ({exc})"
    shape = lambda k: tuple(state[k].shape) if k in state else None  # noqa: E731
    text_proj, conv, pos = shape("text_projection"), shape("visual.conv1.weight"), shape("positional_embedding")
    parts = []
    if text_proj:
        parts.append(f"embed_dim={text_proj[1]}, text width={text_proj[0]}")
    if conv:
        parts.append(f"vision width={conv[0]}, patch_size={conv[2]}")
    if pos:
        parts.append(f"context_length={pos[0]}")
    return "(" + ", ".join(parts or [f"{len(state)} tensors"]) + ")"


def _describe_config(name: str) -> str:
    import open_clip

    cfg = open_clip.get_model_config(name) or {}
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return (f"{name} (embed_dim={cfg.get('embed_dim')}, text width={t.get('width')}, vision width={v.get('width')}, "
            f"patch_size={v.get('patch_size')}, context_length={t.get('context_length')})")


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def _autocast(device: torch.device):
    # bf16 on CUDA only: CPU autocast is slow and changes results for nothing.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(iterable: Iterable, desc: str) -> Iterable:
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="sample")


def _batches(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def encode_images(lm: LoadedModel, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.stack([lm.preprocess(im) for im in images]).to(lm.device)
    with _autocast(lm.device):
        return F.normalize(lm.model.encode_image(pixels).float(), dim=-1).cpu()


@torch.no_grad()
def encode_texts(lm: LoadedModel, texts: list[str], batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = lm.tokenizer(texts[start:start + batch_size]).to(lm.device)
        with _autocast(lm.device):
            out.append(lm.model.encode_text(tokens).float().cpu())
    return torch.cat(out)


def thumbnail_png_base64(image: Image.Image) -> str:
    thumb = image.copy()
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------------------------
# Tasks


def evaluate_classification(lm: LoadedModel, bench: Benchmark, batch_size: int) -> dict[str, Any]:
    per_class = [encode_texts(lm, [t.format(c=c) for t in bench.templates], batch_size) for c in bench.classnames]
    classifier = M.zeroshot_classifier(per_class)
    logits, targets, examples = [], [], []
    for batch in _batches(_progress(iter_samples(bench), bench.name), batch_size):
        batch_logits = M.classification_logits(encode_images(lm, [s.image for s in batch]), classifier)
        logits.append(batch_logits)
        targets.append(torch.tensor([s.label for s in batch]))
        for s, row in zip(batch[:NUM_EXAMPLES - len(examples)], batch_logits):
            probs = row.softmax(dim=0)
            top = probs.topk(min(5, len(bench.classnames)))
            examples.append({"image_png_base64": thumbnail_png_base64(s.image), "label": bench.classnames[s.label],
                             "top": [[bench.classnames[i], round(p, 6)]
                                     for p, i in zip(top.values.tolist(), top.indices.tolist())]})
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    result = M.classification_metrics(all_logits, all_targets)
    out: dict[str, Any] = {
        "task": "zeroshot_classification", "num_samples": len(all_targets), "metrics": result["metrics"],
        "classnames": list(bench.classnames), "per_class_recall": result["per_class_recall"],
    }
    if len(bench.classnames) <= MAX_CONFUSION_CLASSES:
        out["confusion_matrix"] = result["confusion"].tolist()
    out["examples"] = examples
    return out


def evaluate_retrieval(lm: LoadedModel, bench: Benchmark, batch_size: int) -> dict[str, Any]:
    image_emb, texts, text_image, kept = [], [], [], []
    for batch in _batches(_progress(iter_samples(bench), bench.name), batch_size):
        for i, s in enumerate(batch, start=sum(len(e) for e in image_emb)):
            texts += s.captions
            text_image += [i] * len(s.captions)
        image_emb.append(encode_images(lm, [s.image for s in batch]))
        kept += batch[:NUM_EXAMPLES - len(kept)]
    images = torch.cat(image_emb)
    text_emb = F.normalize(encode_texts(lm, texts, batch_size), dim=-1)
    index = torch.tensor(text_image)
    metrics = M.retrieval_metrics(images, text_emb, index, RECALL_KS)
    examples = []
    for i, s in enumerate(kept):
        top = (text_emb @ images[i]).topk(min(5, len(texts))).indices.tolist()
        examples.append({"image_png_base64": thumbnail_png_base64(s.image), "captions": list(s.captions),
                         "top_captions": [texts[j] for j in top]})
    return {"task": "zeroshot_retrieval", "num_images": len(images), "num_texts": len(texts),
            "metrics": metrics, "examples": examples}


# ----------------------------------------------------------------------------------------------------------------
# Stage


def evaluate(model_spec: ModelSpec, datasets: list[str], output_prefix: str, *, checkpoint: str | None = None,
             batch_size: int = 64, device: str = "auto", text_length: int | None = None,
             training_log: str | None = None) -> dict[str, Any]:
    """Evaluate the model on every dataset (local path, file:// or s3:// prefix in CLIP_benchmark's layout),
    write ``<output_prefix>/metrics.json`` and the report (report.html with the training curves of
    ``training_log`` when given, summary.md) next to it, and return the metrics document."""
    if not datasets:
        raise EvaluateError("no dataset to evaluate on")
    if batch_size < 1:
        raise EvaluateError(f"batch_size must be at least 1, got {batch_size}")
    benches = [open_benchmark(d) for d in datasets]  # every dataset checked before the model is even built
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise EvaluateError(f"two datasets share a name (the last part of their URI): {names}")
    lm = load_model(model_spec, checkpoint, device, text_length)
    notes = [
        f"text encoded at {lm.context_length} tokens "
        + ("(the model's full context length, even if it was pretrained with a shortened or masked text, "
           "as in CLIPA stage 1)" if text_length is None else f"(text_length override; the model's is "
                                                               f"{getattr(lm.model, 'context_length', '?')})"),
        f"device {lm.device}" + (", bf16 autocast" if lm.device.type == "cuda" else ", fp32"),
    ]
    results: dict[str, Any] = {}
    for bench in benches:
        if bench.task == "zeroshot_classification":
            results[bench.name] = evaluate_classification(lm, bench, batch_size)
            if len(bench.classnames) < 5:
                notes.append(f"{bench.name}: acc5 omitted (fewer than 5 classes)")
        else:
            results[bench.name] = evaluate_retrieval(lm, bench, batch_size)
            r = results[bench.name]
            if min(r["num_images"], r["num_texts"]) < max(RECALL_KS):
                notes.append(f"{bench.name}: recall@k with k above the number of candidates counts all of them")
    doc = {"model": {"name_or_config": model_spec, "checkpoint": checkpoint}, "notes": notes, "datasets": results}
    store.ensure_bucket(output_prefix)
    store.put_json(store.join(output_prefix, METRICS_FILE), doc)
    write_report(doc, output_prefix, training_log=training_log)
    return doc
