"""The runtime services embed: artifacts, sessions over the engines' C APIs, generation and latency reports.

Imports numpy, tokenizers, jinja2 and the engine libraries only: never torch, transformers, or the
export, calibration and engines packages.

`runtime.open(artifact)` is the one way to get a Session. It lives here, above `runtime.session` (the protocol
and the bookkeeping every backend shares) and the backends that import it, so nothing imports in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime import artifact as artifacts
from runtime.errors import BadInputError
from runtime.session import Session, SessionOptions


def open(artifact: str | os.PathLike | artifacts.Artifact, options: SessionOptions | None = None,  # noqa: A001
         verify: bool = True) -> Session:
    """A Session over the artifact's engine, chosen by the manifest's backend (ONNX Runtime by default);
    a path is loaded and, with `verify`, checked against its manifest first."""
    art = artifact if isinstance(artifact, artifacts.Artifact) else artifacts.load(Path(artifact), verify=verify)
    backend = art.manifest.get("backend") or "ort"
    if backend == "ort":
        from runtime.ort_session import OrtSession

        return OrtSession(art, options or SessionOptions())
    if backend == "trt":
        from runtime.trt_session import TrtSession

        return TrtSession(art, options or SessionOptions())
    raise BadInputError(f"artifact {art.path} has backend {backend!r}, which this runtime cannot open; "
                        "rebuild it with --backend ort")
