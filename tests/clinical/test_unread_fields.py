"""The fields a large chart is read without are fields the service never names.

service.api.json_codec leaves UNREAD_FIELDS out of a large chart's prefetch resources. If code
started reading one of them, it would see it in small charts and miss it in large ones: this
test fails first, pointing at the field.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.clinical.fhir_values import UNREAD_FIELDS

SERVICE = Path(__file__).resolve().parents[2] / "service"
DEFINED_IN = SERVICE / "clinical" / "fhir_values.py"
# A field named as a string literal: resource.get("category"), field(r, 'note', ...).
NAMED = re.compile("[\"']({})[\"']".format("|".join(sorted(UNREAD_FIELDS))))


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
    for line in ('resource.get("category")', "field(resource, 'interpretation', 'text')"):
        assert NAMED.search(line), line
