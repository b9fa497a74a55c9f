"""HTTP-level security: the client JWT at the gate, CORS, hardening, and what the logs keep.

TokenVerifier is unit-tested in test_auth.py; here everything goes through the app the way a
client meets it: the Flask test client for breadth, a real loopback HTTP server where the URL
actually called matters (`aud`, chunked bodies), and the real `flare-cds serve` for the logs.
Client JWTs are signed on the real clock (the verifier's); clinical data stays at FIXTURE_NOW.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from service import create_app
from service.api.middleware import MAX_JSON_DEPTH
from service.logging_setup import JsonFormatter
from service.settings import IssuerSettings, Settings
from tests.auth import test_tokens as test_auth
from tests.auth.test_tokens import EC_A, EC_B, Key, bearer, sign, write_jwks
from tests.conftest import (
    FIXTURE_NOW,
    LiveServer,
    ServeProcess,
    as_of_today,
    assert_conforms,
    load_fixture,
    test_settings,
)
from tests.fhir_test_server import FhirTestServer

# The loopback JWK Set host of test_auth.py, used here as a fixture of this module too.
jwks_server = test_auth.jwks_server

BASE = "https://cds.example.org"  # auth.public_base_url: the name clients call us by
ISS = "https://ehr.example.org/"
SANDBOX_ISS = "https://sandbox.cds-hooks.org"
SANDBOX_JKU = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
ORIGIN = "https://sandbox.cds-hooks.org"  # the browser page a sandbox user calls us from
DISCOVERY = "/cds-services"
HOOK = "/cds-services/rituximab-flare-order-sign"
FEEDBACK = HOOK + "/feedback"
SCENARIO = "order-sign/wm-igm-4500-rituximab"  # warns: a card comes back
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# -- helpers -------------------------------------------------------------------------------


def client_jwt(aud: str, *, key: Key = EC_A, iss: str = ISS, **header: Any) -> str:
    """A CDS Client's JWT for one call: `aud` is the exact URL the client calls."""
    now = int(time.time())
    claims = {"iss": iss, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    return sign(key, claims, **header)


def auth_header(token: str) -> dict[str, str]:
    return {"Authorization": bearer(token)}


def feedback_body(card: str, comment: str = "Apheresis booked for Monday.") -> dict[str, Any]:
    return {
        "feedback": [
            {
                "card": card,
                "outcome": "overridden",
                "overrideReason": {
                    "reason": {
                        "system": "https://flare-cds.example.org/CodeSystem/override-reason",
                        "code": "plasmapheresis-planned",
                        "display": "Plasmapheresis already planned",
                    },
                    "userComment": comment,
                },
                "outcomeTimestamp": "2026-11-20T12:05:00Z",
            }
        ]
    }


# method, path, JSON body of a well-formed call to each authenticated endpoint
CALLS: dict[str, tuple[str, str, Callable[[], Any]]] = {
    "discovery": ("GET", DISCOVERY, lambda: None),
    "hook": ("POST", HOOK, lambda: load_fixture(SCENARIO)),
    "feedback": ("POST", FEEDBACK, lambda: feedback_body(str(uuid.uuid4()))),
}


def call(client: Any, name: str, token: str | None = None, **kwargs: Any) -> Any:
    method, path, body = CALLS[name]
    headers = auth_header(token) if token else {}
    return client.open(path, method=method, json=body(), headers=headers, **kwargs)


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == code
    assert_conforms(body, "Error")
    return body


def header_list(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def auth_settings(tmp_path: Path, *issuers: IssuerSettings, **sections: Any) -> Settings:
    auth = {"required": True, "public_base_url": BASE, "issuers": issuers}
    return test_settings(tmp_path, auth={**auth, **sections.pop("auth", {})}, **sections)


@pytest.fixture
def auth_client(tmp_path: Path) -> Any:
    """Auth on, keys from a file, the public name BASE; CORS left at its default `*`."""
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A))
    app = create_app(auth_settings(tmp_path, issuer), clock=lambda: FIXTURE_NOW)
    return app.test_client()


# -- 1. authentication at the HTTP gate ------------------------------------------------------


@pytest.mark.parametrize("name", CALLS)
def test_calls_without_a_token_are_refused_with_a_bearer_challenge(
    auth_client: Any, name: str
) -> None:
    response = call(auth_client, name)
    body = assert_error(response, 401, "unauthorized")
    # RFC 6750 section 3.1: a request without credentials gets the challenge, no error code.
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="flare-cds"'
    assert body["message"] == "missing bearer token"


def _forged(aud: str) -> str:
    return client_jwt(aud, key=Key(EC_A.kid, "ES384", EC_B.private))  # right kid, wrong key


def _expired(aud: str) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": aud, "iat": now - 900, "exp": now - 600, "jti": "old"}
    return sign(EC_A, claims)


def _other_issuer(aud: str) -> str:
    return client_jwt(aud, iss="https://evil.example/")


def _hmac(aud: str) -> str:
    now = int(time.time())
    claims = {"iss": ISS, "aud": aud, "iat": now, "exp": now + 300, "jti": "h"}
    return jwt.encode(claims, "x" * 32, "HS256", headers={"kid": EC_A.kid})


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (_forged, "signature invalid"),
        (_expired, "token expired"),
        (_other_issuer, "issuer not allowed"),
        (_hmac, "algorithm not allowed"),
        (lambda aud: client_jwt(BASE + "/cds-services/other"), "audience mismatch"),
    ],
    ids=["forged", "expired", "other-issuer", "hmac", "other-aud"],
)
@pytest.mark.parametrize("name", CALLS)
def test_bad_tokens_are_refused_and_nothing_of_them_is_echoed(
    auth_client: Any, name: str, make_token: Callable[[str], str], reason: str
) -> None:
    token = make_token(BASE + CALLS[name][1])
    response = call(auth_client, name, token)
    body = assert_error(response, 401, "unauthorized")
    assert body["message"] == reason
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="flare-cds", error="invalid_token"')
    # The answer says why, never what: no part of the token, header or body of the answer.
    answer = response.get_data(as_text=True) + "".join(f"{k}:{v}" for k, v in response.headers)
    for segment in token.split(".")[1:]:
        assert segment[:12] not in answer


@pytest.mark.parametrize("name", CALLS)
def test_a_valid_es384_token_for_the_url_called_passes(auth_client: Any, name: str) -> None:
    token = client_jwt(BASE + CALLS[name][1])
    assert jwt.get_unverified_header(token)["alg"] == "ES384"
    response = call(auth_client, name, token)
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    expected_key = {"discovery": "services", "hook": "cards", "feedback": "received"}[name]
    assert answer[expected_key]


def test_a_token_is_bound_to_the_path_it_was_made_for(auth_client: Any) -> None:
    discovery_token = client_jwt(BASE + DISCOVERY)
    response = call(auth_client, "hook", discovery_token)
    assert assert_error(response, 401, "unauthorized")["message"] == "audience mismatch"


def test_a_replayed_token_is_refused(auth_client: Any) -> None:
    token = client_jwt(BASE + HOOK)
    assert call(auth_client, "hook", token).status_code == 200
    replay = call(auth_client, "hook", token)
    assert assert_error(replay, 401, "unauthorized")["message"] == "token replayed"


@pytest.mark.parametrize("path", ["/healthz", "/openapi.yaml"])
def test_health_and_contract_stay_public(auth_client: Any, path: str) -> None:
    response = auth_client.get(path)
    assert response.status_code == 200
    assert "WWW-Authenticate" not in response.headers


@pytest.mark.parametrize("name", CALLS)
def test_preflight_needs_no_token(auth_client: Any, name: str) -> None:
    method, path, _ = CALLS[name]
    response = auth_client.options(
        path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert response.get_data() == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    allowed_headers = header_list(response.headers.get("Access-Control-Allow-Headers"))
    assert {"authorization", "content-type"} <= allowed_headers
    assert {"get", "post", "options"} <= header_list(
        response.headers.get("Access-Control-Allow-Methods")
    )
    assert "www-authenticate" in header_list(response.headers["Access-Control-Expose-Headers"])


def test_sandbox_shaped_token_is_accepted_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the public sandbox sends: ES384, its jku, 5 minutes, no `sub`; keys from a file."""

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sandbox's keys are configured: nothing may be fetched")

    monkeypatch.setattr(requests.Session, "request", no_network)
    issuer = IssuerSettings(SANDBOX_ISS, jku=(SANDBOX_JKU,), jwks_file=write_jwks(tmp_path, EC_A))
    client = create_app(auth_settings(tmp_path, issuer), clock=lambda: FIXTURE_NOW).test_client()
    token = client_jwt(BASE + HOOK, iss=SANDBOX_ISS, jku=SANDBOX_JKU)
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header == {"alg": "ES384", "typ": "JWT", "kid": EC_A.kid, "jku": SANDBOX_JKU}
    assert claims["exp"] - claims["iat"] == 300 and "sub" not in claims
    response = call(client, "hook", token)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["cards"]


def test_aud_is_the_url_actually_called_over_real_http(
    tmp_path: Path, jwks_server: test_auth.JwksServer, http: requests.Session
) -> None:
    """No public_base_url: `aud` must be the URL on the wire; keys come from a real JWKS host."""
    jwks_server.serve(EC_A)
    issuer = IssuerSettings(ISS, jwks_url=jwks_server.url)
    settings = auth_settings(tmp_path, issuer, auth={"public_base_url": None})
    app = create_app(settings, clock=lambda: FIXTURE_NOW)
    with LiveServer(app) as live:
        hook_url = live.url + HOOK
        ok = http.post(
            hook_url, json=load_fixture(SCENARIO), headers=auth_header(client_jwt(hook_url))
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["cards"]
        discovery_url = live.url + DISCOVERY
        listed = http.get(discovery_url, headers=auth_header(client_jwt(discovery_url)))
        assert listed.status_code == 200
        # Signed for the service's public name, but that is not the URL this client called.
        elsewhere = client_jwt(BASE + HOOK)
        refused = http.post(hook_url, json=load_fixture(SCENARIO), headers=auth_header(elsewhere))
        assert refused.status_code == 401
        assert refused.json() == {"error": "unauthorized", "message": "audience mismatch"}
    assert jwks_server.hits == 1  # fetched once, then served from the cache


@pytest.mark.parametrize("public_base_url", [None, BASE])
def test_aud_may_spell_a_non_ascii_path_encoded_or_not(
    tmp_path: Path, http: requests.Session, public_base_url: str | None
) -> None:
    """The wire carries %C3%A9; Werkzeug hands the app "é". Either spelling names the URL."""
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A))
    settings = auth_settings(tmp_path, issuer, auth={"public_base_url": public_base_url})
    app = create_app(settings, clock=lambda: FIXTURE_NOW)
    with LiveServer(app) as live:
        base = public_base_url or live.url
        for aud_path in ("/cds-services/%C3%A9t%C3%A9", "/cds-services/été"):
            response = http.post(
                live.url + "/cds-services/été",
                json=load_fixture(SCENARIO),
                headers=auth_header(client_jwt(base + aud_path)),
            )
            assert response.request.path_url == "/cds-services/%C3%A9t%C3%A9"
            # Past the gate: the answer is about the service, not the token.
            assert response.status_code == 404, (aud_path, response.text)
            assert response.json()["error"] == "unknown_service"


# -- 2. CORS ---------------------------------------------------------------------------------


@pytest.fixture
def cors_client(tmp_path: Path) -> Any:
    settings = test_settings(tmp_path, http={"cors_origins": (ORIGIN, "https://ehr.example.org")})
    return create_app(settings, clock=lambda: FIXTURE_NOW).test_client()


def test_default_cors_allows_every_origin(client: Any) -> None:
    response = client.get(DISCOVERY, headers={"Origin": "https://anywhere.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_configured_origins_are_echoed_one_by_one(cors_client: Any, method: str) -> None:
    for origin in (ORIGIN, "https://ehr.example.org"):
        response = cors_client.open(DISCOVERY, method=method, headers={"Origin": origin})
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in response.vary


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
@pytest.mark.parametrize(
    "origin", ["https://evil.example", ORIGIN + ".evil.example", "null", ORIGIN + "/", None]
)
def test_other_origins_get_no_cors_headers(
    cors_client: Any, method: str, origin: str | None
) -> None:
    headers = {"Origin": origin} if origin else {}
    response = cors_client.open(DISCOVERY, method=method, headers=headers)
    assert not [name for name in response.headers.keys() if name.startswith("Access-Control-")]
    # Still marked as varying by Origin, or a cache could serve this answer to an allowed page.
    assert "Origin" in response.vary


# -- every response: CORS and security headers, errors included ---------------------------


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("boom")


# name -> (method, path, request kwargs, needs a token, expected status, expected error code)
RESPONSES: dict[str, tuple[str, str, dict[str, Any], bool, int, str | None]] = {
    "discovery": ("GET", DISCOVERY, {}, True, 200, None),
    "hook": ("POST", HOOK, {"json": load_fixture(SCENARIO)}, True, 200, None),
    "healthz": ("GET", "/healthz", {}, False, 200, None),
    "openapi": ("GET", "/openapi.yaml", {}, False, 200, None),
    "preflight": ("OPTIONS", HOOK, {}, False, 204, None),
    "no-token": ("POST", HOOK, {"json": {}}, False, 401, "unauthorized"),
    "unknown-route": ("GET", "/no/such/route", {}, False, 404, "not_found"),
    "unknown-service": ("POST", "/cds-services/nope", {"json": {}}, True, 404, "unknown_service"),
    "wrong-method": ("DELETE", HOOK, {}, True, 405, "method_not_allowed"),
    "bad-json": (
        "POST",
        HOOK,
        {"data": "{oops", "content_type": "application/json"},
        True,
        400,
        "invalid_json",
    ),
    "too-large": (
        "POST",
        HOOK,
        {"data": b" " * 20_001, "content_type": "application/json"},
        True,
        413,
        "payload_too_large",
    ),
    "not-json": (
        "POST",
        HOOK,
        {"data": "hook=x", "content_type": "text/plain"},
        True,
        415,
        "unsupported_media_type",
    ),
    "crash": ("POST", HOOK, {"json": load_fixture(SCENARIO)}, True, 500, "internal_error"),
}


@pytest.mark.parametrize("name", RESPONSES)
def test_every_response_carries_cors_and_security_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    method, path, kwargs, needs_token, status, code = RESPONSES[name]
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A))
    settings = auth_settings(
        tmp_path, issuer, http={"cors_origins": (ORIGIN,), "max_body_bytes": 20_000}
    )
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    if name == "crash":
        monkeypatch.setattr("service.api.routes.run_hook", _boom)
    headers = {"Origin": ORIGIN, "X-Request-Id": f"req-{name}"}
    if needs_token:
        headers.update(auth_header(client_jwt(BASE + path)))
    response = client.open(path, method=method, headers=headers, **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    if code:
        assert_error(response, status, code)
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in response.vary
    assert "authorization" in header_list(response.headers["Access-Control-Allow-Headers"])
    for header, value in SECURITY_HEADERS.items():
        assert response.headers[header] == value, header
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Request-Id"] == f"req-{name}"


@pytest.mark.parametrize("incoming", ["x" * 65, "tab\there", ""])
def test_unusable_request_ids_are_replaced(client: Any, incoming: str) -> None:
    response = client.get("/healthz", headers={"X-Request-Id": incoming})
    assert response.headers["X-Request-Id"] != incoming
    assert len(response.headers["X-Request-Id"]) == 32  # a fresh uuid4 hex


# -- 3. hardening ----------------------------------------------------------------------------


@pytest.fixture
def small_body_app(tmp_path: Path) -> Any:
    return create_app(
        test_settings(tmp_path, http={"max_body_bytes": 20_000}), clock=lambda: FIXTURE_NOW
    )


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    # A generator body: requests sends it with Transfer-Encoding: chunked, no Content-Length.
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_a_chunked_body_over_the_limit_is_413_not_truncated(
    small_body_app: Any, http: requests.Session
) -> None:
    fixture = json.dumps(load_fixture(SCENARIO)).encode()
    assert len(fixture) < 20_000
    exactly_at_limit = fixture + b" " * (20_000 - len(fixture))
    # Whitespace after the JSON: truncated at the limit, this would still parse. It must not.
    over_limit = fixture + b" " * (60_000 - len(fixture))
    json_type = {"Content-Type": "application/json"}
    with LiveServer(small_body_app) as live:
        url = live.url + HOOK
        fits = http.post(url, data=_chunks(exactly_at_limit), headers=json_type)
        assert fits.request.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in fits.request.headers
        assert fits.status_code == 200, fits.text
        too_large = http.post(url, data=_chunks(over_limit), headers=json_type)
        assert too_large.request.headers.get("Transfer-Encoding") == "chunked"
        assert too_large.status_code == 413, too_large.text
        assert too_large.json()["error"] == "payload_too_large"
        assert_conforms(too_large.json(), "Error")
        assert too_large.headers["X-Content-Type-Options"] == "nosniff"
        assert too_large.headers["Access-Control-Allow-Origin"] == "*"


def test_a_body_over_the_limit_with_content_length_is_413(small_body_app: Any) -> None:
    response = small_body_app.test_client().post(
        FEEDBACK, data=b"[" + b" " * 20_000 + b"]", content_type="application/json"
    )
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", None],
)
@pytest.mark.parametrize("path", [HOOK, FEEDBACK])
def test_non_json_bodies_are_415(client: Any, path: str, content_type: str | None) -> None:
    kwargs: dict[str, Any] = {"data": json.dumps(load_fixture(SCENARIO))}
    if content_type:
        kwargs["content_type"] = content_type
    assert_error(client.post(path, **kwargs), 415, "unsupported_media_type")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP"])
@pytest.mark.parametrize("path", [HOOK, FEEDBACK])
def test_a_compressed_body_is_415_and_says_why(client: Any, path: str, encoding: str) -> None:
    # Read as JSON, compressed bytes were "invalid JSON ... surrogates not allowed".
    body = gzip.compress(json.dumps(load_fixture(SCENARIO)).encode())
    response = client.post(
        path, data=body, content_type="application/json", headers={"Content-Encoding": encoding}
    )
    error = assert_error(response, 415, "unsupported_media_type")
    assert f"Content-Encoding {encoding.lower()} is not accepted" in error["message"]


def test_an_identity_encoded_body_is_read(client: Any) -> None:
    response = client.post(
        HOOK,
        data=json.dumps(load_fixture(SCENARIO)),
        content_type="application/json",
        headers={"Content-Encoding": "identity"},
    )
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize(
    "body",
    [
        b'{"hook": "order-sign", "hookInstance": "\xff"}',  # a byte no UTF-8 text holds
        json.dumps({"hook": "order-sign"}).encode("utf-16"),
        json.dumps({"hook": "order-sign"}).encode("latin-1") + "é".encode("latin-1"),
    ],
)
@pytest.mark.parametrize("path", [HOOK, FEEDBACK])
def test_a_body_that_is_not_utf8_is_400_saying_so(client: Any, path: str, body: bytes) -> None:
    error = assert_error(
        client.post(path, data=body, content_type="application/json"), 400, "invalid_json"
    )
    assert error["message"] == "the body is not UTF-8 text"


def test_an_unexpected_exception_is_a_bare_500(
    client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"patient-{uuid.uuid4().hex}"

    def crash(*args: Any, **kwargs: Any) -> Any:
        try:
            raise KeyError(secret)
        except KeyError as exc:
            raise RuntimeError(f"could not evaluate {secret}") from exc

    monkeypatch.setattr("service.api.routes.run_hook", crash)
    with caplog.at_level(logging.ERROR, logger="flare_cds.errors"):
        response = post_json(client, HOOK, load_fixture(SCENARIO))
    body = assert_error(response, 500, "internal_error")
    assert set(body) == {"error", "message"}
    text = response.get_data(as_text=True)
    for leak in (secret, "Traceback", "RuntimeError", "KeyError", "crash", ".py"):
        assert leak not in text
    # The log says where it failed and what kind of error, under the request's id, but not
    # the exception's text, which here (as often) quotes request data.
    logged = [JsonFormatter().format(r) for r in caplog.records if r.name == "flare_cds.errors"]
    assert len(logged) == 1
    entry = json.loads(logged[0])
    assert entry["message"] == "unhandled RuntimeError"
    assert entry["request_id"] == response.headers["X-Request-Id"]
    assert "KeyError" in entry["stack"] and "in crash" in entry["stack"]
    assert secret not in logged[0]


def post_json(client: Any, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


def _with_deep_value(body: dict[str, Any], place: str, depth: int) -> str:
    """`body` as JSON text with `depth` nested arrays at `place` (a dotted path)."""
    target = body
    *parents, leaf = place.split(".")
    for step in parents:
        target = target[int(step)] if isinstance(target, list) else target.setdefault(step, {})
    target[leaf] = "__deep__"
    return json.dumps(body).replace('"__deep__"', "[" * depth + "]" * depth)


DEEP_PLACES = {
    "hook: context.userId": (HOOK, lambda: load_fixture(SCENARIO), "context.userId"),
    "hook: fhirAuthorization.access_token": (
        HOOK,
        lambda: {**load_fixture(SCENARIO), "fhirServer": "https://ehr.example.org/fhir"},
        "fhirAuthorization.access_token",
    ),
    "hook: a prefetched resource": (
        HOOK,
        lambda: load_fixture(SCENARIO),
        "prefetch.patient.extension",
    ),
    "feedback: overrideReason.reason": (
        FEEDBACK,
        lambda: feedback_body(str(uuid.uuid4())),
        "feedback.0.overrideReason.reason",
    ),
}


# Just past our limit; the band where Python's parser still accepts the nesting but the first
# recursive walk over it (schema validation, repr) runs out of stack, which was a 500; and far
# beyond what the parser accepts.
DEPTHS = [MAX_JSON_DEPTH + 1, *range(900, 1001), 100_000]


@pytest.mark.parametrize("place", DEEP_PLACES)
def test_deeply_nested_json_is_400_not_500(client: Any, place: str) -> None:
    path, body, where = DEEP_PLACES[place]
    for depth in DEPTHS:
        data = _with_deep_value(body(), where, depth)
        response = client.post(path, data=data, content_type="application/json")
        assert response.status_code == 400, (depth, response.get_data(as_text=True))
        assert_error(response, 400, "invalid_json")


def test_a_deeply_nested_body_is_400_not_500(client: Any) -> None:
    for depth in DEPTHS:
        deep = "[" * depth + "]" * depth
        response = client.post(HOOK, data=deep, content_type="application/json")
        assert_error(response, 400, "invalid_json")


def test_nesting_up_to_the_limit_is_accepted(client: Any) -> None:
    # Root object + extension object + arrays: exactly MAX_JSON_DEPTH levels in all.
    at_limit = _with_deep_value(load_fixture(SCENARIO), "extension.org-example", MAX_JSON_DEPTH - 2)
    response = client.post(HOOK, data=at_limit, content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)
    over = _with_deep_value(load_fixture(SCENARIO), "extension.org-example", MAX_JSON_DEPTH - 1)
    assert_error(client.post(HOOK, data=over, content_type="application/json"), 400, "invalid_json")


def test_brackets_inside_strings_do_not_count_as_nesting(client: Any) -> None:
    body = load_fixture(SCENARIO)
    body["extension"] = {"org.example": '"[{' * (MAX_JSON_DEPTH * 3) + '\\"'}
    response = post_json(client, HOOK, body)
    assert response.status_code == 200, response.get_data(as_text=True)


# -- 4. what the real server writes to its log -----------------------------------------------


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


@pytest.mark.server
def test_real_server_logs_requests_but_no_tokens_ids_or_comments(
    tmp_path: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    patient_id = f"pt-{uuid.uuid4().hex[:16]}"
    access_token = f"at-{uuid.uuid4().hex}"
    comment = f"comment-{uuid.uuid4().hex}"
    jwks_file = write_jwks(tmp_path, EC_A)
    scenario = json.dumps(as_of_today(load_fixture(SCENARIO)))
    body = json.loads(scenario.replace(load_fixture(SCENARIO)["context"]["patientId"], patient_id))
    assert body["context"]["patientId"] == patient_id

    with FhirTestServer() as fhir:
        fhir.add_resources(body["prefetch"].values())
        fhir.required_token = access_token  # any other token gets 401

        def config(port: int) -> str:
            return f"""
[auth]
required = true
public_base_url = "http://127.0.0.1:{port}"
[[auth.issuers]]
iss = {_toml(ISS)}
jwks_file = {_toml(jwks_file)}
[storage]
database = {_toml(str(tmp_path / "db.sqlite3"))}
[fhir]
allowed_servers = [{_toml(fhir.base_url)}]
connect_timeout_seconds = 2
read_timeout_seconds = 4
deadline_seconds = 5
[http]
max_body_bytes = 100000
"""

        server = serve_process(config)
        sent_tokens: list[str] = []
        answers: list[requests.Response] = []
        session = requests.Session()
        session.trust_env = False

        def send(method: str, path: str, token: str | None, **kwargs: Any) -> requests.Response:
            headers = kwargs.pop("headers", {})
            if token:
                sent_tokens.append(token)
                headers.update(auth_header(token))
            answer = session.request(
                method, server.url + path, headers=headers, timeout=15, **kwargs
            )
            answers.append(answer)
            return answer

        def fresh(path: str) -> str:
            return client_jwt(server.url + path)

        authorization = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "flare-cds",
            "patient": patient_id,
        }
        with_auth = {**body, "fhirServer": fhir.base_url, "fhirAuthorization": authorization}
        # Everything prefetched: the access token travels but is not used.
        prefetched = send("POST", HOOK, fresh(HOOK), json=with_auth)
        assert prefetched.status_code == 200, prefetched.text
        cards = prefetched.json()["cards"]
        assert cards
        # Nothing prefetched: the service fetches with the access token as its bearer token.
        fetched = send("POST", HOOK, fresh(HOOK), json={**with_auth, "prefetch": {}})
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["cards"]
        assert {r.authorization for r in fhir.requests} == {f"Bearer {access_token}"}
        # A token signed by a key the issuer does not have, and a token that is not a JWT.
        forged = client_jwt(server.url + DISCOVERY, key=Key(EC_A.kid, "ES384", EC_B.private))
        assert send("GET", DISCOVERY, forged).status_code == 401
        assert send("GET", DISCOVERY, "not-a-jwt").status_code == 401
        valid = send("GET", DISCOVERY, fresh(DISCOVERY))
        assert valid.status_code == 200
        feedback = send(
            "POST", FEEDBACK, fresh(FEEDBACK), json=feedback_body(cards[0]["uuid"], comment)
        )
        assert feedback.status_code == 200, feedback.text
        assert feedback.json()["received"] == 1
        # gunicorn terminates chunked bodies itself: the limit must hold there too.
        oversized = json.dumps(with_auth).encode() + b" " * 100_000
        too_large = send(
            "POST",
            HOOK,
            fresh(HOOK),
            data=_chunks(oversized),
            headers={"Content-Type": "application/json"},
        )
        assert too_large.status_code == 413, too_large.text
        session.close()
        server.stop()

    log = server.log()
    secrets = {"patient id": patient_id, "access token": access_token, "user comment": comment}
    for number, token in enumerate(sent_tokens):
        secrets[f"token {number}"] = token
        # Claims and signature; the header segment is the same in every token and says nothing.
        for part, segment in zip(("claims", "signature"), token.split(".")[1:], strict=False):
            secrets[f"{part} of token {number}"] = segment
    leaked = [name for name, value in secrets.items() if value and value in log]
    assert not leaked, f"found in the server log: {leaked}"

    records = []
    for line in log.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # gunicorn's own lines are plain text
    request_lines = {r["request_id"]: r for r in records if r.get("message") == "request"}
    for answer in answers:
        line = request_lines.get(answer.headers["X-Request-Id"])
        assert line, f"no request line for {answer.request.method} {answer.request.path_url}"
        assert line["status"] == answer.status_code
        assert line["path"] == answer.request.path_url
    auth_failures = [r for r in request_lines.values() if r["status"] == 401]
    assert sorted(r["auth"] for r in auth_failures) == ["malformed token", "signature invalid"]
