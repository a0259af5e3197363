"""Sample text for calibration and evaluation.

The default set is the Python standard library's own documentation (module, class and function
docstrings), which every machine with Python has offline. Documents are split into a calibration part and
an evaluation part by a hash of their name, so the two never share text, whatever the sample counts.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from runtime.accuracy import HELD_OUT
from runtime.artifact import Artifact
from runtime.errors import BadInputError
from runtime.ranges import check_ranges, ranged
from runtime.text import load_codec

# Modules whose documentation forms the default text: prose-heavy, stable, present in every CPython.
DEFAULT_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale",
    "logging", "mailbox", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "platform", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
EVAL_SHARE = 5  # one document in five is held out for evaluation
TEACHER_DOMAIN = "teacher-answers"  # the held-out text the teacher wrote (export/teacher.py)
MIN_SEQ_LEN = 8


@dataclass(frozen=True)
class DataConfig:
    # Where the text comes from: None for the built-in default, else a .txt, a folder of .txt, a .jsonl,
    # or a Hugging Face dataset id (needs the `datasets` package and the network).
    source: str | None = None
    # The field of each JSON line (or dataset row) that holds the text.
    text_field: str = "text"
    # Calibration windows drawn from the calibration part; more windows, steadier ranges, longer runs.
    samples: int = ranged(64, "--calib-samples", low=1)
    # Tokens per window (a window shorter than this gives perplexity too few tokens to mean anything).
    seq_len: int = ranged(256, "--calib-seq-len", low=MIN_SEQ_LEN)
    # Evaluation windows (held-out text) for perplexity and top-1 agreement.
    eval_samples: int = ranged(16, "--eval-samples", low=1)
    # Seed of the window draw.
    seed: int = 0
    # Wrap each document in the model's chat template (for instruct models served through it).
    chat: bool = False

    def __post_init__(self):
        check_ranges(self)


@dataclass
class TextSplit:
    calibration: list[str]
    evaluation: list[str]


def default_documents() -> dict[str, str]:
    """name -> text, from the standard library's docstrings, in a fixed order."""
    documents = {}
    for module_name in DEFAULT_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a CPython built without, say, ssl or sqlite3
            continue
        parts = [inspect.getdoc(module) or ""]
        for name, member in sorted(vars(module).items()):
            if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(member) or inspect.isfunction(member):
                doc = inspect.getdoc(member)
                if doc:
                    parts.append(f"{name}: {doc}")
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            documents[module_name] = text
    return documents


def user_documents(config: DataConfig) -> dict[str, str]:
    path = Path(config.source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise BadInputError(f"--calib-data folder {path} holds no .txt files; add text files or pass one file")
        return {str(f.relative_to(path)): _read_text(f) for f in files}
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_documents(path, config.text_field)
        return {path.name: _read_text(path)}
    if "/" in config.source and not config.source.startswith((".", "/", "~")):
        return _dataset_documents(config.source, config.text_field)
    raise BadInputError(f"--calib-data {config.source} does not exist; pass a .txt file, a folder of .txt "
                        "files, a .jsonl file, or a Hugging Face dataset id")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:4096]:
        raise BadInputError(f"{path} is not a text file (it holds binary data); pass UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text; convert it to UTF-8") from None


def _jsonl_documents(path: Path, field: str) -> dict[str, str]:
    documents = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadInputError(f"{path} line {number} is not JSON; write one JSON object per line") from None
        if not isinstance(row, dict) or field not in row:
            raise BadInputError(f"{path} line {number} has no {field!r} field; pass --calib-field with the name "
                                "of the field that holds the text")
        documents[f"{path.name}:{number}"] = str(row[field])
    return documents


def _dataset_documents(dataset_id: str, field: str) -> dict[str, str]:
    try:
        import datasets
    except ImportError:
        raise BadInputError(f"--calib-data {dataset_id} looks like a Hugging Face dataset id, which needs the "
                            "`datasets` package; pip install datasets, or pass a local text file") from None
    try:
        rows = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # offline, unknown id, gated dataset: all mean "cannot get it"
        raise BadInputError(f"cannot load dataset {dataset_id} ({str(exc).splitlines()[0]}); connect to the "
                            "network or pass a local text file") from None
    if field not in rows.column_names:
        raise BadInputError(f"dataset {dataset_id} has no {field!r} column (it has {rows.column_names}); "
                            "pass --calib-field")
    return {f"{dataset_id}:{i}": str(text) for i, text in enumerate(rows[field]) if str(text).strip()}


def split_documents(documents: dict[str, str]) -> TextSplit:
    """A stable, name-based split: a document is in exactly one part, whatever else is in the set."""
    calibration, evaluation = [], []
    for name, text in documents.items():
        bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % EVAL_SHARE
        (evaluation if bucket == 0 else calibration).append(text)
    if not evaluation and len(calibration) > 1:  # tiny sets: hold out the last document
        evaluation.append(calibration.pop())
    if not evaluation:  # a single document: its last fifth is held out
        text = calibration.pop()
        cut = len(text) * (EVAL_SHARE - 1) // EVAL_SHARE
        calibration, evaluation = [text[:cut]], [text[cut:]]
    return TextSplit(calibration, evaluation)


def token_stream(texts: list[str], encode, separator: list[int]) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        ids += encode(text) + separator
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    count = len(stream) // seq_len
    return stream[: count * seq_len].reshape(count, seq_len)


@dataclass
class SampleSet:
    calibration: np.ndarray  # [samples, seq_len] int64
    evaluation: np.ndarray  # [eval_samples, seq_len] int64
    source: str


def within_context(config: DataConfig, facts: dict) -> DataConfig:
    """Windows no longer than the model's context (a sliding-window model's export caps it at the window)."""
    limit = facts.get("max_context")
    return replace(config, seq_len=limit) if limit and config.seq_len > limit else config


def load_samples(config: DataConfig, codec, eos_ids: list[int]) -> SampleSet:
    """Token windows for calibration (drawn with the seed) and evaluation (the first held-out windows)."""
    documents = default_documents() if config.source is None else user_documents(config)
    documents = {name: text for name, text in documents.items() if text.strip()}
    if not documents:
        raise BadInputError(f"--calib-data {config.source} holds no text; pass a file with text in it")
    if config.chat:
        documents = {name: codec.render_chat([{"role": "user", "content": text}], add_generation_prompt=False)
                     for name, text in documents.items()}
    source = config.source or "python-stdlib-docs"
    calibration, evaluation = split_windows(documents, config.seq_len, codec, eos_ids)
    if len(calibration) < config.samples or len(evaluation) < config.eval_samples:
        raise BadInputError(
            f"{source} gives {len(calibration)} calibration and {len(evaluation)} evaluation windows of "
            f"{config.seq_len} tokens, fewer than the {config.samples} and {config.eval_samples} asked for; pass "
            "more text, or lower --calib-samples / --calib-seq-len")
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(len(calibration), size=config.samples, replace=False))
    return SampleSet(calibration[chosen], evaluation[: config.eval_samples], source)


def split_windows(documents: dict[str, str], seq_len: int, codec, eos_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(calibration windows, held-out windows) of `seq_len` tokens from the documents' name-based split."""
    split = split_documents(documents)
    separator = eos_ids[:1]
    return (windows(token_stream(split.calibration, codec.encode, separator), seq_len),
            windows(token_stream(split.evaluation, codec.encode, separator), seq_len))


def teacher_documents(generations: list[dict[str, str]], codec) -> dict[str, str]:
    """Each teacher answer as the conversation it came from, rendered through the chat template; named by its
    prompt, so the split between training and held-out answers never moves."""
    return {f"teacher:{g['prompt']}": codec.render_chat([{"role": "user", "content": g["prompt"]},
                                                          {"role": "assistant", "content": g["response"]}],
                                                         add_generation_prompt=False)
            for g in generations}


def held_out_prompts(generations: list[dict[str, str]]) -> list[str]:
    """The prompts whose answers are held out (teacher_documents' split): no stage fitted on them."""
    split = split_documents({f"teacher:{g['prompt']}": g["prompt"] for g in generations})
    return split.evaluation


def teacher_samples(generations: list[dict[str, str]], config: DataConfig, codec, eos_ids: list[int]) -> SampleSet:
    """The teacher's answers as windows: as many as the text gives, up to the counts asked for (teacher text is
    short by design, so fewer is not an error; none is)."""
    calibration, evaluation = split_windows(teacher_documents(generations, codec), config.seq_len, codec, eos_ids)
    if not len(calibration) or not len(evaluation):
        raise BadInputError(f"the teacher's answers give {len(calibration)} training and {len(evaluation)} held-out "
                            f"windows of {config.seq_len} tokens; lower --calib-seq-len or answer more prompts")
    return SampleSet(calibration[: config.samples], evaluation[: config.eval_samples], TEACHER_DOMAIN)


def verification_windows(export: Artifact, data: DataConfig) -> np.ndarray:
    """The calibration data's held-out windows (the same the calibration gate used), or seeded random token
    windows for a model exported without a tokenizer."""
    facts = export.model_facts
    data = within_context(data, facts)
    if facts.get("tokenizer"):
        return load_samples(data, load_codec(export), facts["eos_token_ids"]).evaluation
    rng = np.random.default_rng(data.seed)
    return rng.integers(0, facts["vocab_size"], size=(data.eval_samples, min(data.seq_len, 64)), dtype=np.int64)


def balanced_mix(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """As many windows as `first` has, alternately from each set: half the text a stage fits on comes from
    each domain, whatever their sizes (the shorter set's windows repeat)."""
    count = len(first)
    mixed = np.empty_like(first)
    mixed[0::2] = first[: (count + 1) // 2]
    mixed[1::2] = second[np.arange(count // 2) % len(second)]
    return mixed


def stage_text(config: DataConfig, artifact: Artifact, generations: list[dict[str, str]] | None,
               fit_on_teacher: bool) -> tuple[SampleSet, dict[str, np.ndarray]]:
    """A stage's text: the windows it fits on (the calibration text's, half of them the teacher's training
    answers when `fit_on_teacher`) and the held-out windows its gate measures on, by domain (the calibration
    text's, and the teacher's held-out answers where there are any)."""
    facts = artifact.model_facts
    config = within_context(config, facts)
    codec = load_codec(artifact)
    samples = load_samples(config, codec, facts["eos_token_ids"])
    domains = {HELD_OUT: samples.evaluation}
    if generations:
        teacher = teacher_samples(generations, config, codec, facts["eos_token_ids"])
        domains[TEACHER_DOMAIN] = teacher.evaluation
        if fit_on_teacher:
            samples = replace(samples, calibration=balanced_mix(samples.calibration, teacher.calibration))
    return samples, domains
