"""The catalogue of bad inputs: what a user, a script or a client may get wrong, across the command lines, the
runtime API and the server, each with the exit code (runtime/errors.py) or HTTP status it must get and the words
its one-line message must hold: the problem and the fix. Every case is refused before any work starts: nothing
is written to the store, no engine runs.

Command lines run in this process (their `main(argv)`), which is what `python -m` runs; the last few cases run
real subprocesses, so that the exit status a shell sees is checked too."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer, run_cli

import runtime
from runtime import artifact as artifacts
from runtime.errors import EXIT_BAD_INPUT, LmforgeError
from runtime.generate import GenerationConfig
from runtime.serve import API_KEY_ENV, Access, ApiKey
from runtime.service import Service, ServiceConfig
from runtime.session import SessionOptions

KEY = "sk-catalogue-key"
PROMPT = "the quick brown fox"


@dataclass
class Place:
    """What a case works with: the engine, a scratch folder of its own, the keyed server, a running service."""

    engine: Path
    scratch: Path
    url: str
    service: Service

    def copy_of_engine(self) -> Path:
        copy = self.scratch / "engine-copy"
        shutil.copytree(self.engine, copy)
        return copy

    def engine_with(self, edit: Callable[[Path, dict], None]) -> Path:
        """A copy of the engine whose folder and manifest `edit` changed (the manifest is written back)."""
        copy = self.copy_of_engine()
        manifest = json.loads((copy / artifacts.MANIFEST).read_text())
        edit(copy, manifest)
        (copy / artifacts.MANIFEST).write_text(json.dumps(manifest))
        return copy


@dataclass(frozen=True)
class Outcome:
    code: int  # exit code, or HTTP status
    message: str  # what the user reads: the last line of stderr, the exception, the error's message


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Place], Outcome]
    code: int
    words: tuple[str, ...]


# -- the three surfaces --------------------------------------------------------------------------------------------


def cli(module: str, *argv: str | Callable[[Place], str], env: dict | None = None) -> Callable[[Place], Outcome]:
    """`python -m module argv...` in this process; an argv item may be a function of the Place (a path in it)."""

    def run(place: Place) -> Outcome:
        args = [item(place) if callable(item) else item for item in argv]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), \
                pytest.MonkeyPatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            try:
                code = importlib.import_module(module).main(args)
            except SystemExit as exit_:  # argparse refuses a malformed flag this way
                code = exit_.code
        text = stderr.getvalue()
        assert "Traceback" not in text, text
        return Outcome(code, last_line(text))

    return run


def api(call: Callable[[Place], object]) -> Callable[[Place], Outcome]:
    """A runtime call that must raise the error users see (its exit code is what a CLI around it returns)."""

    def run(place: Place) -> Outcome:
        try:
            call(place)
        except LmforgeError as exc:
            return Outcome(exc.exit_code, str(exc))
        return Outcome(0, "")

    return run


def http(method: str, path: str, body: dict | bytes | None = None, key: str | None = KEY) -> Callable:
    """A request to the keyed server; the key is sent unless `key` is None."""

    def run(place: Place) -> Outcome:
        content = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {})
        response = httpx.request(method, place.url + path, content=content, headers=headers, timeout=30)
        return Outcome(response.status_code, response.json()["error"]["message"])

    return run


def subprocess_cli(module: str, *argv: str | Callable[[Place], str]) -> Callable[[Place], Outcome]:
    """A real `python -m` process: the exit status a shell or CI sees."""

    def run(place: Place) -> Outcome:
        result = run_cli(module, *[item(place) if callable(item) else item for item in argv], timeout=120)
        assert "Traceback" not in result.stderr, result.stderr
        return Outcome(result.returncode, last_line(result.stderr))

    return run


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# Paths inside a case's Place, for argv.
def engine(place: Place) -> str:
    return str(place.engine)


def scratch(name: str) -> Callable[[Place], str]:
    return lambda place: str(place.scratch / name)


def made(build: Callable[[Place], Path]) -> Callable[[Place], str]:
    return lambda place: str(build(place))


# -- broken artifacts ------------------------------------------------------------------------------------------


def without_manifest(place: Place) -> Path:
    copy = place.copy_of_engine()
    (copy / artifacts.MANIFEST).unlink()
    return copy


def manifest_not_json(place: Place) -> Path:
    copy = place.copy_of_engine()
    (copy / artifacts.MANIFEST).write_text("{ half a manifest")
    return copy


def truncated_model(place: Place) -> Path:
    copy = place.copy_of_engine()
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    return copy


def missing_tokenizer(place: Place) -> Path:
    copy = place.copy_of_engine()
    (copy / "tokenizer.json").unlink()
    return copy


def unknown_backend(place: Place) -> Path:
    return place.engine_with(lambda folder, manifest: manifest.update(backend="magic"))


def naming(entry: str) -> Callable[[Place], Path]:
    """The engine with one more manifest entry, `entry` (a path the loader must refuse)."""

    def edit(folder: Path, manifest: dict) -> None:
        manifest["files"][entry] = {"sha256": "0" * 64, "size": 1}

    return lambda place: place.engine_with(edit)


def symlink_out(place: Place) -> Path:
    def edit(folder: Path, manifest: dict) -> None:
        (folder / "notes.txt").symlink_to("/etc/hostname")
        manifest["files"]["notes.txt"] = {"sha256": "0" * 64, "size": 1}

    return place.engine_with(edit)


def not_a_model(place: Place) -> Path:
    folder = place.scratch / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    return folder


def a_file(place: Place) -> Path:
    path = place.scratch / "a-file"
    path.write_text("x")
    return path


# -- the runtime API -----------------------------------------------------------------------------------------------


def submit(prompt: list[int] | Callable[[Place], list[int]], config: GenerationConfig = GenerationConfig(4),
           logprobs: int | None = None) -> Callable[[Place], object]:
    def call(place: Place):
        ids = prompt(place) if callable(prompt) else prompt
        return place.service.submit(ids, config, logprobs)

    return call


def longer_than_context(place: Place) -> list[int]:
    return [5] * (place.service.max_context + 1)


def prefill_outside_vocabulary(place: Place):
    with runtime.open(place.engine, SessionOptions(threads=1)) as session:
        session.prefill([[5, 6, 10**6]])


# -- the catalogue -------------------------------------------------------------------------------------------

BUILD = "export.build"
SERVE = "runtime.serve"
BENCH = "runtime.bench"
GENERATE = "runtime.generate"
BAD = EXIT_BAD_INPUT
OUT = ("--out", scratch("store"))  # every build case writes into its own store, which must stay empty

CASES = [
    # export.build: models, data, flags
    Case("build: a model path that does not exist", cli(BUILD, "--model", scratch("no-model"), *OUT), BAD,
         ("no-model does not exist",)),
    Case("build: a folder that is not a model", cli(BUILD, "--model", made(not_a_model), *OUT), BAD,
         ("not a Hugging Face model folder", "config.json")),
    Case("build: an unknown precision", cli(BUILD, "--precision", "int3", *OUT), BAD,
         ("unknown precision int3", "fp32", "int8")),
    Case("build: an empty precision list", cli(BUILD, "--precision", ",", *OUT), BAD, ("unknown precision",)),
    Case("build: an unknown backend", cli(BUILD, "--backend", "cuda", *OUT), BAD,
         ("--backend", "invalid choice: 'cuda'", "'auto', 'ort', 'trt'")),
    Case("build: --out is a file", cli(BUILD, "--out", made(a_file)), BAD, ("is a file, not a folder",)),
    Case("build: no thread", cli(BUILD, "--threads", "0", *OUT), BAD, ("--threads: 0 is too small", "give 1 or more")),
    Case("build: a benchmark of one token", cli(BUILD, "--bench-gen", "1", *OUT), BAD,
         ("--bench-gen: 1 is too small", "give 2 or more")),
    Case("build: two pruning choices", cli(BUILD, "--prune", "mlp=0.25", "--prune-budget", "5", *OUT), BAD,
         ("--prune and --prune-budget", "give one of them")),
    Case("build: a negative pruning budget", cli(BUILD, "--prune-budget", "-1", *OUT), BAD,
         ("--prune-budget: -1 must be greater than 0",)),
    Case("build: distillation without pruning", cli(BUILD, "--distill-steps", "10", *OUT), BAD,
         ("--distill-steps", "together with --prune")),
    Case("build: a count that is not a number", cli(BUILD, "--bench-runs", "many", *OUT), BAD,
         ("--bench-runs", "'many' is not an integer")),
    Case("build: an unknown flag", cli(BUILD, "--frobnicate", *OUT), BAD, ("unrecognized arguments: --frobnicate",)),
    # runtime.serve: artifacts, flags, keys
    Case("serve: an artifact that does not exist", cli(SERVE, scratch("no-engine")), BAD,
         ("does not exist", "python -m export.build")),
    Case("serve: a folder without a manifest", cli(SERVE, made(without_manifest)), BAD,
         ("no manifest.json", "rebuild")),
    Case("serve: a manifest that is not JSON", cli(SERVE, made(manifest_not_json)), BAD,
         ("is not valid JSON", "rebuild the artifact")),
    Case("serve: a truncated engine", cli(SERVE, made(truncated_model)), BAD,
         ("model.onnx does not match its sha256", "rebuild the artifact")),
    Case("serve: a missing tokenizer", cli(SERVE, made(missing_tokenizer)), BAD,
         ("is missing tokenizer.json", "python -m export.build")),
    Case("serve: no KV slot", cli(SERVE, engine, "--max-batch", "0"), BAD, ("max-batch must be at least 1",)),
    Case("serve: an empty prefill chunk", cli(SERVE, engine, "--prefill-chunk", "0"), BAD,
         ("prefill-chunk must be at least 1",)),
    Case("serve: a negative prefix cache", cli(SERVE, engine, "--prefix-cache-mb", "-1"), BAD,
         ("prefix-cache-mb must be >= 0",)),
    Case("serve: a port out of range", cli(SERVE, engine, "--port", "70000"), BAD,
         ("--port 70000 is not a TCP port", "0 to 65535")),
    Case("serve: no token per request", cli(SERVE, engine, "--max-tokens", "0"), BAD,
         ("--max-tokens 0 would refuse every request", "give at least 1")),
    Case("serve: an empty --api-key", cli(SERVE, engine, "--api-key", ""), BAD,
         ("--api-key is set but empty", "unset it")),
    Case(f"serve: an empty ${API_KEY_ENV}", cli(SERVE, engine, env={API_KEY_ENV: ""}), BAD,
         (f"{API_KEY_ENV} is set but empty",)),
    Case("serve: a key with a space", cli(SERVE, engine, "--api-key", "two words"), BAD,
         ("printable ASCII", "Authorization header")),
    # runtime.bench and runtime.generate
    Case("bench: an artifact that does not exist", cli(BENCH, scratch("no-engine"), "--json", scratch("b.json")),
         BAD, ("does not exist",)),
    Case("bench: no run", cli(BENCH, engine, "--runs", "0", "--json", scratch("b.json")), BAD, ("--runs >= 1",)),
    Case("bench: a comparison artifact that does not exist",
         cli(BENCH, engine, "--compare", scratch("other"), "--json", scratch("b.json")), BAD,
         ("other does not exist",)),
    Case("bench: an unknown provider", cli(BENCH, engine, "--provider", "tpu", "--json", scratch("b.json")), BAD,
         ("unknown execution provider 'tpu'", "cpu")),
    Case("generate: an artifact that does not exist", cli(GENERATE, scratch("no-engine"), PROMPT), BAD,
         ("does not exist",)),
    Case("generate: no new token", cli(GENERATE, engine, PROMPT, "--max-new-tokens", "0"), BAD,
         ("max_new_tokens must be at least 1",)),
    Case("generate: a negative temperature", cli(GENERATE, engine, PROMPT, "--temperature", "-1"), BAD,
         ("temperature must be >= 0",)),
    Case("generate: top-p of 0", cli(GENERATE, engine, PROMPT, "--top-p", "0"), BAD, ("0 < top_p <= 1",)),
    Case("generate: an empty prompt", cli(GENERATE, engine, "", "--raw"), BAD, ("empty prompt",)),
    # Checked before the engine loads: a missing artifact is not reached.
    Case("generate: no thread", cli(GENERATE, scratch("no-engine"), PROMPT, "--threads", "0"), BAD,
         ("--threads 0", "give 1 or more")),
    Case("generate: no new token, before loading", cli(GENERATE, scratch("no-engine"), PROMPT, "--max-new-tokens",
                                                         "0"), BAD, ("max_new_tokens must be at least 1",)),
    # the runtime API: artifacts, sessions, generation configs, the service
    Case("artifact.load: a file the manifest names is gone", api(lambda p: artifacts.load(missing_tokenizer(p))),
         BAD, ("is missing tokenizer.json", "rebuild")),
    Case("runtime.open: a folder that does not exist", api(lambda p: runtime.open(p.scratch / "none")), BAD,
         ("does not exist",)),
    Case("runtime.open: a backend this runtime lacks", api(lambda p: runtime.open(unknown_backend(p))), BAD,
         ("backend 'magic'", "--backend ort")),
    Case("runtime.open: an unknown provider",
         api(lambda p: runtime.open(p.engine, SessionOptions(provider="tpu"))), BAD,
         ("unknown execution provider 'tpu'",)),
    Case("session.prefill: a token outside the vocabulary", api(prefill_outside_vocabulary), BAD,
         ("token id 1000000 is outside the vocabulary", "tokenizer")),
    Case("GenerationConfig: no new token", api(lambda p: GenerationConfig(max_new_tokens=0).validate()), BAD,
         ("max_new_tokens must be at least 1",)),
    Case("GenerationConfig: a NaN temperature", api(lambda p: GenerationConfig(temperature=math.nan).validate()),
         BAD, ("temperature must be >= 0",)),
    Case("GenerationConfig: a negative seed", api(lambda p: GenerationConfig(seed=-1).validate()), BAD,
         ("seed must be >= 0",)),
    Case("ServiceConfig: an empty queue", api(lambda p: ServiceConfig(queue_size=0).validate()), BAD,
         ("queue-size must be at least 1",)),
    Case("Service.submit: an empty prompt", api(submit([])), BAD, ("empty prompt",)),
    Case("Service.submit: a token outside the vocabulary", api(submit([5, 500])), BAD,
         ("outside the vocabulary", "tokenizer")),
    Case("Service.submit: a prompt past the context", api(submit(longer_than_context)), BAD,
         ("exceeds the context", "shorten it or ask for fewer tokens")),
    Case("Service.submit: too many log-probabilities", api(submit([5, 6], logprobs=99)), BAD,
         ("top_logprobs must be in",)),
    # the server: keys, bodies, fields, tokens
    Case("HTTP: no API key", http("POST", "/v1/completions", {"model": "tiny", "prompt": PROMPT}, key=None), 401,
         ("missing API key", "Authorization: Bearer <key>")),
    Case("HTTP: a wrong API key", http("POST", "/v1/completions", {"model": "tiny", "prompt": PROMPT}, key="sk-no"),
         401, ("incorrect API key",)),
    Case("HTTP: malformed JSON", http("POST", "/v1/completions", b"{not json"), 400, ("malformed JSON",)),
    Case("HTTP: a JSON array as the body", http("POST", "/v1/completions", b"[1, 2]"), 400,
         ("must be a JSON object",)),
    Case("HTTP: invalid UTF-8", http("POST", "/v1/completions", b'{"model": "tiny", "prompt": "\xff"}'), 400,
         ("not valid UTF-8",)),
    Case("HTTP: a body over the limit", http("POST", "/v1/completions", b"{" + b" " * (2 << 20) + b"}"), 413,
         ("exceeds",)),
    Case("HTTP: an unknown model", http("POST", "/v1/completions", {"model": "gpt-4", "prompt": PROMPT}), 404,
         ("model 'gpt-4' is not served here", "'tiny'")),
    Case("HTTP: a negative max_tokens", http("POST", "/v1/completions",
                                             {"model": "tiny", "prompt": PROMPT, "max_tokens": -1}), 400,
         ("max_tokens must be",)),
    Case("HTTP: a prompt past the context", http("POST", "/v1/completions",
                                                 {"model": "tiny", "prompt": "fox " * 400, "max_tokens": 8}), 400,
         ("exceeds the context",)),
    Case("HTTP: a token outside the vocabulary", http("POST", "/v1/completions",
                                                      {"model": "tiny", "prompt": [5, 10**6]}), 400,
         ("outside the vocabulary",)),
    Case("HTTP: a field not implemented", http("POST", "/v1/chat/completions",
                                               {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                "tools": [{"type": "function", "function": {"name": "f"}}]}), 400,
         ("tools",)),
    Case("HTTP: an unknown role", http("POST", "/v1/chat/completions",
                                       {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}), 400,
         ("robot",)),
    Case("HTTP: more sequences than the queue holds", http("POST", "/v1/completions",
                                                           {"model": "tiny", "prompt": [PROMPT] * 5, "n": 16}), 400,
         ("queues at most", "smaller n")),
    Case("HTTP: a route under the wrong method", http("GET", "/v1/completions"), 405, ("Method Not Allowed",)),
    Case("HTTP: a route that does not exist", http("POST", "/v1/embeddings", {}), 404, ("/v1/embeddings",)),
    # artifacts are untrusted: manifest entries that lead out of the folder
    Case("artifact: a manifest entry through '..'", cli(SERVE, made(naming("../../../../etc/hostname"))), BAD,
         ("'../../../../etc/hostname'", "a path through '..'", "rebuild it")),
    Case("artifact: an absolute manifest entry", api(lambda p: artifacts.load(naming("/etc/hostname")(p))), BAD,
         ("'/etc/hostname'", "an absolute path")),
    Case("artifact: a symlink leading out", api(lambda p: runtime.open(symlink_out(p))), BAD,
         ("'notes.txt'", "a symlink leading out of the folder")),
    # real processes: the exit status a shell sees
    Case("process: serve without its artifact", subprocess_cli(SERVE, scratch("no-engine")), BAD,
         ("does not exist", "python -m export.build")),
    Case("process: build with an unknown precision", subprocess_cli(BUILD, "--precision", "int3", *OUT), BAD,
         ("unknown precision int3",)),
]


@pytest.fixture(scope="module")
def keyed_server(chat_export):
    running = RunningServer(chat_export, access=Access(ApiKey(KEY)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def service(chat_export):
    running = Service(runtime.open(chat_export, SessionOptions(threads=1)),
                      ServiceConfig(max_batch=2, max_context=64, prefix_cache_mb=0))
    yield running
    running.close(timeout=5)


def test_the_catalogue_holds_at_least_forty_cases_with_distinct_names():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_refused_at_once_with_its_code_and_a_one_line_message(case, chat_export, keyed_server, service,
                                                                           tmp_path):
    place = Place(Path(chat_export.path), tmp_path, keyed_server.url, service)
    outcome = case.run(place)
    assert outcome.code == case.code, outcome.message
    assert outcome.message and "\n" not in outcome.message
    for words in case.words:
        assert words in outcome.message, outcome.message
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "engine-copy" not in p.parts]
    assert not [p for p in written if p.name in ("manifest.json", "b.json")], written  # no work was done
    assert service.stats()["slots_active"] == 0 and service.stats()["queued"] == 0
    assert not os.environ.get(API_KEY_ENV)  # an environment case leaves no key behind
