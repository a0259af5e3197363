"""The artifact: a folder of files plus `manifest.json`, the one thing that flows between stages.

An artifact is written into a temporary folder beside its final place and renamed into place only when
complete (manifest last), so a half-written artifact never exists under its final name. Its id is
content-addressed from how it was made, so a finished stage is found again and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
TEMP_PREFIX = ".tmp-"
# The packages whose versions change what a stage produces; they enter every artifact id.
TOOL_PACKAGES = ("lmforge", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
                 "onnxruntime-gpu", "tensorrt")


# lmforge's own packages: a change to their code changes what the stages write, so it enters the ids too.
SOURCE_PACKAGES = ("export", "calibration", "engines", "runtime")


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools, read from package metadata (importing torch here would break
    the runtime's promise to services that it never loads torch), plus a digest of lmforge's source."""
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["lmforge_source"] = source_digest()
    return versions


def source_digest() -> str:
    """sha256 over lmforge's Python sources, so editing a stage's code rebuilds what it produced."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def artifact_id(parent: str | None, stage: str, config: dict[str, Any], versions: dict[str, Any]) -> str:
    """sha256 of (parent id, stage name, stage config, tool versions), first 12 hex digits."""
    blob = json.dumps([parent, stage, config, versions], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A finished artifact on disk. Build one with `ArtifactWriter`; open one with `load`."""

    path: Path
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def io(self) -> dict[str, Any]:
        return self.manifest["io"]

    @property
    def model_facts(self) -> dict[str, Any]:
        return self.manifest["io"]["model"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise ArtifactError(f"artifact {self.path} has no file {name!r}; rebuild it with `python -m export.build`")
        return self.path / name

    def size_bytes(self) -> int:
        return sum(entry["size"] for entry in self.manifest["files"].values())


TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def folder_name(stage: str, ident: str) -> str:
    return f"{stage}-{ident}"


def load(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Open a finished artifact; with `verify`, check every file's size and sha256 against the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist; pass the folder that "
                            "`python -m export.build` printed")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST}, so it is not a finished artifact; rebuild it with "
                            "`python -m export.build`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); rebuild the artifact") from None
    if verify:
        verify_files(path, manifest)
    return Artifact(path, manifest)


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for name, entry in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"artifact {path} is missing {name}; rebuild it with `python -m export.build`")
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            raise ArtifactError(f"{file} does not match its sha256 in the manifest (changed or truncated); "
                                "rebuild the artifact")


def find(store: Path, stage: str, ident: str) -> Artifact | None:
    """The finished artifact with this id in the store, if one exists (a reused stage)."""
    path = Path(store) / folder_name(stage, ident)
    if not (path / MANIFEST).is_file():
        return None
    return load(path, verify=False)


def remove_stale_temporaries(store: Path) -> None:
    """Delete temporary folders left by builds that were killed mid-stage (never a finished artifact)."""
    store = Path(store)
    if not store.is_dir():
        return
    for child in store.iterdir():
        if child.name.startswith(TEMP_PREFIX) and child.is_dir() and not _owner_alive(child.name):
            shutil.rmtree(child, ignore_errors=True)


def _owner_alive(temp_name: str) -> bool:
    pid = temp_name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()


@dataclass
class ArtifactWriter:
    """Context manager: a stage writes its files into `.dir`, then calls `commit`, which hashes the files,
    writes the manifest last and renames the folder into place. Leaving the block without a commit
    (an exception, a kill) leaves nothing under the final name."""

    store: Path
    stage: str
    ident: str
    parent: str | None
    config: dict[str, Any]
    dir: Path = field(init=False)

    def __enter__(self) -> ArtifactWriter:
        self.store = Path(self.store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.dir = self.store / f"{TEMP_PREFIX}{folder_name(self.stage, self.ident)}-{os.getpid()}"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir()
        self._started = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def copy_text_files(self, parent: Artifact) -> None:
        """The tokenizer and chat template travel with every artifact derived from the export."""
        for name in TEXT_FILES:
            if name in parent.manifest["files"]:
                shutil.copyfile(parent.file(name), self.dir / name)

    def provisional(self, io: dict[str, Any], **manifest: Any) -> Artifact:
        """The folder as an Artifact before it is committed, so a stage can run what it wrote (engine
        verification) and still leave nothing behind when that check fails."""
        files = {str(p.relative_to(self.dir)): {"size": p.stat().st_size} for p in self.dir.rglob("*") if p.is_file()}
        return Artifact(self.dir, {"id": self.ident, "stage": self.stage, "files": files, "io": io} | manifest)

    def commit(self, io: dict[str, Any], metrics: dict[str, Any] | None = None, precision: str = "fp32",
               backend: str | None = None, versions: dict[str, Any] | None = None) -> Artifact:
        files = {
            str(p.relative_to(self.dir)): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(self.dir.rglob("*")) if p.is_file()
        }
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "id": self.ident,
            "stage": self.stage,
            "parent": self.parent,
            "config": self.config,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
            "io": io,
            "precision": precision,
            "backend": backend,
            "versions": versions if versions is not None else tool_versions(),
            "metrics": metrics or {},
        }
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.store / folder_name(self.stage, self.ident)
        if final.exists():
            shutil.rmtree(final)
        os.rename(self.dir, final)
        return Artifact(final, manifest)
