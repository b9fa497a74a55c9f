"""Card detail renders in a CommonMark + GFM renderer exactly as the card template intends.

The renderer is markdown-it-py with GitHub's tables, strikethrough and bare-URL autolinks, close
to what the CDS Hooks sandbox uses (react-markdown with remark-gfm).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from markdown_it.token import Token

from service.cards.markdown import Markdown, _escaped, day, inline, table
from tests.conftest import all_fixture_names, load_fixture, post_hook

CARDS = Path(__file__).resolve().parents[2] / "cards"
SOURCE_URLS = {
    s["url"]
    for s in tomllib.loads((CARDS / "_sources.toml").read_text("utf-8")).values()
    if "url" in s
}
# Structure no card template writes: quoting, headings, raw HTML, images, code blocks.
NEVER = {
    "blockquote_open",
    "heading_open",
    "html_block",
    "html_inline",
    "image",
    "code_block",
    "fence",
    "hr",
    "s_open",
}
SIGN = re.compile(r"\\?(≥|≤|>=|<=|<|>) ?\d[\d,.]*")


def renderer() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"linkify": True}).enable(["table", "strikethrough", "linkify"])
    md.linkify.set({"fuzzy_link": False})
    return md


MD = renderer()


def flatten(tokens: list[Token]) -> list[Token]:
    out: list[Token] = []
    for token in tokens:
        out.append(token)
        out.extend(flatten(token.children or []))
    return out


def plain_text(tokens: list[Token]) -> str:
    parts = []
    for token in flatten(tokens):
        if token.type in ("text", "code_inline"):
            parts.append(token.content)
        elif token.type in ("softbreak", "hardbreak", "paragraph_close", "td_close", "th_close"):
            parts.append(" ")
    return " ".join("".join(parts).split())


def every_card() -> list[tuple[str, dict[str, Any]]]:
    import tempfile

    from service import create_app
    from tests.conftest import FIXTURE_NOW, test_settings

    client = create_app(
        test_settings(Path(tempfile.mkdtemp())), clock=lambda: FIXTURE_NOW
    ).test_client()
    cards = []
    for name in all_fixture_names():
        answer = post_hook(client, load_fixture(name))
        assert answer.status_code == 200, name
        cards += [(name, card) for card in answer.get_json()["cards"]]
    return cards


CARDS_PRODUCED = every_card()


def test_the_fixtures_produce_every_kind_of_card() -> None:
    findings = {card["source"]["topic"]["code"] for _, card in CARDS_PRODUCED}
    templates = {p.stem for p in CARDS.glob("*.toml") if not p.stem.startswith("_")}
    assert findings == templates


@pytest.mark.parametrize(
    ("name", "card"),
    CARDS_PRODUCED,
    ids=[f"{n}-{c['source']['topic']['code']}" for n, c in CARDS_PRODUCED],
)
def test_card_detail_renders_as_the_template_intends(name: str, card: dict[str, Any]) -> None:
    detail = card["detail"]
    tokens = flatten(MD.parse(detail))
    kinds = {t.type for t in tokens}
    assert not kinds & NEVER, f"{name}: unintended {sorted(kinds & NEVER)}"
    # The only links are the sources' own addresses in the footer.
    links = [t.attrGet("href") for t in tokens if t.type == "link_open"]
    assert set(links) <= SOURCE_URLS, links
    # Every table row written is a row rendered, with as many cells as its header: a stray "|"
    # from the data would add a cell, and a line break would drop a row.
    table_lines = [line for line in detail.splitlines() if line.startswith("|")]
    written_rows = [line for line in table_lines if not set(line) <= set("|-: ")]
    widths = [sum(1 for t in row if t.type in ("td_open", "th_open")) for row in _rows(tokens)]
    assert len(widths) == len(written_rows)
    for row, width in zip(written_rows, widths, strict=True):
        assert width == len(re.split(r"(?<!\\)\|", row.strip())) - 2, row
    text = plain_text(MD.parse(detail))
    for sign in SIGN.finditer(detail):
        written = sign.group(0).lstrip("\\")
        assert written in text, f"{name}: threshold {written!r} lost in rendering"
    assert "\\" not in text  # no escape shows through as a backslash
    assert len(card["summary"]) < 140


def _rows(tokens: list[Token]) -> list[list[Token]]:
    rows: list[list[Token]] = []
    for token in tokens:
        if token.type == "tr_open":
            rows.append([])
        elif rows and token.type in ("td_open", "th_open"):
            rows[-1].append(token)
    return rows


TEMPLATES = sorted(p for p in CARDS.glob("*.toml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_no_template_line_starts_a_block_by_accident(path: Path) -> None:
    data = tomllib.loads(path.read_text("utf-8"))
    texts = [data["detail"], *(v for v in data.values() if isinstance(v, str) and "\n" in v)]
    for text in texts:
        for line in text.splitlines():
            stripped = line.lstrip()
            assert not stripped.startswith((">", "#", "<", "```", "    ")), line
            assert not re.match(r"^(=+|-{3,}|\*{3,})\s*$", stripped), line


PRINTABLE = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn")), min_size=1, max_size=40
)
TRICKY = st.lists(
    st.sampled_from(
        [
            "> ",
            "# ",
            "- ",
            "1. ",
            "2) ",
            "* ",
            "+ ",
            "=",
            "---",
            "|",
            "`",
            "**",
            "__",
            "~~",
            "[a](b)",
            "![i](s)",
            "<b>",
            "</p>",
            "&amp;",
            "&#60;",
            "\\",
            "http://evil.example/x",
            "https://a.b",
            "www.evil.example",
            "ana@evil.example",
            "[^1]",
            "[ ]",
            "<https://x.y>",
            "4,000",
            "≥",
            "<4.0",
            ">=5000",
            " ",
            "\t",
            "\n",
            "mg/dL",
            "_x_",
            "*x*",
        ]
    )
    | PRINTABLE,
    min_size=1,
    max_size=8,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(TRICKY)
def test_an_inserted_value_renders_as_exactly_its_text(value: str) -> None:
    expected = " ".join(value.split())
    if not expected:
        return
    for line in (inline(value), f"Before {inline(value)} after."):
        tokens = flatten(MD.parse(line))
        kinds = {t.type for t in tokens}
        assert kinds <= {"paragraph_open", "paragraph_close", "inline", "text"}, (line, kinds)
        assert plain_text(MD.parse(line)) in (expected, f"Before {expected} after.")


# Text made mostly of what the unchanged-text shortcut lets through, with what it must not.
NEAR_PLAIN_PIECES = "a W w ww www . - + = ( ) 1 12 / : % ' \" , ; é ٣ _ @ [ | 2024-01-05 4.2 1) mg"
NEAR_PLAIN = st.lists(
    st.sampled_from([*NEAR_PLAIN_PIECES.split(), " "]),
    min_size=1,
    max_size=12,
).map("".join)


@settings(max_examples=600, deadline=None)
@given(NEAR_PLAIN | TRICKY)
def test_text_left_unchanged_is_what_the_escapes_give(value: str) -> None:
    text = " ".join(value.split())
    # Twice (the second perhaps remembered), and past the length of the texts remembered.
    assert inline(value) == inline(value) == _escaped(text)
    longer = value + " x" * 40
    assert inline(longer) == inline(longer) == _escaped(" ".join(longer.split()))


def test_plain_cells_are_left_as_they_are() -> None:
    for text in ("2024-01-05", "2,256 mg/dL", "rituximab 375 mg/m2 IV", "Waldenström", "final"):
        assert inline(text) == text
    assert inline("1. item") == r"1\. item"
    assert inline("see www.example.org") == r"see www\.example.org"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(TRICKY, min_size=3, max_size=3), min_size=1, max_size=4))
def test_a_table_of_untrusted_cells_keeps_its_shape(rows: list[list[str]]) -> None:
    rendered = flatten(MD.parse(table(("A", "B", "C"), rows)))
    assert sum(1 for t in rendered if t.type == "tr_open") == len(rows) + 1
    cells = [t for t in rendered if t.type in ("td_open", "th_open")]
    assert len(cells) == 3 * (len(rows) + 1)
    assert not {t.type for t in rendered} & NEVER


def test_the_builder_escapes_plain_values_but_not_markdown() -> None:
    from service.cards.builder import as_markdown

    values = as_markdown({"unit": "> 5 # <b>", "table": Markdown("| a |\n|---|\n| b |")})
    assert values["unit"] == "\\> 5 \\# \\<b\\>"
    assert values["table"] == "| a |\n|---|\n| b |"


def test_a_day_is_written_as_an_iso_date() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    assert day(datetime(2026, 1, 5, 23, 59, tzinfo=UTC)) == "2026-01-05"
    # The day of the datetime as given (results are read into UTC before they get here).
    assert day(datetime(2026, 1, 5, 1, 0, tzinfo=timezone(timedelta(hours=2)))) == "2026-01-05"
    assert day(datetime(999, 3, 1, tzinfo=UTC)) == "0999-03-01"  # four digits, as FHIR writes
    assert day(None) == "no date"
