"""Request bodies are read the same whichever decoder reads them, and a large one is read without
a copy of its own many times its size.

Bodies of LARGE_BODY_BYTES and more (a long-treated patient's whole chart) are decoded with
msgspec, smaller ones with orjson. A caller must not be able to tell: same values, same errors
with the same line and column, same reading of integers beyond 64 bits.
"""

from __future__ import annotations

import copy
import json
import re
import tracemalloc
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import json_codec
from tests.conftest import load_fixture
from tests.lean_reading import pruned_as_read_lean

LARGE = json_codec.LARGE_BODY_BYTES


def large_chart(minimum: int = LARGE) -> dict[str, Any]:
    """An order-sign request whose IgM prefetch holds copies of its real Observations until the
    body passes `minimum` bytes."""
    request = load_fixture("order-sign/wm-igm-4500-rituximab")
    bundle = request["prefetch"]["igm"]
    template = bundle["entry"][0]
    size = len(orjson.dumps(request))
    n = 0
    while size < minimum:
        entry = copy.deepcopy(template)
        entry["resource"]["id"] = f"igm-copy-{n}"
        bundle["entry"].insert(0, entry)
        size += len(orjson.dumps(entry)) + 1
        n += 1
    return request


def test_a_large_real_chart_reads_as_orjson_reads_it_without_its_intermediate_copy() -> None:
    raw = orjson.dumps(large_chart(2 * LARGE))
    assert len(raw) >= 2 * LARGE
    tracemalloc.start()
    try:
        value = json_codec.loads(raw)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value == orjson.loads(raw)
    # orjson's own document took about 2.5 times what it returns on top of it (111 MB for 32).
    assert peak < 1.3 * kept, f"peak {peak / 1e6:.1f} MB for {kept / 1e6:.1f} MB kept"


def test_integers_beyond_64_bits_read_as_orjson_reads_them_at_any_size() -> None:
    for minimum in (0, LARGE):
        request = large_chart(minimum)
        raw = orjson.dumps(request).replace(b'"value":4500', b'"value":4' + b"0" * 29, 1)
        assert b"4" + b"0" * 29 in raw
        value = json_codec.loads(raw)
        assert value == orjson.loads(raw)
        quantity = next(
            e["resource"]["valueQuantity"]
            for e in value["prefetch"]["igm"]["entry"]
            if e["resource"]["valueQuantity"]["value"] > 1e20
        )
        assert quantity["value"] == 4e29 and isinstance(quantity["value"], float)


BROKEN_ENDINGS = {
    "trailing comma": (b"}", b",}"),
    "NaN for a value": (b'"status":', b'"status":NaN,"x":'),
    "invalid UTF-8": (b'"final"', b'"fin\xffal"'),
    "truncated": (b"}", b""),
    "a number too large for a double": (b'"value":', b'"value":2.5e308,"was":'),
}


@pytest.mark.parametrize("name", sorted(BROKEN_ENDINGS))
def test_a_large_broken_body_fails_with_orjsons_error_and_position(name: str) -> None:
    old, new = BROKEN_ENDINGS[name]
    raw = orjson.dumps(large_chart())
    at = raw.rfind(old)
    broken = raw[:at] + new + raw[at + len(old) :]
    assert len(broken) >= LARGE
    with pytest.raises(orjson.JSONDecodeError) as expected:
        orjson.loads(broken)
    with pytest.raises(json_codec.JSONDecodeError) as got:
        json_codec.loads(broken)
    assert (got.value.msg, got.value.lineno, got.value.colno) == (
        expected.value.msg,
        expected.value.lineno,
        expected.value.colno,
    )


def test_a_large_broken_body_is_a_400_naming_the_place_through_the_endpoint(
    tmp_path: Any,
) -> None:
    from service import create_app
    from tests.conftest import test_settings

    raw = json.dumps(large_chart(), indent=1).encode()
    broken = raw[: raw.rfind(b"}")] + b",}"
    with pytest.raises(orjson.JSONDecodeError) as expected:
        orjson.loads(broken)
    app = create_app(test_settings(tmp_path, http={"max_body_bytes": 4 * LARGE}))
    answer = app.test_client().post(
        "/cds-services/rituximab-flare-order-sign", data=broken, content_type="application/json"
    )
    assert answer.status_code == 400
    body = answer.get_json()
    assert body["error"] == "invalid_json"
    assert f"line {expected.value.lineno} column {expected.value.colno}" in body["message"]


# -- a large hook request is read lean ----------------------------------------------------------

UNREAD = frozenset({"category", "interpretation", "identifier"})


def _without_unread(request: dict[str, Any]) -> dict[str, Any]:
    """What a lean reading must give: orjson's value, less UNREAD in each prefetch Bundle entry's
    resource and nowhere else."""
    return pruned_as_read_lean(copy.deepcopy(request), UNREAD, frozenset())


def test_a_large_request_keeps_every_field_but_the_unread_ones_of_prefetch_bundle_resources() -> (
    None
):
    request = large_chart()
    request["context"]["draftOrders"]["entry"][0]["resource"]["identifier"] = [{"value": "o-1"}]
    raw = orjson.dumps(request)
    value = json_codec.loads(raw, UNREAD)
    assert value == _without_unread(orjson.loads(raw))
    assert "category" in request["prefetch"]["igm"]["entry"][0]["resource"]  # there to drop
    # Equal strings are shared: the chart's code systems are a few objects, not one per result.
    entries = value["prefetch"]["igm"]["entry"]
    systems = {id(e["resource"]["code"]["coding"][0]["system"]) for e in entries}
    assert len(entries) > 500 and len(systems) < len(entries) / 100
    # A resource outside a Bundle (the Patient) and the draft orders keep every field.
    assert (
        value["prefetch"]["patient"]["identifier"] == request["prefetch"]["patient"]["identifier"]
    )
    assert value["context"] == request["context"]
    # Below the size, and without fields to drop, nothing is left out.
    small = orjson.dumps(load_fixture("order-sign/wm-igm-4500-rituximab"))
    assert json_codec.loads(small, UNREAD) == orjson.loads(small)
    assert json_codec.loads(raw) == orjson.loads(raw)


def test_a_large_request_keeps_prefetch_entries_without_their_unread_fields() -> None:
    request = large_chart()
    for entry in request["prefetch"]["igm"]["entry"]:
        entry["search"] = {"mode": "match", "score": 1}
    request["context"]["draftOrders"]["entry"][0]["search"] = {"mode": "match"}
    raw = orjson.dumps(request)
    value = json_codec.loads(raw, UNREAD, UNREAD_ENTRY)
    assert value == pruned_as_read_lean(orjson.loads(raw), UNREAD, UNREAD_ENTRY)
    entries = value["prefetch"]["igm"]["entry"]
    assert len(entries) > 500 and not any("search" in entry for entry in entries)
    assert all(entry["fullUrl"] and entry["resource"]["id"] for entry in entries)
    # Outside prefetch (the draft orders), and below the size, an entry keeps every field.
    assert value["context"] == request["context"]
    small = load_fixture("order-select/wm-rituximab-selected")
    assert json_codec.loads(orjson.dumps(small), UNREAD, UNREAD_ENTRY) == small


@pytest.mark.parametrize(
    "odd",
    [
        {"prefetch": None},
        {"prefetch": ["not", "an", "object"]},
        {"prefetch": {"igm": None, "conditions": "text", "viscosity": 7}},
        {"prefetch": {"igm": {"resourceType": "Bundle", "entry": {"resource": {"category": 1}}}}},
        {"prefetch": {"igm": {"resourceType": "Bundle", "entry": [3, None, {"resource": [1]}]}}},
    ],
    ids=["null", "array", "not-bundles", "entry-object", "odd-entries"],
)
def test_a_large_request_of_any_shape_reads_as_orjson_reads_it(odd: dict[str, Any]) -> None:
    request = {**large_chart(), **odd}
    request["padding"] = large_chart()["prefetch"]  # keeps the body large, outside prefetch
    raw = orjson.dumps(request)
    assert len(raw) >= LARGE
    assert json_codec.loads(raw, UNREAD) == orjson.loads(raw)
    assert json_codec.loads(orjson.dumps([1, 2]), UNREAD) == [1, 2]


UNREAD_ENTRY = frozenset({"search"})


_KEYS = st.sampled_from(
    ["prefetch", "context", "entry", "resource", "category", "search", "id"]
) | st.text(max_size=4)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=24,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(_KEYS, _JSON, max_size=4))
def test_a_large_body_of_any_shape_reads_as_orjson_reads_it_less_the_unread_fields(
    body: dict[str, Any],
) -> None:
    raw = orjson.dumps({**body, "padding": "x" * LARGE})
    assert len(raw) >= LARGE
    for fields, entry_fields in (
        (UNREAD, frozenset()),
        (UNREAD, UNREAD_ENTRY),
        (frozenset(), UNREAD_ENTRY),
    ):
        expected = pruned_as_read_lean(orjson.loads(raw), fields, entry_fields)
        assert json_codec.loads(raw, fields, entry_fields) == expected
    assert json_codec.loads(raw) == orjson.loads(raw)


def test_a_broken_field_that_would_be_dropped_is_still_orjsons_error() -> None:
    raw = orjson.dumps(large_chart())
    at = raw.rfind(b'"category":') + len(b'"category":')
    broken = raw[:at] + b"[1,,2]," + raw[at:]
    with pytest.raises(orjson.JSONDecodeError) as expected:
        orjson.loads(broken)
    with pytest.raises(json_codec.JSONDecodeError) as got:
        json_codec.loads(broken, UNREAD)
    assert (got.value.lineno, got.value.colno) == (expected.value.lineno, expected.value.colno)


def test_a_lean_reading_keeps_less_than_a_full_one() -> None:
    raw = orjson.dumps(large_chart(2 * LARGE))
    kept = {}
    for prune in (frozenset(), UNREAD):
        tracemalloc.start()
        try:
            value = json_codec.loads(raw, prune)
            kept[prune], peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1.3 * kept[prune]
        del value
    # category and interpretation are about a quarter of these Observations.
    assert kept[UNREAD] < 0.85 * kept[frozenset()], kept


def test_a_large_chart_gets_the_same_cards_read_lean_or_whole(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import create_app
    from service.clinical.fhir_values import UNREAD_FIELDS
    from tests.conftest import test_settings

    assert UNREAD <= UNREAD_FIELDS
    raw = orjson.dumps(large_chart())
    client = create_app(test_settings(tmp_path, http={"max_body_bytes": 4 * LARGE})).test_client()

    def cards() -> list[dict[str, Any]]:
        answer = client.post(
            "/cds-services/rituximab-flare-order-sign", data=raw, content_type="application/json"
        )
        assert answer.status_code == 200, answer.get_json()
        # Each answer's cards, suggestions and links have fresh uuids; all else must match.
        text = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "<uuid>", answer.text)
        return json.loads(text)["cards"]

    lean = cards()
    monkeypatch.setattr(json_codec, "LARGE_BODY_BYTES", 10 * LARGE)  # read whole, by orjson
    whole = cards()
    assert lean == whole
    assert [c["indicator"] for c in lean] == ["warning"]


@pytest.mark.parametrize(
    ("text", "orjsons"),
    [
        (b'{"value": 1e400}', True),
        (b'{"value":[0, -2.5E+308]}', True),
        (b"1e999", True),
        (b'{"value": 12345678901234567890}', True),
        (b'{"value": 1e-400, "other": 2.5e99}', False),
        (b'{"id": "bf3e344d-1e400", "text": "dose 3e123 x", "n": 17e30}', False),
        (b'{"n": 1234567890123456789.5}', True),
    ],
)
def test_only_numbers_that_may_overflow_are_read_by_orjson(text: bytes, orjsons: bool) -> None:
    # Another reader takes 1e400 for infinity where orjson refuses it, and reads long integers
    # exactly: both go to orjson. Exponents in ids and text (hex ids hold many) do not.
    assert json_codec._orjson_numbers(text) is orjsons


def test_a_large_body_with_an_overflowing_number_is_refused_as_orjson_refuses_it() -> None:
    request = large_chart()
    raw = orjson.dumps(request).replace(b'"value":4500', b'"value":45e310', 1)
    assert b"45e310" in raw and len(raw) >= LARGE
    with pytest.raises(orjson.JSONDecodeError) as expected:
        orjson.loads(raw)
    with pytest.raises(json_codec.JSONDecodeError) as got:
        json_codec.loads(raw, UNREAD)
    assert str(got.value) == str(expected.value)


def _numbers_read_whole(data: bytes) -> bool:
    """_orjson_numbers' answer from the marks of the whole text at once: the oracle for the
    slices."""
    marks = data.translate(json_codec._NUMBER_MARKS)
    if json_codec._LONG_DIGIT_RUN in marks:
        return True
    for checked, exponent in enumerate(json_codec._LARGE_EXPONENT.finditer(marks)):
        end = exponent.start() + 1
        if checked == json_codec._MAX_EXPONENTS_CHECKED or json_codec._MANTISSA.search(
            marks, max(0, end - json_codec._MANTISSA_BYTES), end
        ):
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(
    text=st.lists(
        st.sampled_from([b"0", b"7", b"e", b"E", b"+", b"-", b".", b":", b",", b"[", b" ", b"x"])
        | st.sampled_from([b"1" * 19, b"e400", b":1e", b'"id":"3e344"']),
        max_size=120,
    ).map(b"".join),
    slice_bytes=st.sampled_from([1, 2, 5, 6, 17, 64, 1000]),
)
def test_numbers_are_found_across_the_slices_of_the_check(text: bytes, slice_bytes: int) -> None:
    shipped = json_codec._NUMBERS_SLICE_BYTES
    json_codec._NUMBERS_SLICE_BYTES = slice_bytes
    try:
        assert json_codec._orjson_numbers(text) is _numbers_read_whole(text)
    finally:
        json_codec._NUMBERS_SLICE_BYTES = shipped
