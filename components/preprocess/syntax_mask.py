"""CLIPA's syntax mask split in two: NLTK tagging once at preprocess time, word selection at training time.

open_clip's ``syntax_mask_tokenize`` tags every caption with NLTK at every step. Preprocessing stores each
caption's words and POS priorities instead (``caption_pos``), and the training loader rebuilds the masked text for
any context length from them (``syntax_masked_text``) without NLTK. Tokenizing that text with open_clip's plain
tokenizer gives the same tokens as ``syntax_mask_tokenize`` on the caption (tested in tests/test_preprocess.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from components.common import datasets


def caption_pos(caption: str) -> tuple[list[str], list[int]]:
    """The caption's words (``nltk.word_tokenize``) and each word's syntax-mask priority (``datasets.pos_order``),
    computed exactly as open_clip's ``syntax_mask_tokenize`` does."""
    import nltk  # only preprocessing needs NLTK; the training loader imports this module without it

    words = nltk.tokenize.word_tokenize(caption)
    return words, [datasets.pos_order(tag) for _, tag in nltk.pos_tag(words)]


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
