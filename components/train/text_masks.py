"""CLIPA's text masks for the training loader: which tokens of a caption a stage keeps.

``truncate`` and ``syntax`` use open_clip's plain tokenizer; ``random`` and ``block`` are open_clip's
``SimpleTokenizer`` reduction masks. The syntax mask's word choice needs each caption's words and POS priorities,
which preprocess computed once with NLTK (``components/preprocess/syntax_mask.caption_pos``, stored in each sample's
json as the training-shard contract in ``components/common/datasets.py`` says); ``syntax_masked_text`` rebuilds the
kept words from them at any context length, without NLTK, exactly as open_clip's ``syntax_mask_tokenize`` chooses
them (tested against it in tests/test_preprocess.py).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Sequence, get_args

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer

from components.common.recipe import TextMask

TEXT_MASKS = get_args(TextMask)
# open_clip's name for each CLIPA text mask (SimpleTokenizer's reduction_mask). Truncate and syntax use the plain
# tokenizer: syntax picks its words first (from the POS ranks preprocess stored) and then truncates like open_clip.
_REDUCTION_MASK = {"truncate": "", "random": "random", "block": "simple", "syntax": ""}




@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """open_clip's masks draw from the global RNGs (``torch.randperm``, ``random.randint``): seed them for one call
    and restore them afterwards, so the trainer's own random streams are untouched when workers=0."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would reseed CUDA as well
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def tokenize(
    tokenizer: SimpleTokenizer,
    mask: str,
    texts: Sequence[str],
    words: Sequence[Sequence[str]],
    pos_order: Sequence[Sequence[int]],
    seed: int,
) -> torch.Tensor:
    """Token ids (len(texts), tokenizer.context_length) under one of CLIPA's text masks, seeded by ``seed``.

    ``tokenizer`` must be ``text_tokenizer(mask, length)``. The syntax mask ignores ``texts`` and rebuilds each
    caption from its stored words and POS ranks, then truncates exactly as open_clip's ``syntax_mask_tokenize``.
    """
    if mask == "syntax":
        texts = [syntax_masked_text(w, p, tokenizer.context_length) for w, p in zip(words, pos_order)]
    with _seeded_global_rngs(seed):
        return tokenizer(list(texts))


def text_tokenizer(mask: str, length: int) -> SimpleTokenizer:
    if mask not in TEXT_MASKS:
        raise ValueError(f"unknown text mask {mask!r}; expected one of {', '.join(TEXT_MASKS)}")
    return SimpleTokenizer(context_length=length, reduction_mask=_REDUCTION_MASK[mask])


def syntax_masked_text(words: Sequence[str], pos_order: Sequence[int], context_length: int) -> str:
    """The words open_clip's syntax mask keeps at ``context_length`` (two slots go to start and end tokens),
    in caption order, joined by spaces.

    Mirrors open_clip operation by operation, because ties decide which words survive: ``np.argsort``'s default
    kind on an int64 array (its tie order is numpy's, so it is replayed, not re-implemented with a stable sort),
    then the first ``context_length - 2`` positions, sorted back to caption order, taken from a numpy string array.
    """
    if len(words) != len(pos_order):
        raise ValueError(f"{len(words)} words but {len(pos_order)} POS orders")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
    if not words:
        return ""
    sorted_ids = np.argsort(np.array(pos_order))
    sampled_ids = sorted(sorted_ids[: context_length - 2])
    return " ".join(str(w) for w in np.take(np.array(words), sampled_ids, axis=0)).strip()
