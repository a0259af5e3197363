"""The import rules of docs/architecture.md, read from its table and checked on the source, so the document and
the code cannot drift apart."""

import ast
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

ARCHITECTURE = REPO / "docs" / "architecture.md"


@dataclass(frozen=True)
class Rule:
    forbidden: frozenset[str]  # modules (and everything below them) the importer must never import
    allowed: frozenset[str]    # exceptions below a forbidden name


def names(cell: str) -> frozenset[str]:
    return frozenset(name.strip() for name in cell.split(",") if name.strip() not in ("", "—"))


def documented_rules() -> dict[str, Rule]:
    """importer (a package or a module) -> its rule, from the table under "Packages and what each may import"
    (rows `| importer | a, b, c | d |`: never a, b or c, nor below them, except d and below)."""
    section = ARCHITECTURE.read_text().split("## Packages and what each may import", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {importer.strip(): Rule(names(forbidden), names(allowed))
            for importer, forbidden, allowed in rows[1:]}  # rows[0] is the header


RULES = documented_rules()
PACKAGES = ("runtime", "engines", "calibration", "export")


def test_the_document_names_a_rule_for_each_package_the_toolkit_and_the_conductor():
    assert set(RULES) == {"runtime", "engines", "calibration", "export", "export.graph", "export.build"}
    assert {"torch", "export", "engines"} <= RULES["runtime"].forbidden
    assert all("export.build" in rule.forbidden or "export" in rule.forbidden
               for importer, rule in RULES.items() if importer != "export.build")


def within(name: str, scope: str) -> bool:
    """Whether module `name` is `scope` or lies below it."""
    return name == scope or name.startswith(scope + ".")


def module_name(file: Path) -> str:
    parts = file.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_lmforge_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """Full dotted names of what the file imports: `from export import graph` is export.graph, not export."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                imported.add(submodule if is_lmforge_module(submodule) else node.module)
    return imported


def rule_of(module: str) -> str | None:
    """The most specific importer row that covers the module."""
    covering = [importer for importer in RULES if within(module, importer)]
    return max(covering, key=len) if covering else None


def breaches(module: str, imported: set[str]) -> list[str]:
    rule = RULES[rule_of(module)]
    return sorted(name for name in imported if any(within(name, bad) for bad in rule.forbidden)
                  and not any(within(name, good) for good in rule.allowed))


def test_the_rules_are_read_at_module_granularity():
    """The checker itself: an engine may import the toolkit but no export stage, and a toolkit module nothing
    above it."""
    assert breaches("engines.ort", {"export.graph.attention", "runtime.session"}) == []
    assert breaches("engines.ort", {"export.prune"}) == ["export.prune"]
    assert breaches("export.prune", {"export.graph.data", "export.models"}) == []
    assert breaches("export.prune", {"calibration.calibrate", "export.build"}) == ["calibration.calibrate",
                                                                                   "export.build"]
    assert breaches("export.graph.qdq", {"export.graph.linear", "export.prune"}) == ["export.prune"]
    assert rule_of("export.build") == "export.build" and breaches("export.build", {"engines.ort"}) == []


@pytest.mark.parametrize("importer", sorted(RULES))
def test_every_module_imports_only_what_the_architecture_allows(importer):
    files = [file for package in PACKAGES for file in sorted((REPO / package).rglob("*.py"))
             if rule_of(module_name(file)) == importer]
    assert files, f"no module falls under the rule for {importer}"
    for file in files:
        bad = breaches(module_name(file), imported_modules(file))
        assert not bad, f"{file.relative_to(REPO)} imports {bad}, which {importer} must not"


def test_only_the_scale_out_module_imports_ray():
    """Ray is an optional extra (lmforge[ray]): the rest of the runtime runs without it."""
    importers = [file.name for file in sorted((REPO / "runtime").glob("*.py"))
                 if any(within(name, "ray") for name in imported_modules(file))]
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
