"""What wraps every request: request id and timing, CORS, security headers, auth, body limits.

Browser clients (the public CDS Hooks sandbox) call every route from the page, so CORS covers
all routes and answers preflight before authentication: a preflight carries no token.
"""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, Response, g, request

from service.api import json_codec
from service.api.bodies import BoundedRequest
from service.api.errors import ApiError
from service.unique_ids import uuid4_hex

log = logging.getLogger("flare_cds.http")

# Routes no client JWT is asked for: liveness, readiness, metrics (access.py guards those) and
# the public contract.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.yaml"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Accept, X-Request-Id"
CORS_ALLOW_METHODS = "GET, POST, OPTIONS"
# Bodies the routes parse as JSON (routes.JSON_TYPES); others are answered 415 without reading.
JSON_BODY_TYPES = ("application/json", "application/fhir+json")
# Far deeper than any FHIR resource or CDS Hooks request, far shallower than what makes
# recursive Python code (schema validation, error rendering) hit the interpreter's limit.
MAX_JSON_DEPTH = 100
# Objects and arrays in one body, per 5 MiB of `http.max_body_bytes` (so 100,000 at the default).
# A long-treated patient's full prefetch is about 18-19 per kB (2,300 in the benchmark's 124 kB
# record, 121,000 in its 6.3 MB one), so a body of real FHIR within the size limit stays under it;
# 400,000 empty objects in 1.2 MB, which cost seconds of parsing and validation, do not.
MAX_JSON_CONTAINERS = 100_000
CONTAINERS_BODY_BYTES = 5 * 1024 * 1024


def max_json_containers(max_body_bytes: int) -> int:
    """The container cap for a body size limit: never below MAX_JSON_CONTAINERS."""
    return max(MAX_JSON_CONTAINERS, MAX_JSON_CONTAINERS * max_body_bytes // CONTAINERS_BODY_BYTES)


# Brackets inside string literals do not nest anything. Telling where strings end takes linear
# time on any input: bytes methods, and patterns that never backtrack (see _bracket_shape).
_OBJECTS_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")
_NOT_SHAPE = bytes(sorted(set(range(256)) - set(b'[]{}"\\')))
# The escapes that can hide where a string ends: an escaped backslash, an escaped quote.
_QUOTE_OR_BACKSLASH_ESCAPE = re.compile(rb'\\[\\"]')
# For _bracket_shape_scanned: brackets (objects as arrays), quotes, backslashes; all else a space.
_SCAN_BYTES = bytes(c if c in b'[]{}"\\' else 32 for c in range(256)).translate(_OBJECTS_AS_ARRAYS)
# A string once each escaped quote is a "'": any quote opens one, only a plain quote closes it.
_SCANNED_STRING = re.compile(b'[\'"][^"]*"')
# How much of the marks _outside_strings and _without_strings split and join at once.
_JOIN_SLICE_BYTES = 32 * 1024


def _bracket_shape(raw: bytes) -> bytes:
    """The brackets of `raw` outside string literals, objects written as arrays.

    A string runs from a quote to the next quote that no backslash escapes; one that is never
    closed keeps everything from its opening quote on. Outside strings a backslash is an
    ordinary byte (so a quote right after one there opens a string). Linear time on any input.
    """
    # In a string a backslash escapes the byte after it, pairing from the left of each run of
    # backslashes. Pairing the same way over the whole text (each run starts after a byte no
    # backslash escapes) and writing each escaped backslash or quote as one backslash takes out
    # every escaped quote and no other. Outside strings JSON has no backslash; where the text has
    # one, the pairing may have taken an opening quote there, but leaves a backslash to tell.
    traced = (
        _QUOTE_OR_BACKSLASH_ESCAPE.sub(b"\\\\", raw) if _escapes_quote_or_backslash(raw) else raw
    )
    # Every quote left opens or closes a string, so the pieces between quotes alternate out/in.
    marks = traced.translate(_OBJECTS_AS_ARRAYS, _NOT_SHAPE)
    quotes = marks.count(b'"')
    # After an odd number of quotes, what follows the last one is a string never closed.
    unclosed = marks[marks.rfind(b'"') + 1 :] if quotes % 2 else b""
    if not quotes % 2:
        # Every string is closed. Two quotes with nothing between them (a string with no
        # brackets in it, or the gap between two strings) can go first: that keeps the
        # alternation and every bracket's side, and leaves a few pieces instead of one per string.
        marks = marks.replace(b'""', b"")
    outside = _outside_strings(marks)
    if b"\\" in outside:
        return _bracket_shape_scanned(raw)
    return outside + unclosed.replace(b"\\", b"")


# Up to this many backslashes are looked at one by one; more go straight to the pattern.
_FEW_BACKSLASHES = 32


def _escapes_quote_or_backslash(raw: bytes) -> bool:
    """Whether a backslash in `raw` comes before a quote or another backslash.

    Real FHIR has few backslashes, mostly in \\uXXXX escapes; finding them is cheaper than
    running the pattern over the whole body, which costs about 35 us per 125 kB.
    """
    at = raw.find(b"\\")
    for _ in range(_FEW_BACKSLASHES):
        if at < 0:
            return False
        if raw[at + 1 : at + 2] in (b'"', b"\\"):
            return True
        at = raw.find(b"\\", at + 2)  # the byte after it is escaped, whatever it is
    return at >= 0  # more backslashes than that: the pattern decides


def _outside_strings(marks: bytes) -> bytes:
    """The pieces of `marks` between quotes that lie outside strings (the first, the third, ...),
    joined; a slice of `marks` at a time, in linear time.

    bytes.join sets aside about 80 bytes per piece it joins: the pieces of a 6 MB prefetch body
    (400,000 strings) joined at once took 35 MB, and 5 MB of empty strings would take 130 MB.
    """
    joined = []
    inside = 0  # whether the slice starts inside a string: the parity of the quotes before it
    for start in range(0, len(marks), _JOIN_SLICE_BYTES):
        pieces = marks[start : start + _JOIN_SLICE_BYTES].split(b'"')
        joined.append(b"".join(pieces[inside::2]))
        inside = (inside + len(pieces) - 1) % 2
    return b"".join(joined)


def _bracket_shape_scanned(raw: bytes) -> bytes:
    """_bracket_shape for text with a backslash outside strings (never JSON).

    There a quote right after a backslash opens a string, so the pieces between quotes no longer
    alternate out/in; the strings are matched one after the other instead, still in linear time.
    """
    # Each run of backslashes cut to its parity: a backslash left escapes the byte after it.
    reduced = raw.replace(b"\\\\", b"").translate(_SCAN_BYTES)
    marked = reduced.replace(b'\\"', b"'").translate(None, b" \\")  # only []"' are left
    # Every string but perhaps the last closes before the last plain quote, and each match ends
    # at the first plain quote after its start: no match ever backtracks, none fails but at the
    # last quote. After it, unclosed string or not, every bracket counts.
    last = marked.rfind(b'"') + 1
    shape = _without_strings(marked[:last]) + marked[last:]
    return shape.translate(None, b"\"'")


def _without_strings(marked: bytes) -> bytes:
    """`marked` with its strings taken out, as _SCANNED_STRING.sub(b"", marked) would, but a
    slice at a time: like bytes.join, the substitution sets aside about 80 bytes per match.

    Each slice ends at a plain quote. A string that starts before it ends there or earlier, so
    the slice's matches are the ones the whole text has; only the quote at the end may be left
    over, opening a string, and then the next slice starts with it.
    """
    kept = []
    start = 0
    while start < len(marked):
        end = marked.rfind(b'"', start + 1, start + _JOIN_SLICE_BYTES)
        if end < 0:
            end = marked.find(b'"', start + 1)
        if end < 0:  # only the last quote is left, and it opens a string
            kept.append(marked[start:])
            break
        piece = _SCANNED_STRING.sub(b"", marked[start : end + 1])
        if piece.endswith(b'"'):  # the quote at `end` opens a string: read it with the next slice
            kept.append(piece[:-1])
            start = end
        else:
            kept.append(piece)
            start = end + 1
    return b"".join(kept)


def json_nesting_exceeds(raw: bytes, limit: int) -> bool:
    """True if arrays and objects in `raw` nest deeper than `limit`.

    Works on the bytes, before parsing: Python's parser accepts nesting close to the recursion
    limit, and the first recursive walk over such a value (jsonschema, repr) then fails as a 500.
    Each pass deletes the innermost bracket pairs, so `limit` passes empty any document that is
    shallow enough. Malformed bracket sequences stop shrinking and are left to the parser.
    """
    return _shape_nests_deeper(_bracket_shape(raw), limit)


def _shape_nests_deeper(shape: bytes, limit: int) -> bool:
    for _ in range(limit):
        inner = shape.replace(b"[]", b"")
        if inner == shape:
            return False
        shape = inner
    return b"[]" in shape


def install(app: Flask) -> None:
    settings = app.extensions["flare_cds"].settings
    origins = settings.http.cors_origins
    max_containers = max_json_containers(settings.http.max_body_bytes)
    app.request_class = BoundedRequest
    json_codec.loads_within_depth(b"{}", MAX_JSON_DEPTH)  # its decoder built now, not on a call

    @app.before_request
    def _start() -> Response | None:
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = (
            incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid4_hex()
        )
        g.log_fields = {}
        if request.method == "OPTIONS":
            preflight = Response(status=204)
            # No body, so no type: Flask would otherwise label the empty answer text/html.
            preflight.headers.pop("Content-Type", None)
            return preflight
        if request.path not in PUBLIC_PATHS and request.path.startswith("/cds-services"):
            _authenticate(app)
        _check_json_body(max_containers)
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        _add_headers(
            response, [*_cors(response, origins), ("X-Request-Id", g.get("request_id", ""))]
        )
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        elapsed_ms = elapsed * 1000
        _count_call(app, response, elapsed)
        # Method, path, status and timing only: no body, no query string, no headers.
        log.info(
            "request",
            extra={
                "request_id": g.get("request_id"),
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "ms": round(elapsed_ms, 2),
                **g.get("log_fields", {}),
            },
        )
        return response


# Endpoint names as route labels; the hook endpoint is "hook".
_ROUTE_LABELS = {"call_service": "hook"}


def _count_call(app: Flask, response: Response, elapsed: float) -> None:
    """Metrics for one call, labelled by route and service id only (never a request value)."""
    from service import metrics

    rule = request.url_rule
    route = "unmatched" if rule is None else str(rule.endpoint).rpartition(".")[2]
    route = "preflight" if request.method == "OPTIONS" else _ROUTE_LABELS.get(route, route)
    service = (request.view_args or {}).get("service_id", "")
    if service not in app.extensions["flare_cds"].definitions:
        service = ""  # an unknown id is client text: it must not become a label
    status = str(response.status_code)
    metrics.CALLS.labels(route, service, status).inc()
    metrics.LATENCY.labels(route, service).observe(elapsed)
    if response.status_code >= 400:
        body = response.get_json(silent=True) if response.is_json else None
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, str) else "other"
        metrics.ERRORS.labels(route, service, status, metrics.reason_label(error)).inc()


# Every answer carries these unless its route set its own (the timeline's pages do).
_DEFAULT_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
)
_CORS_HEADERS = (
    ("Access-Control-Allow-Headers", CORS_ALLOW_HEADERS),
    ("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
    ("Access-Control-Expose-Headers", "X-Request-Id, WWW-Authenticate"),
    ("Access-Control-Max-Age", "600"),
)


def _add_headers(response: Response, replacing: list[tuple[str, str]]) -> None:
    """Set `replacing` (over any value the route gave) and the default headers the route did not
    give, looking at the headers once: Werkzeug's set() and setdefault() each scan them all."""
    headers = response.headers
    present = {name.lower() for name in headers.keys()}
    added = []
    for name, value in replacing:
        if name.lower() in present:
            headers[name] = value
        else:
            added.append((name, value))
    added += [(n, v) for n, v in _DEFAULT_HEADERS if n.lower() not in present]
    headers.extend(added)


def _cors(response: Response, origins: tuple[str, ...]) -> list[tuple[str, str]]:
    """The CORS headers of this answer."""
    if "*" in origins:
        allowed = "*"
    else:
        # The answer depends on Origin even when it is refused: a shared cache must not hand a
        # response without CORS headers to an allowed origin, nor one origin's to another.
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if not origin or origin not in origins:
            return []
        allowed = origin
    return [("Access-Control-Allow-Origin", allowed), *_CORS_HEADERS]


def _check_json_body(max_containers: int) -> None:
    """Refuse JSON too deep or with too many parts before a route parses and walks it.

    A body under 1 MiB that surely has no more parts than the cap is decoded here with its depth
    checked as it is read, and the route takes that value; any other, and one that decoding
    refuses, is measured on its bytes. Both take time linear in the body's size, so an absurd
    body costs about as much as reading it; the schema's maxItems caps are checked next, before
    the full validation (service.api.contract).
    """
    if request.method != "POST" or request.url_rule is None:
        return
    if (request.mimetype or "").lower() not in JSON_BODY_TYPES:
        return
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        # Read as JSON, compressed bytes would only be "invalid JSON".
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding[:40]} is not accepted; send the body uncompressed",
        )
    # Cached, so the route's own get_data() reads this copy; a body over the limit is a 413 here.
    raw = request.get_data(cache=True)
    # A body of ordinary size is decoded with its depth checked as it is read, and the route
    # takes the value.
    if len(raw) < json_codec.LARGE_BODY_BYTES and _within_container_cap(raw, max_containers):
        read, value = json_codec.loads_within_depth(raw, MAX_JSON_DEPTH)
        if read:
            request.checked_json = value
            return
    # Otherwise (a large body, too deep, not JSON at all) the bytes are measured as they are.
    shape = _bracket_shape(raw)
    if _shape_nests_deeper(shape, MAX_JSON_DEPTH):
        raise ApiError(
            400, "invalid_json", f"the body nests arrays or objects more than {MAX_JSON_DEPTH} deep"
        )
    containers = shape.count(b"[")
    if containers > max_containers:
        raise ApiError(
            413,
            "payload_too_large",
            f"the body holds {containers} objects and arrays; at most {max_containers} "
            "are accepted",
        )


def _within_container_cap(raw: bytes, cap: int) -> bool:
    """Whether `raw` surely holds at most `cap` objects and arrays, without finding its strings:
    each takes two bytes at least, and each opens with a bracket (brackets in strings count too,
    so the count is an upper bound)."""
    return len(raw) // 2 <= cap or raw.count(b"[") + raw.count(b"{") <= cap


def _authenticate(app: Flask) -> None:
    runtime = app.extensions["flare_cds"]
    if not runtime.settings.auth.required:
        return
    from service import metrics
    from service.auth.tokens import (
        AuthError,
        TokenCheckUnavailable,
        audience_for,
        www_authenticate,
    )

    audience = audience_for(request.url, request.path, runtime.settings.auth.public_base_url)
    try:
        g.client_claims = runtime.verifier().verify(request.headers.get("Authorization"), audience)
    except TokenCheckUnavailable as exc:
        # Fail closed: a token whose jti cannot be checked might be a replay.
        metrics.TOKEN_REJECTIONS.labels(exc.reason).inc()
        g.log_fields = {"auth": exc.reason}
        raise ApiError(
            503,
            "store_unavailable",
            "the token cannot be checked against replays right now; try again shortly",
            headers={"Retry-After": "5"},
        ) from None
    except AuthError as exc:
        metrics.TOKEN_REJECTIONS.labels(metrics.reason_label(exc.reason)).inc()
        g.log_fields = {"auth": exc.reason}
        raise ApiError(
            401,
            "unauthorized",
            exc.reason,
            headers={"WWW-Authenticate": www_authenticate(exc.reason)},
        ) from None
