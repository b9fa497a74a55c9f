"""Request bodies are read the same whichever decoder reads them, and a large one is read without
a copy of its own many times its size.

Bodies of LARGE_BODY_BYTES and more (a long-treated patient's whole chart) are decoded with
msgspec, smaller ones with orjson. A caller must not be able to tell: same values, same errors
with the same line and column, same reading of integers beyond 64 bits.
"""

from __future__ import annotations

import copy
import json
import tracemalloc
from typing import Any

import orjson
import pytest

from service.api import json_codec
from tests.conftest import load_fixture

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
