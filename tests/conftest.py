from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
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


# The default model's int8 build every slow test shares: the flags of the end-to-end CLI test, so whichever
# runs first builds it and the others reuse each stage.
DEFAULT_INT8_FLAGS = ("--precision", "int8", "--calib-samples", "32")


@pytest.fixture(scope="session")
def default_int8_engine(default_export):
    """The default model's int8 engine, built once per test session beside the default export (slow)."""
    from export.build import build, parse_args

    store = default_export.path.parent
    results = build(parse_args([*DEFAULT_INT8_FLAGS, "--out", str(store), "--bench-runs", "0"]))
    return next(r.artifact for r in results if r.stage == "engine")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ | (env or {}))


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="session")
def chat_export(tiny_model_factory, tmp_path_factory):
    """The tiny llama with a chat template, exported to an engine once for every server test."""
    from transformers import AutoTokenizer

    from export.build import BuildConfig, build

    # A copy: the shared tiny llama stays without a template (a chat model's build adds the teacher stage and its
    # domain, which the other tests of that folder do not expect).
    folder = tmp_path_factory.mktemp("tiny-chat-llama") / "model"
    shutil.copytree(tiny_model_factory("llama"), folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    results = build(BuildConfig(model=str(folder), out=tmp_path_factory.mktemp("serve-store"), bench_runs=0))
    return next(r.artifact for r in results if r.stage == "engine")


class RunningServer:
    """runtime.serve's app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, artifact, **kwargs):
        import uvicorn

        from runtime.serve import create_app
        from runtime.session import SessionOptions

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = create_app(artifact, "tiny", SessionOptions(threads=1), **kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(chat_export):
    """The reference server over the tiny chat engine, one per test module."""
    running = RunningServer(chat_export)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    """The real OpenAI client, pointed at the module's server."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
