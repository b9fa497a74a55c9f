"""Card text as data: one TOML file per finding in `cards/`, with its sources and a version.

Templates are loaded and checked once at start-up; a card file with a typo in a placeholder fails
there, not in front of a clinician.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
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
    summary: CardText
    detail: CardText
    sources: tuple[Mapping[str, str], ...]
    suggestions: Mapping[str, CardText] = field(default_factory=dict)
    override_reasons: tuple[Mapping[str, str], ...] = ()
    fragments: Mapping[str, CardText] = field(default_factory=dict)

    @cached_property
    def footer(self) -> str:
        """The end of every detail this template makes: its numbered sources and its rule."""
        lines = ["**Sources**"]
        for number, source in enumerate(self.sources, start=1):
            url = source.get("url")
            lines.append(f"{number}. {source['text']}" + (f" <{url}>" if url else ""))
        lines.append("")
        lines.append(f"_Rule `{self.finding}` v{self.version}._")
        return "\n".join(lines)

    def fill(self, template: CardText, values: Mapping[str, Any]) -> str:
        try:
            return template.filled(values)
        except KeyError as exc:
            raise CardCatalogError(f"card {self.finding}: no value for ${exc.args[0]}") from None


class CardText(Template):
    """A card's text with $placeholders, cut once (as the catalog is loaded) into pieces:
    Template.substitute runs its pattern and a Python callback per placeholder on every fill,
    a few per card."""

    def __init__(self, template: str) -> None:
        super().__init__(template)
        self._pieces = self._cut()

    def filled(self, values: Mapping[str, Any]) -> str:
        """What substitute(values) makes, or raises."""
        if self._pieces is None:
            return self.substitute(values)  # its error for a malformed placeholder
        filled = []
        for literal, name in self._pieces:
            filled.append(literal)
            if name is not None:
                filled.append(str(values[name]))
        return "".join(filled)

    def _cut(self) -> tuple[tuple[str, str | None], ...] | None:
        """(literal, placeholder) pieces that, each literal followed by its placeholder's value,
        make what substitute() makes; None if a placeholder is malformed."""
        text, pieces, literal, at = self.template, [], [], 0
        for match in self.pattern.finditer(text):
            literal.append(text[at : match.start()])
            at = match.end()
            if match.group("escaped") is not None:
                literal.append(self.delimiter)
                continue
            name = match.group("named") or match.group("braced")
            if name is None:
                return None
            pieces.append(("".join(literal), name))
            literal = []
        pieces.append(("".join(literal) + text[at:], None))
        return tuple(pieces)


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
        key: CardText(value)
        for key, value in data.items()
        if key not in _KNOWN and isinstance(value, str)
    }
    return CardTemplate(
        finding=data["finding"],
        version=str(data["version"]),
        indicator=data["indicator"],
        title=data["title"],
        summary=CardText(data["summary"].strip()),
        detail=CardText(data["detail"].strip()),
        sources=tuple(cited),
        suggestions={k: CardText(v) for k, v in data.get("suggestions", {}).items()},
        override_reasons=reasons,
        fragments=fragments,
    )
