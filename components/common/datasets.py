"""The data contracts between ingest, preprocess, the training loader and evaluation.

Raw shards (ingest -> preprocess): img2dataset's own webdataset output, unchanged: per sample ``<key>.jpg``,
``<key>.txt`` and ``<key>.json`` (img2dataset's metadata: url, caption, status, sizes). Keys are img2dataset's,
not dense.

Training shards (preprocess -> train): one tar per shard, samples in dense-index order, per sample:

    <key>.img<S>.jpg   the image resized for training at side S, for every S in the manifest's "resolutions"
                       (the finetune resolution, plus the CLIPA pretrain resolution when the recipe has one)
    <key>.txt          the caption (UTF-8, stripped, non-empty)
    <key>.json         {"index": i, "words": [...], "pos_order": [...], "source_key": "<img2dataset key>"}
                       words: NLTK's word_tokenize of the caption; pos_order: NLTK POS priority per word
                       (1 noun, 2 adjective, 3 verb, 4 other), so the syntax mask at any text length needs no NLTK
                       at training time

``<key>`` is the dense index zero-padded to ``KEY_DIGITS`` digits. Nothing in a shard is ever unpickled.

Manifests are JSON written last (``components.common.manifest``), so their presence means the data is complete:

    RAW_SHARDS    {"shards": [{"uri", "samples"}], "counts": {"total", "success", "failed": {reason: n}},
                   "duration_s", "images_per_s", "options": {...}}, and after a demo ingest (components/demo)
                   "demo": {"seed", "limit_per_source", "heldout_fraction", "sources", "skipped_sources",
                            "heldout": {"parquet", "images", "samples"}}: where its held-out split is
    TRAIN_SHARDS  {"num_samples": N, "shards": [{"uri", "samples", "first_index", "sha256"}],
                   "resolutions": [S, ...], "rejected": {reason: n}, "sizes_uri": ".../sizes.json"}
"""

from __future__ import annotations

RAW_SHARDS = "raw-shards"
TRAIN_SHARDS = "train-shards"
KEY_DIGITS = 10

CAPTION_FIELD = "txt"
META_FIELD = "json"

# NLTK POS-tag priority of CLIPA's syntax mask: nouns first, then adjectives, then verbs, then the rest.
POS_PRIORITY = (("NN", 1), ("JJ", 2), ("VB", 3))
POS_OTHER = 4


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def image_field(size: int) -> str:
    """The field holding a sample's image at side ``size`` (webdataset strips the key and the dot)."""
    return f"img{size}.jpg"


def pos_order(tag: str) -> int:
    for prefix, order in POS_PRIORITY:
        if tag.startswith(prefix):
            return order
    return POS_OTHER
