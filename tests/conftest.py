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

    def factory(arch: str, tokenizer: bool = True) -> Path:
        key = (arch, tokenizer)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}") / "model"
            made[key] = make_tiny_model(arch, folder, tokenizer=tokenizer)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def export_factory(tiny_model_factory, tmp_path_factory):
    """Export each tiny model once per test session (into one shared store); returns its artifact."""
    from export.build import BuildConfig, build

    store = tmp_path_factory.mktemp("store")
    exported = {}

    def factory(arch: str, tokenizer: bool = True):
        key = (arch, tokenizer)
        if key not in exported:
            model = str(tiny_model_factory(arch, tokenizer))
            exported[key] = build(BuildConfig(model=model, out=store))[0].artifact
        return exported[key]

    return factory


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The default model exported once per test session (slow: only for tests marked slow)."""
    from export.build import BuildConfig, build

    return build(BuildConfig(out=tmp_path_factory.mktemp("default-store")))[0].artifact


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | (env or {}))
