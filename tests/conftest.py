from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build each tiny model once per test session; returns its Hugging Face folder."""
    made: dict[str, Path] = {}

    def factory(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}") / "model")
        return made[arch]

    return factory


@pytest.fixture(scope="session")
def export_factory(tiny_model_factory, tmp_path_factory):
    """Export each tiny model once per test session (into one shared store); returns its artifact."""
    from export.build import BuildConfig, build

    store = tmp_path_factory.mktemp("store")
    exported = {}

    def factory(arch: str):
        if arch not in exported:
            exported[arch] = build(BuildConfig(model=str(tiny_model_factory(arch)), out=store))[-1].artifact
        return exported[arch]

    return factory


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The default model exported once per test session (slow: only for tests marked slow)."""
    from export.build import BuildConfig, build

    return build(BuildConfig(out=tmp_path_factory.mktemp("default-store")))[-1].artifact


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | (env or {}))
