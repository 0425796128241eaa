"""CLIPA's syntax mask split in two: NLTK tagging once here, at preprocess time; word selection at training time.

open_clip's ``syntax_mask_tokenize`` tags every caption with NLTK at every step. Preprocessing stores each
caption's words and POS priorities instead (``caption_pos``), and the training loader rebuilds the masked text for
any context length from them (``components/train/text_masks.syntax_masked_text``) without NLTK. Tokenizing that text
with open_clip's plain tokenizer gives the same tokens as ``syntax_mask_tokenize`` on the caption (tested in
tests/test_preprocess.py).
"""

from __future__ import annotations

from components.common import datasets


def caption_pos(caption: str) -> tuple[list[str], list[int]]:
    """The caption's words (``nltk.word_tokenize``) and each word's syntax-mask priority (``datasets.pos_order``),
    computed exactly as open_clip's ``syntax_mask_tokenize`` does."""
    import nltk  # imported here: NLTK's import is slow and only this function needs it

    words = nltk.tokenize.word_tokenize(caption)
    return words, [datasets.pos_order(tag) for _, tag in nltk.pos_tag(words)]
