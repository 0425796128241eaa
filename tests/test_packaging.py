"""The installed environment matches the pins: one torch, the pinned stack, the console script."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_runtime_pins_are_exact_and_installed():
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, op, version = re.match(r"([A-Za-z0-9_.-]+)\s*(==|>=)?\s*([^,;\s]*)", requirement).groups()
        installed = metadata.version(name)
        if op == "==":
            assert installed == version, f"{name}: pinned {version}, installed {installed}"


def test_exactly_one_torch():
    torches = [d for d in metadata.distributions() if d.metadata["Name"].lower() in ("torch", "torch-cpu")]
    assert [d.version for d in torches] == ["2.14.1"]


def test_console_script_entry_point():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["clipline"] == "pipelines.cli:main"
