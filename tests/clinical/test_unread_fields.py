"""The fields a large chart is read without are fields the service never reads.

service.api.json_codec leaves UNREAD_FIELDS out of a large chart's prefetch resources, and
UNREAD_ENTRY_FIELDS out of their entries. If code started reading one of them, it would see it
in small charts and miss it in large ones. Two guards: no service module names one as a string
literal, and every shipped hook request gets the same answer with and without them.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from service.clinical.fhir_values import UNREAD_ENTRY_FIELDS, UNREAD_FIELDS
from tests.conftest import all_fixture_names, load_fixture, post_hook
from tests.lean_reading import pruned_as_read_lean

SERVICE = Path(__file__).resolve().parents[2] / "service"
DEFINED_IN = SERVICE / "clinical" / "fhir_values.py"
# A field named as a string literal: resource.get("category"), field(r, 'note', ...).
UUID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")
NAMED = re.compile("[\"']({})[\"']".format("|".join(sorted(UNREAD_FIELDS | UNREAD_ENTRY_FIELDS))))


def test_no_module_names_a_field_that_large_charts_are_read_without() -> None:
    found = [
        f"{path.relative_to(SERVICE)}:{number}: {line.strip()}"
        for path in sorted(SERVICE.rglob("*.py"))
        if path != DEFINED_IN
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if NAMED.search(line)
    ]
    assert found == []


def test_the_guard_sees_a_field_read_in_the_usual_ways() -> None:
    for line in (
        'resource.get("category")',
        "field(resource, 'interpretation', 'text')",
        'entry.get("search")',
    ):
        assert NAMED.search(line), line


def _without_unread(body: dict[str, Any]) -> dict[str, Any]:
    """The body as a large chart is read: prefetch entries without UNREAD_ENTRY_FIELDS, their
    resources without UNREAD_FIELDS."""
    return pruned_as_read_lean(copy.deepcopy(body), UNREAD_FIELDS, UNREAD_ENTRY_FIELDS)


@pytest.mark.parametrize("name", all_fixture_names())
def test_every_shipped_chart_gets_the_same_answer_without_the_unread_fields(
    client: Any, name: str
) -> None:
    body = load_fixture(name)

    def answer(sent: dict[str, Any]) -> tuple[int, Any]:
        response = post_hook(client, sent)
        # Cards, suggestions and links get fresh uuids in each answer; all else must match.
        return response.status_code, json.loads(UUID.sub("<uuid>", response.text))

    assert answer(_without_unread(body)) == answer(body)
