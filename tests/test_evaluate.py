"""The evaluate stage: metric parity with CLIP_benchmark, known answers, real end-to-end runs, bad inputs.

Parity reference: the clip-benchmark package itself (a dev dependency): its ``recall_at_k`` and ``batchify``
for retrieval and its ``balanced_accuracy_score`` (sklearn's) for mean per-class recall. Two pieces are written out
here from its definitions: the zero-shot classifier (``zero_shot_classifier`` needs a model and tokenizer; here the
class embeddings are given) and ``accuracy``, which fails under numpy 2.4.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_classification import balanced_accuracy_score
from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k
from PIL import Image

from components.common import store
from components.demo.benchmarks import benchmarks_from_sources
from components.evaluate import metrics as M
from components.evaluate.benchmark_data import (
    BenchmarkDataError,
    NewSample,
    iter_samples,
    open_benchmark,
    write_benchmark,
)
from components.evaluate.evaluate import EvaluateError, evaluate

TINY = {"embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


# ----------------------------------------------------------------------------------------------------------------
# Reference pieces written from CLIP_benchmark's definitions (the rest is imported from clip-benchmark)


def ref_classifier(class_embeddings: list[torch.Tensor]) -> torch.Tensor:
    weights = []
    for emb in class_embeddings:
        e = F.normalize(emb, dim=-1).mean(dim=0)
        e /= e.norm()
        weights.append(e)
    return torch.stack(weights, dim=1)


def ref_accuracy(output, target, topk=(1,)):
    """clip_benchmark's ``accuracy`` with one change: it fails under numpy 2.4 (``float`` of a 1-element array)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


# ----------------------------------------------------------------------------------------------------------------
# Metric parity and known answers


def test_classification_matches_clip_benchmark():
    g = torch.Generator().manual_seed(0)
    classes, dim, n = 12, 32, 300
    per_class = [torch.randn(4, dim, generator=g) for _ in range(classes)]
    images = torch.randn(n, dim, generator=g)
    target = torch.randint(0, classes, (n,), generator=g)
    classifier = M.zeroshot_classifier(per_class)
    torch.testing.assert_close(classifier, ref_classifier(per_class))
    logits = M.classification_logits(images, classifier)
    torch.testing.assert_close(logits, 100.0 * F.normalize(images, dim=-1) @ ref_classifier(per_class))
    got = M.classification_metrics(logits, target)["metrics"]
    acc1, acc5 = ref_accuracy(logits, target, topk=(1, 5))
    assert got["acc1"] == pytest.approx(acc1) and got["acc5"] == pytest.approx(acc5)
    assert got["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()))
    # Fewer than 5 classes: no acc5, as in CLIP_benchmark.
    assert set(M.classification_metrics(logits[:, :4], target % 4)["metrics"]) == {"acc1", "mean_per_class_recall"}


def test_retrieval_matches_clip_benchmark_with_several_captions_per_image():
    g = torch.Generator().manual_seed(1)
    num_images, dim = 40, 16
    counts = torch.randint(1, 4, (num_images,), generator=g)
    text_image = torch.repeat_interleave(torch.arange(num_images), counts)
    images = torch.randn(num_images, dim, generator=g)
    texts = images[text_image] + 1.5 * torch.randn(len(text_image), dim, generator=g)  # related, but noisy
    got = M.retrieval_metrics(images, texts, text_image)
    scores = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    for k in (1, 5, 10):
        image_ref = (batchify(recall_at_k, scores, positive, 7, "cpu", k=k) > 0).float().mean().item()
        text_ref = (batchify(recall_at_k, scores.T, positive.T, 7, "cpu", k=k) > 0).float().mean().item()
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(image_ref)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(text_ref)
    assert 0 < got["text_retrieval_recall@1"] < 1  # the case is not trivial


def test_known_answer_and_shuffled_labels_near_chance():
    g = torch.Generator().manual_seed(2)
    classes, dim, n = 10, 64, 2000
    directions = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    per_class = [directions[c] + 0.05 * torch.randn(3, dim, generator=g) for c in range(classes)]
    target = torch.randint(0, classes, (n,), generator=g)
    images = directions[target] + 0.05 * torch.randn(n, dim, generator=g)
    logits = M.classification_logits(images, M.zeroshot_classifier(per_class))
    right = M.classification_metrics(logits, target)["metrics"]
    assert right["acc1"] == 1.0 and right["mean_per_class_recall"] == 1.0 and right["acc5"] == 1.0
    shuffled = target[torch.randperm(n, generator=g)]
    wrong = M.classification_metrics(logits, shuffled)["metrics"]
    # Chance is 1/10; the standard error at n=2000 is 0.0067, so 0.04 is 6 standard errors.
    assert abs(wrong["acc1"] - 0.1) < 0.04 and abs(wrong["acc5"] - 0.5) < 0.07


# ----------------------------------------------------------------------------------------------------------------
# End to end with a real tiny open_clip model and real offline data


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def _tiny_checkpoint(prefix: str, config: dict = TINY) -> str:
    """A checkpoint as open_clip_train writes it: {"state_dict": ...} with DistributedDataParallel's prefixes."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    buf = io.BytesIO()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, buf)
    uri = store.join(prefix, "model", "epoch_1.pt")
    store.ensure_bucket(uri)
    store.put_bytes(uri, buf.getvalue())
    return uri


def test_evaluate_end_to_end(any_prefix):
    written = benchmarks_from_sources(store.join(any_prefix, "bench"), limit=500, heldout_fraction=0.1,
                                      sources=["animal_mnist"])
    assert written["animal_mnist"]["samples"] == 50  # 10 classes x 5 held-out images
    captions = [("a red square", "red"), ("a green square",), ("a blue square", "blue", "azure"), ("black",)] * 3
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)] * 3
    retrieval = write_benchmark(
        store.join(any_prefix, "bench", "squares"), task="zeroshot_retrieval", shard_size=5,
        samples=[NewSample(f"{i:03d}", _png(c), "png", captions=cap)
                 for i, (c, cap) in enumerate(zip(colors, captions))])
    assert retrieval["shards"] == 3
    checkpoint = _tiny_checkpoint(any_prefix)

    doc = evaluate(json.dumps(TINY), [written["animal_mnist"]["uri"], retrieval["uri"]], store.join(any_prefix, "eval"),
                   checkpoint=checkpoint, batch_size=16, device="cpu")

    assert json.loads(store.get_bytes(store.join(any_prefix, "eval", "metrics.json"))) == doc
    assert doc["model"] == {"name_or_config": json.dumps(TINY), "checkpoint": checkpoint}
    assert any("16 tokens" in note and "full context length" in note for note in doc["notes"])
    cls = doc["datasets"]["animal_mnist"]
    assert cls["task"] == "zeroshot_classification" and cls["num_samples"] == 50
    assert set(cls["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in cls["metrics"].values())
    assert cls["classnames"][0] == "bear" and len(cls["per_class_recall"]) == 10
    assert np.array(cls["confusion_matrix"]).sum() == 50 and np.array(cls["confusion_matrix"]).shape == (10, 10)
    assert len(cls["examples"]) == 8 and len(cls["examples"][0]["top"]) == 5
    thumb = Image.open(io.BytesIO(__import__("base64").b64decode(cls["examples"][0]["image_png_base64"])))
    assert max(thumb.size) <= 64
    ret = doc["datasets"]["squares"]
    assert ret["task"] == "zeroshot_retrieval" and ret["num_images"] == 12 and ret["num_texts"] == 21
    assert set(ret["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert ret["metrics"]["image_retrieval_recall@10"] >= ret["metrics"]["image_retrieval_recall@1"]
    assert len(ret["examples"]) == 8 and ret["examples"][2]["captions"] == ["a blue square", "blue", "azure"]
    assert len(ret["examples"][0]["top_captions"]) == 5
    # The report sits next to the metrics and shows them (percent, one decimal).
    html = store.get_bytes(store.join(any_prefix, "eval", "report.html")).decode()
    assert f"{100 * cls['metrics']['acc1']:.1f}" in html and "animal_mnist" in html and "squares" in html
    assert "animal_mnist" in store.get_bytes(store.join(any_prefix, "eval", "summary.md")).decode()


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _tiny_classification(path) -> str:
    samples = [NewSample(f"{i:03d}", _png((i * 40, 0, 0)), "png", label=i % 3) for i in range(6)]
    return write_benchmark(str(path), samples, task="zeroshot_classification", classnames=("a", "b", "c"),
                           templates=("a photo of a {c}.",), shard_size=3)["uri"]


def test_missing_classnames_is_named(tmp_path):
    uri = _tiny_classification(tmp_path / "ds")
    (tmp_path / "ds" / "classnames.txt").unlink()
    with pytest.raises(BenchmarkDataError, match="needs classnames.txt.*missing"):
        open_benchmark(uri)


def test_empty_shard_is_named(tmp_path):
    uri = _tiny_classification(tmp_path / "ds")
    with tarfile.open(tmp_path / "ds" / "test" / "1.tar", "w"):
        pass
    with pytest.raises(BenchmarkDataError, match=r"shard .*1\.tar of dataset ds is empty"):
        list(iter_samples(open_benchmark(uri)))


def test_nshards_mismatch_and_label_out_of_range_are_named(tmp_path):
    uri = _tiny_classification(tmp_path / "ds")
    (tmp_path / "ds" / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(BenchmarkDataError, match="says 3 shards.*holds 2"):
        open_benchmark(uri)
    (tmp_path / "ds" / "test" / "nshards.txt").write_text("2\n")
    (tmp_path / "ds" / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(BenchmarkDataError, match="label 2 out of range for 2 classes"):
        list(iter_samples(open_benchmark(uri)))


def test_checkpoint_for_another_architecture_is_named(tmp_path):
    uri = _tiny_classification(tmp_path / "ds")
    other = {**TINY, "embed_dim": 32, "vision_cfg": {**TINY["vision_cfg"], "width": 96, "patch_size": 16}}
    checkpoint = _tiny_checkpoint(tmp_path.as_uri(), other)
    with pytest.raises(EvaluateError, match=r"does not fit model .*embed_dim=32.*patch_size=16.*embed_dim=64"):
        evaluate(TINY, [uri], str(tmp_path / "out"), checkpoint=checkpoint, device="cpu")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_a_trained_tiny_model_is_far_above_chance_on_held_out_animals(tmp_path):
    """Train the tiny CLIP for a few seconds on Animal-MNIST images outside the held-out split, then evaluate it on
    that split: the whole path (benchmark writer, checkpoint loading, metrics, report) on a model that learned."""
    import hashlib

    from components.common.recipe import ObjectiveSpec
    from components.demo.sources import ANIMAL_CLASSES, animal_mnist_arrays
    from components.train.objectives import ObjectiveContext, build_objective

    written = benchmarks_from_sources((tmp_path / "bench").as_uri(), sources=["animal_mnist"], limit=None,
                                      heldout_fraction=0.1)
    heldout = {hashlib.sha256(np.asarray(s.image.convert("L")).tobytes()).digest()
               for s in iter_samples(open_benchmark(written["animal_mnist"]["uri"]))}
    images, labels = animal_mnist_arrays()
    train = [i for i in range(len(images)) if hashlib.sha256(images[i].tobytes()).digest() not in heldout]
    assert len(train) == len(images) - len(heldout) == 8744  # the held-out images are exactly excluded
    pixels = F.interpolate(torch.tensor(images[train], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 255, size=32,
                           mode="bilinear")
    pixels = (pixels - torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(
        open_clip.OPENAI_DATASET_STD)[:, None, None]
    targets = torch.tensor(labels[train])
    prompts = open_clip.SimpleTokenizer(context_length=16)([f"a silhouette of a {c}" for c in ANIMAL_CLASSES])
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY)
    objective = build_objective(ObjectiveSpec(name="clip"), ObjectiveContext())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    order = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = torch.randint(0, len(train), (128,), generator=order)
        loss = objective(*model(pixels[batch], prompts[targets[batch]])).loss
        optimizer.zero_grad()
        loss.backward()
        objective.optimizer_step(model, optimizer)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "trained.pt")

    doc = evaluate(json.dumps(TINY), [written["animal_mnist"]["uri"]], (tmp_path / "eval").as_uri(),
                   checkpoint=str(tmp_path / "trained.pt"), device="cpu")
    metrics = doc["datasets"]["animal_mnist"]["metrics"]
    assert doc["datasets"]["animal_mnist"]["num_samples"] == 972
    assert metrics["acc1"] > 0.3 and metrics["mean_per_class_recall"] > 0.3  # chance: 0.1 (972 samples, se ~ 0.015)
    assert (tmp_path / "eval" / "report.html").stat().st_size > 10_000
