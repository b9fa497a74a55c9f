"""JSON in and out with orjson: request bodies carry whole prefetch Bundles (100 kB and more),
and decoding them with the standard library was the largest single cost of a hook call.

orjson is also stricter where it matters here: NaN, Infinity and invalid UTF-8 are errors.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from flask import Response
from flask.json.provider import JSONProvider

JSONDecodeError = orjson.JSONDecodeError  # a subclass of json.JSONDecodeError


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


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
