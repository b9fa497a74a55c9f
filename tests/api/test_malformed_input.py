"""Malformed FHIR from a client is a 4xx (or is ignored), never a 500.

Prefetch resources are not schema-validated, so every reader must survive any value of any type
in any field. Hypothesis replaces one field somewhere in a real fixture with junk.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service import create_app
from service.settings import Settings
from tests.conftest import FIXTURE_NOW, all_fixture_names, load_fixture, post_hook

FIXTURE_NAMES = all_fixture_names()
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


class _NoStore:
    """Cards issued here are not the point of the test; keep the database out of it."""

    def record_issued(self, cards: Any) -> None:
        return None


# Module-level (hypothesis runs one app for all examples); the patient-hash key goes to a temp dir.
_DATABASE = Path(tempfile.mkdtemp(prefix="flare-cds-fuzz-")) / "unused.sqlite3"
_APP = create_app(
    Settings().replace(storage={"database": str(_DATABASE)}),
    clock=lambda: FIXTURE_NOW,
    store=_NoStore(),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _set(body: Any, path: tuple[Any, ...], junk: Any) -> None:
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = junk


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_junk_anywhere_in_a_request_never_causes_a_500(data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(FIXTURE_NAMES))
    body = copy.deepcopy(load_fixture(name))
    paths = [p for p in _paths(body) if p[0] in ("prefetch", "context")]
    path = data.draw(st.sampled_from(paths))
    _set(body, path, data.draw(JUNK))
    response = post_hook(_APP.test_client(), body)
    assert response.status_code in (200, 400, 412), (name, path, response.get_json())
    assert response.is_json
