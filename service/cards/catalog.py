"""Card text as data: one TOML file per finding in `cards/`, with its sources and a version.

Templates are loaded and checked once at start-up; a card file with a typo in a placeholder fails
there, not in front of a clinician.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

PROJECT_CARDS = Path(__file__).resolve().parents[2] / "cards"
SOURCES_FILE = "_sources.toml"


class CardCatalogError(ValueError):
    """A card file is missing, malformed or refers to an unknown source."""


@dataclass(frozen=True)
class CardTemplate:
    finding: str
    version: str
    indicator: str
    title: str
    summary: Template
    detail: Template
    sources: tuple[Mapping[str, str], ...]
    suggestions: Mapping[str, Template] = field(default_factory=dict)
    override_reasons: tuple[Mapping[str, str], ...] = ()
    fragments: Mapping[str, Template] = field(default_factory=dict)

    def fill(self, template: Template, values: Mapping[str, Any]) -> str:
        try:
            pieces = _pieces(template)
            if pieces is None:
                return template.substitute(values)  # its error for a malformed placeholder
            filled = []
            for literal, name in pieces:
                filled.append(literal)
                if name is not None:
                    filled.append(str(values[name]))
            return "".join(filled)
        except KeyError as exc:
            raise CardCatalogError(f"card {self.finding}: no value for ${exc.args[0]}") from None


# Each template's text cut once into (literal, placeholder) pieces: Template.substitute runs its
# pattern and a Python callback per placeholder on every fill, a few per card. Keyed by id(), the
# template kept to make the key safe; the templates are the catalog's, loaded once.
_PIECES: dict[int, tuple[Template, tuple[tuple[str, str | None], ...] | None]] = {}
_MAX_PIECES = 1024


def _pieces(template: Template) -> tuple[tuple[str, str | None], ...] | None:
    """`template` as pieces that, each literal followed by its placeholder's value, make what
    substitute() makes; None if a placeholder is malformed."""
    known = _PIECES.get(id(template))
    if known is not None and known[0] is template:
        return known[1]
    text, pieces, literal, at = template.template, [], [], 0
    cut: tuple[tuple[str, str | None], ...] | None = None
    for match in template.pattern.finditer(text):
        literal.append(text[at : match.start()])
        at = match.end()
        if match.group("escaped") is not None:
            literal.append(template.delimiter)
            continue
        name = match.group("named") or match.group("braced")
        if name is None:
            break
        pieces.append(("".join(literal), name))
        literal = []
    else:
        pieces.append(("".join(literal) + text[at:], None))
        cut = tuple(pieces)
    if len(_PIECES) >= _MAX_PIECES:  # catalogs loaded again and again (a test suite's)
        _PIECES.clear()
    _PIECES[id(template)] = (template, cut)
    return cut


_REQUIRED = ("finding", "version", "indicator", "title", "summary", "detail", "sources")
_KNOWN = {*_REQUIRED, "suggestions", "override_reasons"}


def load_catalog(directory: str | Path | None = None) -> dict[str, CardTemplate]:
    folder = Path(directory) if directory else PROJECT_CARDS
    try:
        sources = tomllib.loads((folder / SOURCES_FILE).read_text("utf-8"))
    except FileNotFoundError:
        raise CardCatalogError(f"no {SOURCES_FILE} in card folder {folder}") from None
    catalog: dict[str, CardTemplate] = {}
    for path in sorted(folder.glob("*.toml")):
        if path.name == SOURCES_FILE:
            continue
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise CardCatalogError(f"{path.name}: {exc}") from None
        card = _template(path.name, data, sources)
        catalog[card.finding] = card
    if not catalog:
        raise CardCatalogError(f"no card files in {folder}")
    return catalog


def _template(name: str, data: dict[str, Any], sources: Mapping[str, Any]) -> CardTemplate:
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise CardCatalogError(f"{name}: missing {', '.join(missing)}")
    if data["indicator"] not in {"info", "warning", "critical"}:
        raise CardCatalogError(f"{name}: indicator must be info, warning or critical")
    cited = []
    for key in data["sources"]:
        if key not in sources:
            raise CardCatalogError(f"{name}: unknown source {key!r}")
        cited.append(dict(sources[key]))
    reasons = tuple(data.get("override_reasons", ()))
    for reason in reasons:
        if not reason.get("code") or not reason.get("display"):
            raise CardCatalogError(f"{name}: each override reason needs code and display")
    # Any other string key is a fragment the renderer may use (e.g. very_high_note).
    fragments = {
        key: Template(value)
        for key, value in data.items()
        if key not in _KNOWN and isinstance(value, str)
    }
    return CardTemplate(
        finding=data["finding"],
        version=str(data["version"]),
        indicator=data["indicator"],
        title=data["title"],
        summary=Template(data["summary"].strip()),
        detail=Template(data["detail"].strip()),
        sources=tuple(cited),
        suggestions={k: Template(v) for k, v in data.get("suggestions", {}).items()},
        override_reasons=reasons,
        fragments=fragments,
    )
