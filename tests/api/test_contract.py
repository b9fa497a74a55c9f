"""The fast contract check (jsonschema-rs) never accepts what the Python validator refuses; the
schemas requests are checked against are compiled at start, and only those."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.api.contract import CHECKED_SCHEMAS, Contract
from service.api.hooks import REQUEST_SCHEMAS
from tests.conftest import SERVICE_FOR_HOOK, all_fixture_names, load_fixture

CONTRACT = Contract()
FIXTURES = [load_fixture(name) for name in all_fixture_names()]

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["", "Patient/1", "not-a-uuid", "http://x", "2026-11-20T12:00:00Z"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    """Every place in a request above the FHIR content, which the service parses itself."""
    out = [prefix] if prefix else []
    if depth >= 5 or (prefix and prefix[0] == "prefetch" and len(prefix) > 1):
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key), depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value[:2]):
            out += _paths(item, (*prefix, index), depth + 1)
    return out


def _python_problems(schema: str, instance: Any) -> list[Any]:
    return list(CONTRACT.validator(schema).iter_errors(instance))


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_the_fast_check_is_never_more_permissive(data: st.DataObject) -> None:
    body = copy.deepcopy(data.draw(st.sampled_from(FIXTURES)))
    schema = REQUEST_SCHEMAS[body["hook"]]
    path = data.draw(st.sampled_from(_paths(body)))
    target = body
    for step in path[:-1]:
        target = target[step]
    if data.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(JSON)
    fast = CONTRACT.fast_validator(schema).is_valid(body)
    if fast:
        assert _python_problems(schema, body) == [], path
    # Either way the answer is the Python validator's.
    assert (CONTRACT.problems(schema, body) == []) == (_python_problems(schema, body) == [])


@pytest.mark.parametrize("body", FIXTURES, ids=all_fixture_names())
def test_every_fixture_passes_both(body: dict[str, Any]) -> None:
    schema = REQUEST_SCHEMAS[body["hook"]]
    assert CONTRACT.fast_validator(schema).is_valid(body)
    assert _python_problems(schema, body) == []


def test_start_up_compiles_what_requests_are_checked_against_and_no_more(app: Any) -> None:
    contract = app.extensions["flare_cds"].contract
    compiled = (set(contract._fast), set(contract._validators))
    assert compiled == (set(CHECKED_SCHEMAS), set(CHECKED_SCHEMAS))
    # Every route that checks a body against the contract, valid bodies and invalid ones (these
    # also reach the Python validator): none compiles a schema during the request.
    client = app.test_client()
    for hook, service_id in SERVICE_FOR_HOOK.items():
        valid = next(load_fixture(n) for n in all_fixture_names(hook))
        for body, status in ((valid, 200), ({"hook": hook}, 400)):
            response = client.post(f"/cds-services/{service_id}", json=body)
            assert response.status_code == status, response.get_data(as_text=True)[:300]
    response = client.post(f"/cds-services/{SERVICE_FOR_HOOK['order-sign']}/feedback", json={})
    assert response.status_code == 400
    assert (set(contract._fast), set(contract._validators)) == compiled


def _cap_errors(schema: str, instance: Any) -> list[str]:
    """Where the Python validator finds an array past its maxItems, as problems() words places."""
    found = []
    pending = list(CONTRACT.validator(schema).iter_errors(instance))
    while pending:
        error = pending.pop()
        pending += error.context or []
        if error.validator == "maxItems":
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            found.append(path.lstrip(".") or "(body)")
    return sorted(found)


_ORDER_SIGN = next(load_fixture(n) for n in all_fixture_names("order-sign"))
_ORDER_SELECT = next(load_fixture(n) for n in all_fixture_names("order-select"))


@pytest.mark.parametrize(
    ("schema", "body", "places"),
    [
        ("OrderSignRequest", _ORDER_SIGN, ["prefetch.igm.entry"]),
        ("OrderSignRequest", _ORDER_SIGN, ["context.draftOrders.entry"]),
        ("OrderSignRequest", _ORDER_SIGN, ["prefetch.conditions.entry", "prefetch.igm.entry"]),
        ("OrderSelectRequest", _ORDER_SELECT, ["context.selections"]),
        ("FeedbackRequest", {"feedback": []}, ["feedback"]),
    ],
)
def test_array_caps_are_found_where_the_validator_finds_them(
    schema: str, body: dict[str, Any], places: list[str]
) -> None:
    # The caps are checked first, by a plan of the schema compiled once; each place it names
    # must be one the Python validator names for maxItems, and no other.
    body = copy.deepcopy(body)
    for place in places:
        *parents, name = place.split(".")
        target = body
        for step in parents:
            target = target.setdefault(step, {"resourceType": "Bundle"})
        target[name] = ["x"] * 10_001  # past every cap in the contract
    problems = CONTRACT.problems(schema, body)
    assert [p.location for p in problems] == sorted(places) == _cap_errors(schema, body)
    assert all("has 10001 items; at most" in p.problem for p in problems)
    unchanged = copy.deepcopy(_ORDER_SIGN)
    assert CONTRACT.problems("OrderSignRequest", unchanged) == []
