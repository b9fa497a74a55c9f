"""JSON in and out with orjson: request bodies carry whole prefetch Bundles (100 kB and more),
and decoding them with the standard library was the largest single cost of a hook call.

orjson is also stricter where it matters here: NaN, Infinity and invalid UTF-8 are errors.

A hook request of ordinary size is first read by the body check (service.api.middleware) with
loads_within_depth: msgspec, with a type that bounds the nesting, so the depth is checked as
the body is decoded and the route takes that value. Where that reading could differ from
loads() (an integer beyond 64 bits) or fails, the route reads the body again with loads().

Large bodies are decoded with msgspec instead: orjson first builds a whole document of its own
and then the Python objects, which on a 6.6 MB chart took 111 MB at its peak for 32 MB of
objects; msgspec builds the objects directly, at the same speed. Both read the same JSON the
same way, with two exceptions handled here: integers beyond 64 bits (orjson reads them as
floats, msgspec exactly) go to orjson, and so does any body msgspec refuses, so that an error
is orjson's, with its line and column.

A large hook request is also read lean: each entry of a prefetch value's `entry` list (a
Bundle's resources) is decoded on its own, kept without the entry fields the caller names as
never read (`prune_entries`), its resource without those named in `prune`. Entries are decoded
by pydantic-core's JSON reader with its string cache on: a chart repeats the same systems,
codes, units and statuses in every resource, and the cache makes each of those one string object
as it reads, where a walk over the decoded values in Python had taken as long as the decoding
itself (6,000 results: 60 against 87 ms, and 16 against 17 MB kept). It reads JSON as msgspec
does but for one case: a number too large for a double is infinity there and an error for the
others, so a body with an exponent of three digits goes to orjson, as do those with long
integers. The memory the C heap freed while the body was read is handed back first.
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
from functools import cache
from typing import Annotated, Any

import msgspec
import orjson
import pydantic_core
from flask import Response
from flask.json.provider import JSONProvider

JSONDecodeError = orjson.JSONDecodeError  # a subclass of json.JSONDecodeError


# From this size on, a body is decoded without orjson's intermediate document.
LARGE_BODY_BYTES = 1024 * 1024
_MSGSPEC = msgspec.json.Decoder()


def _number_marks() -> bytes:
    """For _orjson_numbers: each digit becomes "0", "e" or "E" an "e", a byte a number may follow
    (":", ",", "[") a ":", whitespace a space; "+", "-" and "." stay, any other byte is an "x"."""
    marks = bytearray(b"x" * 256)
    for kept, made in ((b"0123456789", b"0"), (b"eE", b"e"), (b":,[", b":"), (b" \t\r\n", b" ")):
        for byte in kept:
            marks[byte] = made[0]
    for byte in b"+-.":
        marks[byte] = byte
    return bytes(marks)


_NUMBER_MARKS = _number_marks()
# 19 digits in a row: an integer that may not fit in 64 bits.
_LONG_DIGIT_RUN = b"0" * 19
# A digit, then an exponent of three digits or more not below zero: perhaps too large a number.
_LARGE_EXPONENT = re.compile(rb"0e\+?000")
# What must come before such an exponent for it to be a number's: a mantissa, and before that
# a ":" or the start of the document.
_MANTISSA = re.compile(rb"(?:\A|:) *-?[0.]+\Z")
# A mantissa without 19 digits in a row is shorter than this.
_MANTISSA_BYTES = 48
# Past this many exponents of numbers inside strings (hex ids hold some), orjson reads the body.
_MAX_EXPONENTS_CHECKED = 10_000
# _orjson_numbers' slices, the bytes each also reads before it (a 19-digit run, a mantissa),
# and after it (the longest match of _LARGE_EXPONENT).
_NUMBERS_SLICE_BYTES = 256 * 1024
_NUMBERS_OVERLAP = 64
_EXPONENT_BYTES = 6


_Scalar = str | int | float | bool | None
# The body in one pass over its bytes, down to the objects at its third level (a prefetch value:
# a Bundle, a Patient), whose arrays (a Bundle's entries) are left as their items' raw JSON, to
# be read one at a time. Any other value is decoded as _MSGSPEC decodes it: each union below
# takes every JSON value, so only a body that is not an object fails the type.
_THIRD_LEVEL = dict[str, list[msgspec.Raw] | _Scalar | dict]
_SECOND_LEVEL = dict[str, _THIRD_LEVEL | _Scalar | list]
_BODY = msgspec.json.Decoder(dict[str, _SECOND_LEVEL | _Scalar | list])


def loads(
    data: bytes | str,
    prune: frozenset[str] = frozenset(),
    prune_entries: frozenset[str] = frozenset(),
) -> Any:
    """The JSON value of `data`; from LARGE_BODY_BYTES on, the fields in `prune_entries` are left
    out of every entry of the Bundles under the body's "prefetch", and those in `prune` out of
    each entry's resource (see the module's docstring)."""
    if isinstance(data, str) or len(data) < LARGE_BODY_BYTES or _orjson_numbers(data):
        return orjson.loads(data)
    _release_freed_heap()
    try:
        if not prune and not prune_entries:
            return _MSGSPEC.decode(data)
        return _pruned_request(data, prune, prune_entries)
    except (ValueError, RecursionError):  # decoders' errors are ValueErrors
        return orjson.loads(data)  # its error, or its reading where the others are stricter


# -- a small body read and its nesting checked in the same pass -----------------------------

# The containers a body's type spells out level by level. msgspec builds a type's nodes without
# sharing them, so each level doubles them (0.1 s and 0.3 MB at 12): values below that level are
# read as msgspec reads any value, and their own depth measured in Python. Real FHIR in a CDS
# Hooks request nests 13 deep at most: the benchmark's records measure 32 such values a call.
_TYPED_LEVELS = 12
# The integers orjson reads exactly and msgspec can bound; beyond, orjson reads a float (or an
# exact integer up to 2**64 - 1), so such a body is left to loads().
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_Int64 = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]
_Scalar64 = str | _Int64 | float | bool | None


class _AnyValue(type):
    def __instancecheck__(cls, value: object) -> bool:
        return True  # msgspec checks what the decoding hook returns against the type


class _Deeper(metaclass=_AnyValue):
    """The type of a value below _TYPED_LEVELS containers (_check_deeper reads it)."""


# Values below the typed levels that one decoding looks at in Python, at most (each value
# handed over, each item under it): a real request has a few dozen. Past it the body is left to
# the caller's byte scan, so that a body made of such values costs no more than that scan.
_DEEPER_VALUES = 5_000
# Reset as each decoding starts; a decoding never yields to another greenlet, so it counts
# only its own values whether or not gevent has made this local per greenlet.
_deeper_seen = threading.local()


def loads_within_depth(data: bytes, max_depth: int) -> tuple[bool, Any]:
    """(True, the JSON value of `data`, as loads() reads it) if `data` is a JSON document whose
    arrays and objects nest at most `max_depth` deep; (False, None) if it is not, or if it holds
    an integer beyond 64 bits or too many values below the typed levels, for the caller to tell
    which with its own checks.

    The nesting is checked as the body is decoded, in C but for the rare values more than
    _TYPED_LEVELS deep: a separate pass over the bytes cost about half as much as the decoding.
    """
    _deeper_seen.count = 0
    try:
        return True, _nesting_decoder(max_depth).decode(data)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return False, None


@cache
def _nesting_decoder(max_depth: int) -> msgspec.json.Decoder:
    """A decoder of JSON nesting at most `max_depth` deep (built once: it takes 0.1 s)."""
    typed = min(_TYPED_LEVELS, max_depth)
    budget = max_depth - typed  # for the values below the typed levels
    value: Any = _Deeper if budget else _Scalar64
    for _ in range(typed):
        value = dict[str, value] | list[value] | _Scalar64

    def read_deeper(kind: type, deeper: Any) -> Any:
        _check_deeper(deeper, budget)
        return deeper

    return msgspec.json.Decoder(value, dec_hook=read_deeper)


def _check_deeper(value: Any, budget: int) -> None:
    """ValueError (msgspec's decoding error) if `value`'s arrays and objects nest more than
    `budget` deep, if it holds an integer beyond 64 bits, or if the decoding has now looked at
    more than _DEEPER_VALUES values this way; one level of it at a time."""
    level = [value]
    depth = 0
    while level:
        _deeper_seen.count += len(level)
        if _deeper_seen.count > _DEEPER_VALUES:
            raise ValueError("too many values below the typed levels")
        below: list[Any] = []
        containers = False
        for item in level:
            kind = type(item)
            if kind is dict:
                below.extend(item.values())
                containers = True
            elif kind is list:
                below.extend(item)
                containers = True
            elif kind is int and not _INT64_MIN <= item <= _INT64_MAX:
                raise ValueError("an integer beyond 64 bits")
        depth += containers
        if depth > budget:
            raise ValueError("nested too deeply")
        level = below


# -- numbers only orjson reads as orjson does -------------------------------------------------


def _orjson_numbers(data: bytes) -> bool:
    """Whether `data` may hold a number only orjson reads as orjson does: an integer beyond 64
    bits, or one too large for a double. Such text in a string may answer True too.

    The marks are made a slice at a time, each with the bytes before it that a match needs: a
    copy of a 6.6 MB chart made whole was 6.6 MB on top of the body at the worker's peak.
    """
    checked = 0
    for start in range(0, len(data), _NUMBERS_SLICE_BYTES):
        # From _NUMBERS_OVERLAP bytes back: a run of 19 digits, or a mantissa before an
        # exponent, that began in the slice before is seen whole. Only matches that start in
        # this slice are taken, so none is counted twice, and \A is the document's start only.
        begin = max(0, start - _NUMBERS_OVERLAP)
        marks = data[begin : start + _NUMBERS_SLICE_BYTES + _EXPONENT_BYTES].translate(
            _NUMBER_MARKS
        )
        if _LONG_DIGIT_RUN in marks:
            return True
        for exponent in _LARGE_EXPONENT.finditer(marks, start - begin):
            if exponent.start() >= start - begin + _NUMBERS_SLICE_BYTES:
                break
            end = exponent.start() + 1
            if checked == _MAX_EXPONENTS_CHECKED or _MANTISSA.search(
                marks, max(0, end - _MANTISSA_BYTES), end
            ):
                return True
            checked += 1
    return False


def _decode_shared(raw: Any) -> Any:
    """The JSON value of `raw` (msgspec.Raw), its short strings shared with equal ones read."""
    return pydantic_core.from_json(bytes(raw), cache_strings="all", allow_inf_nan=False)


def _pruned_request(data: bytes, prune: frozenset[str], prune_entries: frozenset[str]) -> Any:
    try:
        body = _BODY.decode(data)
    except msgspec.ValidationError:  # not an object
        return _MSGSPEC.decode(data)

    def entry(raw: Any) -> Any:  # one entry's full objects at a time
        value = _decode_shared(raw)
        if not isinstance(value, dict):
            return value
        if not prune_entries.isdisjoint(value):
            for name in prune_entries:
                value.pop(name, None)  # an entry's table is the smallest there is: nothing kept
        resource = value.get("resource")
        if isinstance(resource, dict) and not prune.isdisjoint(resource):
            # A new dict, not fields deleted in place: a dict keeps the table of its largest
            # size, and on a 6,000-result chart that was about 1 MB more at the worker's peak.
            value["resource"] = {k: v for k, v in resource.items() if k not in prune}
        return value

    for key, second in body.items():
        if type(second) is not dict:
            continue
        for third in second.values():
            if type(third) is not dict:
                continue
            for name, items in third.items():
                if type(items) is list:  # raw items (_BODY)
                    if key == "prefetch" and name == "entry":
                        third[name] = [entry(item) for item in items]
                    else:
                        third[name] = [_MSGSPEC.decode(item) for item in items]
    return body


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
