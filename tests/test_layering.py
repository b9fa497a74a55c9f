"""The package layering stays true: the clinical core and the card renderer do no I/O.

Imports are read with `ast` (every `import` and `from ... import`, at any depth, including those
inside functions), so a lazy import cannot slip past the way it would past a text search.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"

# What the core must never reach: web frameworks, HTTP clients, databases, the network, and the
# service's own shell packages (the FHIR client lives in service.record).
IO_MODULES = {
    "flask",
    "werkzeug",
    "gunicorn",
    "requests",
    "urllib3",
    "http",
    "socket",
    "sqlite3",
    "psycopg",
    "psycopg_pool",
}
SHELL_PACKAGES = {
    "service.api",
    "service.auth",
    "service.record",
    "service.storage",
    "service.serving",
    "service.api.runtime",
}
FORBIDDEN = {
    "clinical": IO_MODULES | SHELL_PACKAGES | {"service.cards"},
    "cards": IO_MODULES | SHELL_PACKAGES,
}


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source file imports, with relative imports resolved against `package`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            # `from service import record` imports the package service.record.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(source: str, package: str, forbidden: set[str]) -> list[str]:
    bad = []
    for module in sorted(imported_modules(source, package)):
        for banned in forbidden:
            if module == banned or module.startswith(banned + "."):
                bad.append(module)
                break
    return bad


def _modules(package: str) -> list[Path]:
    return sorted((SERVICE / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_that_does_io(package: str) -> None:
    files = _modules(package)
    assert files, f"service/{package} has no modules"
    problems = {}
    for path in files:
        found = violations(path.read_text("utf-8"), f"service.{package}", FORBIDDEN[package])
        if found:
            problems[str(path.relative_to(SERVICE.parent))] = found
    assert problems == {}


@pytest.mark.parametrize(
    "line",
    [
        "import flask",
        "from flask import Flask",
        "import requests",
        "import sqlite3",
        "from service.record.fhir_client import FhirFetcher",
        "from service.record import fhir_client",
        "from service import record",
        "from ..record import gathering",
    ],
)
def test_the_check_catches_a_forbidden_import(line: str) -> None:
    # The same check as above, on a core module with one bad line added inside a function, as a
    # lazy import would be written.
    core = SERVICE / "clinical" / "order_risk.py"
    source = core.read_text("utf-8") + f"\n\ndef _late():\n    {line}\n"
    assert violations(source, "service.clinical", FORBIDDEN["clinical"]) != []


def test_top_level_stays_small_and_modules_short() -> None:
    top = [p.name for p in SERVICE.glob("*.py")]
    assert len(top) <= 6, top
    too_long = {
        str(p.relative_to(SERVICE)): n
        for p in SERVICE.rglob("*.py")
        if (n := len(p.read_text("utf-8").splitlines())) > 400
    }
    assert too_long == {}
    grab_bags = {"utils", "helpers", "common", "misc"}
    assert not [p for p in SERVICE.rglob("*") if p.is_dir() and p.name in grab_bags]


def test_every_package_says_what_it_may_import() -> None:
    for init in SERVICE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text("utf-8")))
        assert doc, f"{init} has no docstring"
        assert "import" in doc.lower(), f"{init} does not say what it may import"
