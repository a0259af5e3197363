"""The import rules of docs/architecture.md, read from its table and checked on the source, so the document and
the code cannot drift apart."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

ARCHITECTURE = REPO / "docs" / "architecture.md"


def documented_rules() -> dict[str, set[str]]:
    """package -> top-level modules it must never import, from the table under "Packages and what each may
    import" (rows `| package | a, b, c |`)."""
    section = ARCHITECTURE.read_text().split("## Packages and what each may import", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {package.strip(): {name.strip() for name in names.split(",")}
            for package, names in rows[1:]}  # rows[0] is the header


FORBIDDEN = documented_rules()


def test_the_document_names_a_rule_for_each_stage_package_and_the_runtime():
    assert set(FORBIDDEN) == {"runtime", "engines", "calibration"}
    assert {"torch", "export", "engines"} <= FORBIDDEN["runtime"]


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_the_architecture_allows(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    for file in files:
        bad = imported_top_levels(file) & FORBIDDEN[package]
        assert not bad, f"{file.relative_to(REPO)} imports {sorted(bad)}, which {package}/ must not"


def test_only_the_scale_out_module_imports_ray():
    """Ray is an optional extra (lmforge[ray]): the rest of the runtime runs without it."""
    importers = [file.name for file in sorted((REPO / "runtime").glob("*.py")) if "ray" in imported_top_levels(file)]
    assert importers == ["ray_serve.py"]


def test_importing_the_runtime_loads_no_torch():
    optional = {"ray_serve": "ray"}  # module -> the optional package it needs
    modules = [f"runtime.{p.stem}" for p in (REPO / "runtime").glob("*.py") if p.stem != "__main__"
               and (p.stem not in optional or importlib.util.find_spec(optional[p.stem]) is not None)]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "heavy = ('torch', 'transformers', 'export', 'calibration', 'engines')\n"
            "bad = sorted(m for m in heavy if m in sys.modules)\n"
            "print(','.join(bad))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_code_passes_ruff():
    ruff = pytest.importorskip("ruff")
    del ruff
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
