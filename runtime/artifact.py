"""The artifact: a folder of files plus `manifest.json`, the one thing that flows between stages.

An artifact is written into a temporary folder beside its final place and renamed into place only when
complete (manifest last), so a half-written artifact never exists under its final name. Its id is
content-addressed from how it was made, so a finished stage is found again and reused.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from filelock import FileLock, Timeout

from runtime.errors import ArtifactError
from runtime.onnx_external import MalformedModel, external_data_locations

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"  # the ONNX graph of every artifact but a TensorRT engine, by this one name
SCHEMA_VERSION = 1
# Working folders: an artifact being written (TEMP_PREFIX) and a stage's scratch space (WORK_PREFIX). Each is
# owned by its process through a lock on a sibling `<name>.owner` file, so the next build can remove the ones
# whose owner is gone, however it went (see owned_folder).
TEMP_PREFIX = ".tmp-"
WORK_PREFIX = ".work-"
WORKING_PREFIXES = (TEMP_PREFIX, WORK_PREFIX)
OWNER_SUFFIX = ".owner"
# The per-artifact build locks of a store (see building).
LOCKS = ".locks"
# The packages whose versions change what a stage produces; they enter every artifact id.
TOOL_PACKAGES = ("lmforge", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
                 "onnxruntime-gpu", "tensorrt")


# lmforge's own packages: a change to the code a stage runs changes what it writes, so it enters its id too.
SOURCE_PACKAGES = ("export", "calibration", "engines", "runtime")
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def tool_versions(modules: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Installed versions of the tools, read from package metadata (importing torch here would break
    the runtime's promise to services that it never loads torch), plus a digest of the lmforge source that
    `modules` run (every module when none are named)."""
    versions = {}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["lmforge_source"] = source_digest(modules)
    return versions


def source_digest(modules: tuple[str, ...] = (), root: Path = SOURCE_ROOT) -> str:
    """sha256 over the source files `modules` import, directly or not (all of lmforge when none are named),
    so editing a stage's code rebuilds what it produced, and editing anything else does not."""
    files = (source_closure(modules, root) if modules
             else sorted(f for package in SOURCE_PACKAGES for f in (root / package).rglob("*.py")))
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def source_closure(modules: tuple[str, ...], root: Path = SOURCE_ROOT) -> list[Path]:
    """The files of `modules` and of every lmforge module they import (at any depth, function-level imports
    included, with the packages' __init__ files), sorted."""
    seen: set[Path] = set()
    pending = [file for name in modules for file in module_files(name, root)]
    while pending:
        file = pending.pop()
        if file in seen:
            continue
        seen.add(file)
        pending += [found for name in imported_modules(file) for found in module_files(name, root)]
    return sorted(seen)


def module_files(name: str, root: Path) -> list[Path]:
    """The source files that importing `name` runs: each package's __init__.py on the way, then the module.
    Names outside lmforge's packages (and names that are not modules) give none."""
    parts = name.split(".")
    if parts[0] not in SOURCE_PACKAGES:
        return []
    files = [root.joinpath(*parts[:depth], "__init__.py") for depth in range(1, len(parts) + 1)]
    files.append(root.joinpath(*parts).with_suffix(".py"))
    return [file for file in files if file.is_file()]


def imported_modules(file: Path) -> set[str]:
    """Dotted names of everything the file imports; `from a.b import c` names both a.b and a.b.c, since c may
    be a module (module_files drops the name that is not)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


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
    """Open a finished artifact; with `verify`, check every file's size and sha256 against the manifest.

    The folder is untrusted (artifacts travel between CI jobs, caches and services): whatever `verify` says,
    every file the manifest names and every external-data file its ONNX models name must be a plain relative
    name inside the folder, checked before any of those files is read."""
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
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ArtifactError(f"{manifest_path} is not an lmforge manifest (no `files` table); rebuild the artifact")
    check_file_names(path, manifest)
    check_external_data(path, manifest)
    if verify:
        verify_files(path, manifest)
    return Artifact(path, manifest)


UNTRUSTED_FIX = ("an artifact may only name files inside its own folder; rebuild it with `python -m export.build` "
                 "or take it from a source you trust")


def check_file_names(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest naming any file outside the artifact folder (before anything is read or hashed)."""
    for name in manifest.get("files", {}):
        problem = outside_reason(path, path, name)
        if problem:
            raise ArtifactError(f"artifact {path}: the manifest entry {name!r} is {problem}; {UNTRUSTED_FIX}")


def check_external_data(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse an ONNX model whose tensors name external data outside the folder or not in the manifest (whose
    sha256 would then never be checked): ONNX Runtime would open those files as it loads the model."""
    names = manifest.get("files", {})
    for name in (n for n in names if n.endswith(".onnx") and (path / n).is_file()):
        model = path / name
        try:
            locations = external_data_locations(model)
        except MalformedModel:  # not protobuf: ONNX Runtime refuses it too, before it could open any other file
            continue
        for location in dict.fromkeys(locations):
            problem = outside_reason(path, model.parent, location)
            if not problem and _relative_name(path, model.parent / location) not in names:
                problem = "not listed in the manifest (so never verified)"
            if problem:
                raise ArtifactError(f"artifact {path}: {name} names external data {location!r}, which is "
                                    f"{problem}; {UNTRUSTED_FIX}")


def outside_reason(folder: Path, base: Path, name: Any) -> str | None:
    """Why `name`, relative to `base` (a folder inside `folder`), is not a plain name inside `folder`; None
    when it is. Both path flavours are checked, so a name that escapes on Windows is refused everywhere."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "not a file name"
    if any(flavour(name).is_absolute() or flavour(name).anchor for flavour in (PurePosixPath, PureWindowsPath)):
        return "an absolute path"
    if any(".." in flavour(name).parts for flavour in (PurePosixPath, PureWindowsPath)):
        return "a path through '..'"
    try:
        (base / name).resolve().relative_to(folder.resolve())
    except ValueError:
        return "a symlink leading out of the folder"
    except (OSError, RuntimeError):  # a symlink loop
        return "a symlink that does not resolve"
    return None


def _relative_name(folder: Path, file: Path) -> str:
    return PurePosixPath(os.path.normpath(file.relative_to(folder))).as_posix()


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    check_file_names(path, manifest)
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


def working_name(prefix: str, label: str) -> str:
    """A working folder's name: unique (pid and random token), and naming its owner for whoever lists it."""
    return f"{prefix}{label}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def owned_folder(path: Path) -> Iterator[Path]:
    """Create the working folder `path`, owned by this process until the block ends, then remove it.

    Ownership is an OS-level lock (filelock: flock, or LockFileEx on Windows) on the sibling file
    `<name>.owner`. The kernel drops it when the process ends however it ends, kill -9 included, so a later
    build tells a dead owner's folder from a live one's by trying that lock rather than by trusting a pid
    (pids repeat across the containers of CI jobs that share a store). The lock is taken before the folder
    exists and given up after it is gone, so a live folder is never seen without a held owner lock."""
    owner_file = _owner_file(path)
    owner = FileLock(owner_file)
    owner.acquire(timeout=0)  # the name is unique to this process: nobody else can hold it
    try:
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        owner.release()
        owner_file.unlink(missing_ok=True)


@contextmanager
def working_folder(parent: str | os.PathLike, label: str, prefix: str = WORK_PREFIX) -> Iterator[Path]:
    """A scratch folder in `parent` (a store or a cache) for one stage: removed when the block ends, and by
    `remove_stale_temporaries` of the next build if this process is killed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    with owned_folder(parent / working_name(prefix, label)) as path:
        yield path


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the working folders (and owner files) that builds left behind when they were killed; folders
    whose owner still runs are left alone, so builds sharing a store never pull each other's work away."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name.startswith(WORKING_PREFIXES):
            _remove_if_abandoned(child.with_name(child.name.removesuffix(OWNER_SUFFIX)))


def _owner_file(path: Path) -> Path:
    return path.with_name(path.name + OWNER_SUFFIX)


def _remove_if_abandoned(path: Path) -> None:
    """Remove the working folder `path` and its owner file if no live process holds its owner lock."""
    owner_file = _owner_file(path)
    if not owner_file.exists():  # made by an lmforge before owner files (or by ray_serve): its name holds the pid
        if path.is_dir() and not _owner_alive(path.name):
            shutil.rmtree(path, ignore_errors=True)
        return
    owner = FileLock(owner_file)
    try:
        owner.acquire(timeout=0)
    except Timeout:  # its owner is alive and still working in it
        return
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        owner.release()
        owner_file.unlink(missing_ok=True)


@contextmanager
def building(store: Path, stage: str, ident: str, progress: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the store's lock on one artifact while making it, so two builds sharing a store never make the
    same artifact twice: the second waits here, then finds the first one's artifact and reuses it.

    filelock takes an OS-level lock that the kernel releases when its holder dies, kill -9 included, so a
    killed build's lock is broken by the kernel itself and never blocks a later build. The empty lock file
    stays in `<store>/.locks` on purpose: deleting it could let a waiter and a newcomer lock two different
    files of the same name."""
    locks = Path(store) / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(locks / f"{folder_name(stage, ident)}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"[{stage}] waiting for another build making {folder_name(stage, ident)} in {store}; "
                 "this build reuses it when it is done")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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
    # The tool versions (and source digest) the id was made from; None: every tool and all of lmforge's source.
    versions: dict[str, Any] | None = None
    dir: Path = field(init=False)

    def __enter__(self) -> ArtifactWriter:
        self.store = Path(self.store)
        self.store.mkdir(parents=True, exist_ok=True)
        self._owned = ExitStack()
        self.dir = self._owned.enter_context(
            owned_folder(self.store / working_name(TEMP_PREFIX, folder_name(self.stage, self.ident))))
        self._started = time.time()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._owned.close()

    def working_folder(self):
        """Scratch space for the stage beside its artifact (same disk, so large files move by rename), removed
        when the block ends or, after a kill, by the next build."""
        return working_folder(self.store, folder_name(self.stage, self.ident))

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
               backend: str | None = None) -> Artifact:
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
            "versions": self.versions if self.versions is not None else tool_versions(),
            "metrics": metrics or {},
        }
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.store / folder_name(self.stage, self.ident)
        if final.exists():
            shutil.rmtree(final)
        os.rename(self.dir, final)
        return Artifact(final, manifest)
