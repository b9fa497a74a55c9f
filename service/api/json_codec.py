"""JSON in and out with orjson: request bodies carry whole prefetch Bundles (100 kB and more),
and decoding them with the standard library was the largest single cost of a hook call.

orjson is also stricter where it matters here: NaN, Infinity and invalid UTF-8 are errors.

Large bodies are decoded with msgspec instead: orjson first builds a whole document of its own
and then the Python objects, which on a 6.6 MB chart took 111 MB at its peak for 32 MB of
objects; msgspec builds the objects directly, at the same speed. Both read the same JSON the
same way, with two exceptions handled here: integers beyond 64 bits (orjson reads them as
floats, msgspec exactly) go to orjson, and so does any body msgspec refuses, so that an error
is orjson's, with its line and column.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
from flask import Response
from flask.json.provider import JSONProvider

JSONDecodeError = orjson.JSONDecodeError  # a subclass of json.JSONDecodeError


# From this size on, a body is decoded without orjson's intermediate document.
LARGE_BODY_BYTES = 1024 * 1024
_MSGSPEC = msgspec.json.Decoder()
# Each digit becomes "0" and every other byte a space: 19 zeros in a row mark an integer that may
# not fit in 64 bits (or a long run of digits in a string, which orjson reads just as well).
_DIGITS_AS_ZEROS = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_LONG_DIGIT_RUN = b"0" * 19


def loads(data: bytes | str) -> Any:
    if (
        isinstance(data, str)
        or len(data) < LARGE_BODY_BYTES
        or _LONG_DIGIT_RUN in data.translate(_DIGITS_AS_ZEROS)
    ):
        return orjson.loads(data)
    try:
        return _MSGSPEC.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return orjson.loads(data)  # its error, or its reading where msgspec is stricter


def dumps_bytes(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:
        # orjson refuses what JSON allows but it cannot hold (integers beyond 64 bits).
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")


class OrjsonProvider(JSONProvider):
    """Flask's jsonify / request.get_json through orjson (keys kept in insertion order)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps_bytes(obj).decode("utf-8")

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(dumps_bytes(obj), mimetype="application/json")
