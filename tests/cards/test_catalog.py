"""Card text files: every finding has one, each loads, cites known sources and fills cleanly."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.cards.catalog import PROJECT_CARDS, CardCatalogError, CardText, load_catalog

FINDINGS = {
    "hyperviscosity",
    "igm-high",
    "igm-missing",
    "igm-below-threshold",
    "flare",
    "flare-hyperviscosity",
    "flare-baseline-missing",
    "btk-rebound",
    "course-continuation",
    "continuation-hyperviscosity",
    "hyperviscosity-symptoms",
    "post-exchange-igm",
    "possible-progression",
}


def test_every_finding_has_a_versioned_card_with_sources() -> None:
    catalog = load_catalog()
    assert set(catalog) == FINDINGS
    for card in catalog.values():
        assert card.version and card.sources and card.title
        assert all(reason["display"] for reason in card.override_reasons)


def _copy_cards(tmp_path: Path) -> Path:
    for path in PROJECT_CARDS.glob("*.toml"):
        (tmp_path / path.name).write_text(path.read_text("utf-8"), "utf-8")
    return tmp_path


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    folder = _copy_cards(tmp_path)
    card = folder / "flare.toml"
    card.write_text(card.read_text().replace('"ghobrial-2004"', '"nobody-2020"'))
    with pytest.raises(CardCatalogError, match="unknown source"):
        load_catalog(folder)


def test_missing_field_is_refused(tmp_path: Path) -> None:
    folder = _copy_cards(tmp_path)
    card = folder / "igm-high.toml"
    card.write_text(re.sub(r"(?m)^version = .*\n", "", card.read_text()))
    with pytest.raises(CardCatalogError, match="missing version"):
        load_catalog(folder)


def test_site_can_reword_a_card(tmp_path: Path) -> None:
    from service import create_app
    from tests.conftest import FIXTURE_NOW, load_fixture, post_hook, test_settings

    (tmp_path / "cards").mkdir()
    folder = _copy_cards(tmp_path / "cards")
    card = folder / "igm-high.toml"
    card.write_text(card.read_text().replace("IgM flare risk:", "Local wording:"))
    settings = test_settings(tmp_path, cards={"directory": str(folder)})
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    [result] = post_hook(client, load_fixture("order-sign/wm-igm-4500-rituximab")).get_json()[
        "cards"
    ]
    assert result["summary"].startswith("Local wording:")


_TEMPLATE_PIECES = st.lists(
    st.sampled_from(["$drug", "${drug}", "$$", "$", "${", "$1", "$count", "text ", "é", "\n"])
    | st.text(max_size=4),
    max_size=8,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(_TEMPLATE_PIECES)
def test_a_filled_template_is_what_substitute_makes(text: str) -> None:
    # A card's text is cut into pieces once; for any text, what fill() makes (or refuses) is
    # what string.Template.substitute makes (or refuses).
    card = next(iter(load_catalog().values()))
    template = CardText(text)
    values = {"drug": "rituximab", "count": 4}
    try:
        expected: object = Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        expected = type(exc)
    for _ in range(2):  # and again from the same pieces
        try:
            got: object = card.fill(template, values)
        except CardCatalogError:
            got = KeyError
        except ValueError:
            got = ValueError
        assert got == expected
