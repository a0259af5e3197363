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
def tiny_llama_export(tiny_model_factory, tmp_path_factory):
    """One exported tiny Llama artifact, shared by the tests that only read it."""
    from export.build import BuildConfig, build

    store = tmp_path_factory.mktemp("store")
    results = build(BuildConfig(model=str(tiny_model_factory("llama")), out=store))
    return results[-1].artifact


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | (env or {}))
