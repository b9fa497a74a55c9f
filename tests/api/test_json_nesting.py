"""The nesting check run on every JSON body before parsing: linear time on any body, same answers.

json_nesting_exceeds sees the raw bytes of unauthenticated requests, so its cost must grow
linearly with the body whatever the body holds. It once found strings with a regex that, on a
string of escaped quotes left unclosed, retried from every quote: 80 kB took 21 s.

What it answers is pinned two ways: on JSON, against the depth of what the parser returns; on
any bytes at all (malformed JSON is left to the parser), against that regex, whose cost does not
matter on short inputs. Its memory is bounded too: it works on slices, so a body of many short
strings does not cost tens of times its size.
"""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api import middleware
from service.api.middleware import MAX_JSON_DEPTH, json_nesting_exceeds

HOOK = "/cds-services/rituximab-flare-order-sign"
# Generous: the check takes tens of milliseconds on these bodies. The quadratic regex took
# longer than this from 50 kB on (25 kB for some) and nine minutes on 400 kB.
BOUND_S = 2.0
# Escaped quotes (or strings) per attack body, doubling up to about 400 kB.
SIZES = (12_500, 25_000, 50_000, 100_000, 200_000)

ATTACKS: dict[str, Callable[[int], bytes]] = {
    "unclosed string of escaped quotes": lambda n: b'{"a": "' + b'\\"' * n,
    "closed string of escaped quotes": lambda n: b'{"a": "' + b'\\"' * n + b'"}',
    "escaped quotes and brackets, unclosed": lambda n: b'{"a": ["' + b'\\"[{' * n,
    "escaped backslashes before quotes": lambda n: b'["' + b'\\\\\\"' * n,
    "an escaped quote per string": lambda n: b"[" + b'"\\"",' * n + b'""]',
    # A backslash outside strings (never JSON): a quote right after it opens a string.
    "stray backslash, then escaped quotes": lambda n: b'\\"' * n,
    "stray backslash, then strings": lambda n: b'\\[""' + b',""' * n + b"]",
    "stray backslash, then strings of escaped quotes": lambda n: b"\\" + b'"\\""' * n,
}


# -- the reference: the old regex, and the depth of the parsed value ---------------------------

_REFERENCE_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OBJECTS_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def reference_shape(raw: bytes) -> bytes:
    """Brackets outside strings, objects as arrays, as the check found them with one regex."""
    return _REFERENCE_STRING.sub(b"", raw).translate(_OBJECTS_AS_ARRAYS, _NOT_BRACKETS)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


# Strings made of what can confuse a scan for where strings end: quotes, backslashes (both
# escaped once serialized), brackets, and a few plain and non-ASCII characters.
TRICKY_TEXT = st.text(alphabet=st.sampled_from('"\\[]{}a \n/é€'), max_size=12)
TEXT = TRICKY_TEXT | st.text(max_size=6)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=30,
)
DUMPS_OPTIONS = st.sampled_from(
    [{}, {"ensure_ascii": False}, {"indent": 1}, {"separators": (",", ":")}]
)
# Pieces of text that is mostly not JSON: unclosed strings, stray and doubled backslashes.
PIECES = st.sampled_from(
    [b'"', b"\\", b"[", b"]", b"{", b"}", b'\\"', b"\\\\", b"a", b" ", b"'", b"\x01", b"\n"]
)
NOT_QUITE_JSON = st.lists(PIECES, max_size=40).map(b"".join)
FUZZ = settings(
    max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
FUZZ_DEEP = settings(FUZZ, max_examples=100)  # each example draws a hundred wrappers


# -- 1. linear time ------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_check_takes_linear_time_on_attack_bodies(attack: str) -> None:
    # Doubling sizes: a regression fails on the first in seconds, not on the last in minutes.
    for n in SIZES:
        raw = ATTACKS[attack](n)
        started = time.perf_counter()
        json_nesting_exceeds(raw, MAX_JSON_DEPTH)
        elapsed = time.perf_counter() - started
        assert elapsed < BOUND_S, (attack, len(raw), f"{elapsed:.2f} s")


@pytest.mark.parametrize("n", [50_000, 200_000])  # 100 kB first: a regression fails sooner
def test_an_attack_body_is_answered_fast_and_never_500(client: Any, n: int) -> None:
    bodies = {
        "unclosed": (b'{"a": "' + b'\\"' * n, "invalid_json"),
        "closed": (b'{"a": "' + b'\\"' * n + b'"}', "invalid_request"),
        "closed, with brackets": (b'{"a": ["' + b'\\"[{' * n + b'"]}', "invalid_request"),
    }
    for name, (raw, error) in bodies.items():
        started = time.perf_counter()
        response = client.post(HOOK, data=raw, content_type="application/json")
        elapsed = time.perf_counter() - started
        assert response.status_code == 400, (name, response.get_data(as_text=True)[:300])
        assert response.get_json()["error"] == error, name
        assert elapsed < BOUND_S, (name, f"{elapsed:.2f} s")


def test_deep_nesting_behind_escaped_quotes_is_still_found(client: Any) -> None:
    deep = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    raw = '{"a": "' + '\\"' * 50_000 + '", "b": ' + deep + "}"
    assert json_nesting_exceeds(raw.encode(), MAX_JSON_DEPTH)
    response = client.post(HOOK, data=raw, content_type="application/json")
    assert response.status_code == 400
    assert "more than" in response.get_json()["message"]


# -- 2. the same answers -------------------------------------------------------------------


@FUZZ
@given(value=JSON_VALUES, options=DUMPS_OPTIONS)
def test_on_json_the_check_agrees_with_the_parsed_depth(value: Any, options: Any) -> None:
    raw = json.dumps(value, **options).encode()
    actual = depth(json.loads(raw))
    for limit in range(actual + 2):
        assert json_nesting_exceeds(raw, limit) == (actual > limit), (raw, limit)


@FUZZ_DEEP
@given(value=JSON_VALUES, wrappers=st.lists(TEXT | st.none(), min_size=95, max_size=105))
def test_around_the_limit_the_check_agrees_with_the_parsed_depth(
    value: Any, wrappers: list[str | None]
) -> None:
    # Nested to about MAX_JSON_DEPTH: arrays (None), or objects under keys full of quotes.
    for key in wrappers:
        value = [value] if key is None else {key: value, "\\": '"]'}
    raw = json.dumps(value).encode()
    expected = depth(json.loads(raw)) > MAX_JSON_DEPTH
    assert json_nesting_exceeds(raw, MAX_JSON_DEPTH) == expected


@FUZZ
@given(raw=NOT_QUITE_JSON)
def test_on_any_bytes_the_check_finds_the_brackets_the_regex_found(raw: bytes) -> None:
    expected = reference_shape(raw)
    assert middleware._bracket_shape(raw) == expected
    # The path for a backslash outside strings, on every input, not only those it gets.
    assert middleware._bracket_shape_scanned(raw) == expected


@FUZZ
@given(value=JSON_VALUES, cut=st.integers(min_value=0), stray=st.sampled_from([b"", b"\\"]))
def test_on_broken_json_the_check_finds_the_brackets_the_regex_found(
    value: Any, cut: int, stray: bytes
) -> None:
    # Real JSON cut short (strings left unclosed), perhaps after a stray backslash.
    raw = json.dumps(value).encode()
    raw = stray + raw[: cut % (len(raw) + 1)]
    expected = reference_shape(raw)
    assert middleware._bracket_shape(raw) == expected
    assert middleware._bracket_shape_scanned(raw) == expected


@FUZZ
@given(
    raw=NOT_QUITE_JSON | JSON_VALUES.map(lambda v: json.dumps(v).encode()), size=st.integers(1, 9)
)
def test_slices_of_any_size_find_the_same_brackets(raw: bytes, size: int) -> None:
    # Slices of a few bytes, so that slices end inside strings, at quotes and after them.
    expected = reference_shape(raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(middleware, "_JOIN_SLICE_BYTES", size)
        assert middleware._bracket_shape(raw) == expected
        assert middleware._bracket_shape_scanned(raw) == expected


def test_a_long_body_is_read_in_many_slices_with_the_same_answer() -> None:
    strings = [piece * n for n in range(400) for piece in ('"[', "\\]", "{}", "é")]
    raw = json.dumps({"a": strings, "b": [[{"c": s}] for s in strings]}).encode()
    assert len(raw) > 20 * middleware._JOIN_SLICE_BYTES
    expected = reference_shape(raw)
    assert middleware._bracket_shape(raw) == expected
    assert middleware._bracket_shape_scanned(raw) == expected
    assert json_nesting_exceeds(raw, 3) and not json_nesting_exceeds(raw, 4)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" + b'"",' * 350_000 + b'""]',  # JSON: empty strings
        b'\\[""' + b',""' * 350_000 + b"]",  # a stray backslash, then empty strings
    ],
    ids=["strings", "stray backslash, then strings"],
)
def test_a_body_of_short_strings_costs_a_few_times_its_size(raw: bytes) -> None:
    # Joined all at once, the pieces between quotes took over 30 times the body (80 bytes per
    # piece in bytes.join and in re.sub): 5 MB of empty strings, 170 MB.
    tracemalloc.start()
    try:
        middleware._bracket_shape(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * len(raw), f"{peak / len(raw):.1f} times the body"


# -- the container cap grows with the body size limit ------------------------------------------


def test_the_container_cap_scales_with_the_body_limit_and_never_drops() -> None:
    assert middleware.max_json_containers(5 * 1024 * 1024) == middleware.MAX_JSON_CONTAINERS
    assert middleware.max_json_containers(1000) == middleware.MAX_JSON_CONTAINERS
    assert middleware.max_json_containers(16 * 1024 * 1024) == 320_000


def test_a_6000_result_chart_within_a_raised_limit_is_answered(tmp_path: Any) -> None:
    """121,000 objects and arrays of real FHIR in 6.3 MB: past the default cap, within the one
    for a 16 MiB limit, so the call gets its card instead of a 413."""
    from bench.growth import MAX_BODY_BYTES, build_growth_workloads
    from service import create_app
    from tests.conftest import test_settings

    workload = build_growth_workloads()[-1]
    body = workload.body_bytes()
    containers = middleware._bracket_shape(body).count(b"[")
    assert (
        middleware.MAX_JSON_CONTAINERS < containers < middleware.max_json_containers(MAX_BODY_BYTES)
    )
    app = create_app(test_settings(tmp_path, http={"max_body_bytes": MAX_BODY_BYTES}))
    answer = app.test_client().post(workload.path, data=body, content_type="application/json")
    assert answer.status_code == 200, answer.get_data(as_text=True)[:300]
    cards = answer.get_json()["cards"]
    assert [(c["indicator"], c["source"]["topic"]["code"]) for c in cards] == [
        ("warning", "igm-high")
    ]
    # Past the raised cap, the same kind of body is still refused before it is parsed.
    padded = body.replace(b'"entry": [', b'"entry": [' + b"{}," * 200_000, 1)
    assert padded != body
    refused = app.test_client().post(workload.path, data=padded, content_type="application/json")
    assert refused.status_code == 413
    assert "at most 320000 are accepted" in refused.get_json()["message"]


@FUZZ
@given(raw=st.lists(st.sampled_from([b"\\", b'"', b"u", b"a", b"[", b"]"]), max_size=120))
def test_the_escape_precheck_agrees_with_the_pattern(raw: list[bytes]) -> None:
    # The pattern is skipped when no backslash escapes a quote or a backslash; past 32
    # backslashes the pattern runs whatever they escape.
    text = b"".join(raw)
    found = middleware._QUOTE_OR_BACKSLASH_ESCAPE.search(text) is not None
    precheck = middleware._escapes_quote_or_backslash(text)
    assert precheck == found or (precheck and text.count(b"\\") > 32)
