"""A body of ordinary size is decoded once, by the body check, with its depth checked as it is read.

json_codec.loads_within_depth must read exactly what loads() reads (same values, same types),
refuse exactly what nests deeper than the limit, whether that is within the levels its type
spells out or below them, and leave to loads() the integers the two decoders read differently.
The hook route then takes that value instead of decoding the body again.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.api import json_codec
from service.api.json_codec import loads_within_depth
from service.api.middleware import MAX_JSON_CONTAINERS, MAX_JSON_DEPTH
from tests.api.test_json_nesting import DUMPS_OPTIONS, FUZZ, FUZZ_DEEP, JSON_VALUES, TEXT, depth
from tests.conftest import load_fixture

HOOK = "/cds-services/rituximab-flare-order-sign"
SCENARIO = "order-sign/wm-igm-4500-rituximab"


def beyond_64_bits(value: Any) -> bool:
    """Whether `value` holds an integer orjson may read otherwise than msgspec."""
    if isinstance(value, dict):
        return any(beyond_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return any(beyond_64_bits(v) for v in value)
    return type(value) is int and not -(2**63) <= value < 2**63


def check_reading(raw: bytes, limit: int) -> None:
    value = json_codec.loads(raw)
    read, got = loads_within_depth(raw, limit)
    exact = json.loads(raw)  # every integer as written
    fits = depth(exact) <= limit and not beyond_64_bits(exact)
    assert read == fits, (raw[:200], limit)
    if read:
        assert repr(got) == repr(value)  # repr tells 1 from 1.0 and True, and keeps key order


@FUZZ
@given(value=JSON_VALUES, options=DUMPS_OPTIONS)
def test_a_body_reads_as_loads_reads_it(value: Any, options: Any) -> None:
    check_reading(json.dumps(value, **options).encode(), MAX_JSON_DEPTH)


@FUZZ_DEEP
@given(
    value=JSON_VALUES,
    wrappers=st.lists(TEXT | st.none(), min_size=8, max_size=30),
    options=DUMPS_OPTIONS,
)
def test_the_depth_is_found_at_every_level(
    value: Any, wrappers: list[str | None], options: Any
) -> None:
    # Nested in arrays (None) or objects: within and below the levels the decoder's type spells
    # out, against limits on both sides of the depth, those levels' own among them.
    for key in wrappers:
        value = [value] if key is None else {key: value, "n": 1}
    raw = json.dumps(value, **options).encode()
    actual = depth(orjson.loads(raw))
    for limit in sorted({0, 1, 11, 12, 13, *range(max(0, actual - 2), actual + 3)}):
        check_reading(raw, limit)


@pytest.mark.parametrize("levels", [0, 3, 20, 60])
@pytest.mark.parametrize("number", [2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**29])
def test_integers_beyond_64_bits_are_left_to_loads_at_any_depth(levels: int, number: int) -> None:
    raw = ("[" * levels + f'{{"value": {number}}}' + "]" * levels).encode()
    read, value = loads_within_depth(raw, MAX_JSON_DEPTH)
    assert read == (-(2**63) <= number < 2**63)
    if read:
        assert value == orjson.loads(raw)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 5000])
def test_the_limit_holds_far_below_the_typed_levels(levels: int) -> None:
    raw = b"[" * levels + b"1" + b"]" * levels
    read, value = loads_within_depth(raw, MAX_JSON_DEPTH)
    assert read == (levels <= MAX_JSON_DEPTH)
    if read:
        assert value == orjson.loads(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": NaN}', b'{"a": 1}x', b'{"a": "\xff"}', b"[1,]"])
def test_what_is_not_json_is_left_to_loads_and_its_error(raw: bytes) -> None:
    assert loads_within_depth(raw, MAX_JSON_DEPTH) == (False, None)
    with pytest.raises(json_codec.JSONDecodeError):
        json_codec.loads(raw)


# -- through the endpoint --------------------------------------------------------------------


def what_cards_say(response: Any) -> list[tuple[str, str, str]]:
    """Each card's indicator, summary and detail (its ids and links differ from call to call)."""
    assert response.status_code == 200, response.get_data(as_text=True)
    return [(c["indicator"], c["summary"], c["detail"]) for c in response.get_json()["cards"]]


def test_a_hook_call_decodes_its_body_once(client: Any, monkeypatch: Any) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the body was decoded a second time")

    monkeypatch.setattr(json_codec, "loads", refused)
    response = client.post(HOOK, json=load_fixture(SCENARIO))
    assert [indicator for indicator, _, _ in what_cards_say(response)] == ["warning"]


def test_an_integer_beyond_64_bits_in_a_call_reads_as_the_float_orjson_reads(client: Any) -> None:
    text = orjson.dumps(load_fixture(SCENARIO))
    assert text.count(b'"value":4500') == 1
    integer = b"4" + b"0" * 29
    as_integer = text.replace(b'"value":4500', b'"value":' + integer)
    # The same number written as the double orjson reads for it.
    as_float = text.replace(b'"value":4500', b'"value":' + repr(orjson.loads(integer)).encode())
    answers = [
        what_cards_say(client.post(HOOK, data=raw, content_type="application/json"))
        for raw in (as_integer, as_float)
    ]
    assert answers[0] == answers[1]
    assert answers[0], "the implausible IgM is still named in a card"


def test_a_body_past_twice_the_container_cap_is_still_decoded_once(
    client: Any, monkeypatch: Any
) -> None:
    # 250 kB: a count of its brackets, not its length, tells it is under the cap.
    body = load_fixture(SCENARIO)
    body["extension"] = {"org.example": "a" * 250_000}
    monkeypatch.setattr(json_codec, "loads", lambda *a, **k: pytest.fail("decoded twice"))
    response = client.post(HOOK, json=body)
    assert [indicator for indicator, _, _ in what_cards_say(response)] == ["warning"]


def test_brackets_in_strings_do_not_count_toward_the_container_cap(client: Any) -> None:
    body = load_fixture(SCENARIO)
    body["extension"] = {"org.example": "[{" * (MAX_JSON_CONTAINERS + 1)}
    response = client.post(HOOK, json=body)
    assert [indicator for indicator, _, _ in what_cards_say(response)] == ["warning"]


def test_more_objects_and_arrays_than_the_cap_below_the_large_size_is_413(client: Any) -> None:
    raw = b'{"a": [' + b",".join([b"[]"] * (MAX_JSON_CONTAINERS + 1)) + b"]}"
    assert len(raw) < json_codec.LARGE_BODY_BYTES
    response = client.post(HOOK, data=raw, content_type="application/json")
    assert response.status_code == 413, response.get_data(as_text=True)
    assert response.get_json()["error"] == "payload_too_large"


def test_a_body_made_of_values_below_the_typed_levels_is_left_to_the_byte_scan(
    client: Any,
) -> None:
    # Each value below the typed levels costs a Python call: past a few thousand in one body the
    # decoding gives up, and the body is checked and read as before, to the same answer.
    many = "[" + ",".join(["1"] * 20_000) + "]"
    for wrappers, read_here in ((10, True), (11, False), (12, False)):
        raw = ("[" * wrappers + many + "]" * wrappers).encode()
        read, value = loads_within_depth(raw, MAX_JSON_DEPTH)
        assert read == read_here, wrappers
        if read:
            assert value == orjson.loads(raw)
    body = load_fixture(SCENARIO)
    body["extension"] = {"org.example": [[[[[[[[[[[[[1] * 20_000]]]]]]]]]]]]}
    response = client.post(HOOK, json=body)
    assert [indicator for indicator, _, _ in what_cards_say(response)] == ["warning"]
