"""JSON in and out with orjson: request bodies carry whole prefetch Bundles (100 kB and more),
and decoding them with the standard library was the largest single cost of a hook call.

orjson is also stricter where it matters here: NaN, Infinity and invalid UTF-8 are errors.

Large bodies are decoded with msgspec instead: orjson first builds a whole document of its own
and then the Python objects, which on a 6.6 MB chart took 111 MB at its peak for 32 MB of
objects; msgspec builds the objects directly, at the same speed. Both read the same JSON the
same way, with two exceptions handled here: integers beyond 64 bits (orjson reads them as
floats, msgspec exactly) go to orjson, and so does any body msgspec refuses, so that an error
is orjson's, with its line and column.

A large hook request is also read lean: each entry of a prefetch value's `entry` list (a
Bundle's resources) is decoded on its own, its resource kept without the fields the caller
names as never read (`prune`), and its strings shared with equal ones already read (a chart
repeats the same systems, codes, units and statuses in every resource). The memory the C heap
freed while the body was read is handed back first. On a 6.6 MB chart a worker's peak went
from 115 to 96 MB without the sharing.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from functools import cache
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


_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])


def loads(data: bytes | str, prune: frozenset[str] = frozenset()) -> Any:
    """The JSON value of `data`; from LARGE_BODY_BYTES on, the fields in `prune` are left out of
    every resource in the Bundles under the body's "prefetch" (see the module's docstring)."""
    if (
        isinstance(data, str)
        or len(data) < LARGE_BODY_BYTES
        or _LONG_DIGIT_RUN in data.translate(_DIGITS_AS_ZEROS)
    ):
        return orjson.loads(data)
    _release_freed_heap()
    try:
        return _pruned_request(data, prune) if prune else _MSGSPEC.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return orjson.loads(data)  # its error, or its reading where msgspec is stricter


def _object_of(raw: Any, value_of: Callable[[str, Any], Any]) -> Any:
    """`raw` as a JSON object whose values `value_of(key, raw value)` decodes; any other JSON
    value decoded as it is."""
    try:
        fields = _FIELDS.decode(raw)
    except msgspec.ValidationError:
        return _MSGSPEC.decode(raw)
    return {key: value_of(key, value) for key, value in fields.items()}


def _array_of(raw: Any, item_of: Callable[[Any], Any]) -> Any:
    """`raw` as a JSON array whose items `item_of(raw item)` decodes; any other JSON value
    decoded as it is."""
    try:
        items = _ITEMS.decode(raw)
    except msgspec.ValidationError:
        return _MSGSPEC.decode(raw)
    return [item_of(item) for item in items]


def _pruned_request(data: bytes, prune: frozenset[str]) -> Any:
    shared: dict[str, str] = {}

    def entry(raw: Any) -> Any:  # one entry's full objects at a time
        value = _MSGSPEC.decode(raw)
        resource = value.get("resource") if isinstance(value, dict) else None
        if isinstance(resource, dict) and not prune.isdisjoint(resource):
            value["resource"] = {k: v for k, v in resource.items() if k not in prune}
        return _share_strings(value, shared)

    def bundle_field(key: str, raw: Any) -> Any:
        return _array_of(raw, entry) if key == "entry" else _MSGSPEC.decode(raw)

    def body_field(key: str, raw: Any) -> Any:
        if key != "prefetch":
            return _MSGSPEC.decode(raw)
        return _object_of(raw, lambda _, value: _object_of(value, bundle_field))

    return _object_of(data, body_field)


def _share_strings(value: Any, shared: dict[str, str]) -> Any:
    """`value` with each string value replaced by an equal one from `shared` (added if new).

    In a 6,000-result chart 127,000 strings hold 24,000 distinct values.
    """
    if isinstance(value, str):
        return shared.setdefault(value, value)
    if isinstance(value, dict):
        for key, item in value.items():  # values replaced, keys unchanged: safe while iterating
            value[key] = _share_strings(item, shared)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            value[index] = _share_strings(item, shared)
    return value


def _release_freed_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc only).

    Reading a large body leaves copies of it freed but kept by malloc (its threshold for
    returning memory rises with the largest block freed), and the parsed objects then come on
    top of them: about 9 MB of a 6.6 MB chart's peak.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@cache
def _malloc_trim() -> Any:
    # The symbols already loaded into the process, the C library's among them.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # only glibc has it
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


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
