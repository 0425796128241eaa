"""NLTK data built offline from pinned packages: stock word_tokenize and pos_tag work with it, and only with it."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from components.preprocess import nltk_data

# NLTK's own doctest for pos_tag, produced with the tagger NLTK downloads: the rebuilt model must agree.
SENTENCE = "John's big idea isn't all that bad."
TAGS = [["John", "NNP"], ["'s", "POS"], ["big", "JJ"], ["idea", "NN"], ["is", "VBZ"], ["n't", "RB"],
        ["all", "PDT"], ["that", "DT"], ["bad", "JJ"], [".", "."]]

_USE = """
import json, sys, nltk
from components.preprocess import nltk_data
nltk_data.main(["--dir", sys.argv[1]])
print(json.dumps({
    "tags": nltk.pos_tag(nltk.word_tokenize(sys.argv[2])),
    "sentences": nltk.sent_tokenize("Dr. Smith went home. He was tired."),
    "tagger": str(nltk.data.find("taggers/averaged_perceptron_tagger_eng/")),
    "punkt": str(nltk.data.find("tokenizers/punkt_tab/english/")),
}))
"""


def _build_and_use(root: Path) -> dict:
    # NLTK_DATA puts the fresh root first on NLTK's search path; the dead proxy makes any download attempt fail.
    env = {**os.environ, "NLTK_DATA": str(root), "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY":
           "http://127.0.0.1:9", "NO_PROXY": ""}
    done = subprocess.run([sys.executable, "-c", _USE, str(root), SENTENCE], env=env, capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_build_offline_then_stock_nltk_works(tmp_path):
    root = tmp_path / "nltk_data"
    result = _build_and_use(root)
    assert result["tags"] == TAGS
    assert result["sentences"] == ["Dr. Smith went home.", "He was tired."]
    assert result["tagger"].startswith(str(root)) and result["punkt"].startswith(str(root))
    built = [(nltk_data.TAGGER_DIR, nltk_data.TAGGER_FILES), (nltk_data.PUNKT_DIR, nltk_data.PUNKT_FILES)]
    assert all((root / directory / f).is_file() for directory, files in built for f in files)
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))  # readable by any pod user

    # Idempotent: a second build leaves the data as it is.
    before = {p: p.stat().st_ino for p in root.rglob("*")}
    assert _build_and_use(root)["tags"] == TAGS
    assert {p: p.stat().st_ino for p in root.rglob("*")} == before


def test_tagger_pickle_may_only_build_a_set():
    payload = pickle.dumps(os.system)  # a reference to a global that could run a command on load
    with pytest.raises(pickle.UnpicklingError, match="only set is allowed"):
        nltk_data._SetOnlyUnpickler(io.BytesIO(payload)).load()
    assert nltk_data._SetOnlyUnpickler(io.BytesIO(pickle.dumps(({"w": 1.0}, {}, {"NN"}), 2))).load()[2] == {"NN"}
