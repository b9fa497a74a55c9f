"""Client JWT verification (CDS Hooks 2.0 "Trusting CDS Clients") and the jti replay caches.

Keys are generated here; JWK Sets come from a file or from a real HTTP server on loopback whose hits
are counted; time comes from an injected clock, so nothing sleeps and nothing leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.auth.tokens import (
    NO_CREDENTIALS,
    REQUIRED_CLAIMS,
    AuthError,
    TokenVerifier,
    audience_for,
    www_authenticate,
)
from service.settings import AuthSettings, IssuerSettings
from service.storage.replay_cache import InMemoryReplayCache, SqliteReplayCache

ISS = "https://ehr.example.org/"
AUD = "https://cds.example.org/cds-services/igm-flare"
T0 = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg[0] in "RP" else jwt.algorithms.ECAlgorithm
        data = algo.to_jwk(self.private.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}


def ec_key(kid: str) -> Key:
    return Key(kid, "ES384", ec.generate_private_key(ec.SECP384R1()))


RSA_A = Key("rsa-a", "RS384", rsa.generate_private_key(public_exponent=65537, key_size=2048))
EC_A = ec_key("ec-a")
EC_B = ec_key("ec-b")


def claims(clock: Clock, **overrides: Any) -> dict[str, Any]:
    """A valid payload; an override of None drops the claim."""
    now = int(clock.now)
    base = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    base["tenant"] = "t1"
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def sign(key: Key, payload: dict[str, Any], **header: Any) -> str:
    return jwt.encode(
        payload, key.private, key.alg, headers={"kid": key.kid, "typ": "JWT", **header}
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


def bearer(token: str) -> str:
    return f"Bearer {token}"


@dataclass
class JwksServer:
    """A JWK Set host on 127.0.0.1 that counts its hits; `document` can change mid-test."""

    document: Any = field(default_factory=lambda: {"keys": []})
    status: int = 200
    hits: int = 0
    url: str = ""

    def serve(self, *keys: Key) -> None:
        self.document = {"keys": [k.jwk() for k in keys]}


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            doc = state.document
            body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class NoNetwork(requests.Session):
    def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the verifier must not touch the network here")


def make_verifier(
    clock: Clock, http: requests.Session, *issuers: IssuerSettings, required: bool = True
) -> TokenVerifier:
    settings = AuthSettings(
        required=required, leeway_seconds=30, jwks_cache_seconds=3600, issuers=issuers
    )
    return TokenVerifier(settings, InMemoryReplayCache(clock=clock), http=http, clock=clock)


def write_jwks(tmp_path: Path, *keys: Key, name: str = "jwks.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"keys": [k.jwk() for k in keys]}))
    return str(path)


def rejects(verifier: TokenVerifier, header: str | None, reason: str) -> None:
    with pytest.raises(AuthError) as caught:
        verifier.verify(header, AUD)
    assert caught.value.reason == reason


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def file_verifier(tmp_path: Path, clock: Clock, http: requests.Session) -> TokenVerifier:
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A, RSA_A), tenants=("t1",))
    return make_verifier(clock, http, issuer)


@pytest.mark.parametrize("key", [RSA_A, EC_A], ids=["RS384", "ES384"])
def test_valid_token_passes(key: Key, jwks_server: JwksServer, clock: Clock, http: Any) -> None:
    jwks_server.serve(key)
    verifier = make_verifier(clock, http, IssuerSettings(ISS, jwks_url=jwks_server.url))
    payload = claims(clock, tenant=None)
    assert verifier.verify(bearer(sign(key, payload)), AUD) == payload
    # The URL called may differ from aud by one trailing slash (clients and proxies disagree).
    assert verifier.verify(bearer(sign(key, claims(clock))), AUD + "/")


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": ["https://other.example", AUD]},
        {"aud": AUD + "/"},  # one trailing slash of difference is forgiven
        {"iat": int(T0) + 29},  # clock skew within the leeway
        {"exp": int(T0) - 29},
        {"exp": int(T0) + 330},  # the 300 s lifetime cap, plus the leeway
        {"iat": int(T0) - 330, "exp": int(T0)},
        {"sub": "someone"},  # allowed, never required
    ],
)
def test_accepted_variants(
    overrides: dict[str, Any], file_verifier: TokenVerifier, clock: Clock
) -> None:
    payload = claims(clock, **overrides)
    assert file_verifier.verify(bearer(sign(EC_A, payload)), AUD) == payload


def test_required_false_returns_none_without_checking(clock: Clock, http: Any) -> None:
    verifier = make_verifier(clock, http, required=False)
    assert verifier.verify(None, AUD) is None
    assert verifier.verify("Bearer not-a-jwt", AUD) is None


def test_sandbox_shaped_token_accepted_offline(tmp_path: Path, clock: Clock) -> None:
    sandbox = "https://sandbox.cds-hooks.org"
    jku = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
    issuer = IssuerSettings(iss=sandbox, jku=(jku,), jwks_file=write_jwks(tmp_path, EC_A))
    verifier = make_verifier(clock, NoNetwork(), issuer)
    iat = int(clock.now)
    payload = {"iss": sandbox, "aud": AUD, "exp": iat + 300, "iat": iat, "jti": str(uuid.uuid4())}
    token = sign(EC_A, payload, jku=jku)
    header = {"alg": "ES384", "typ": "JWT", "kid": EC_A.kid, "jku": jku}
    assert jwt.get_unverified_header(token) == header
    assert verifier.verify(bearer(token), AUD) == payload


def test_token_without_kid_needs_an_unambiguous_set(
    tmp_path: Path, clock: Clock, http: Any
) -> None:
    one = make_verifier(clock, http, IssuerSettings(ISS, jwks_file=write_jwks(tmp_path, EC_A)))
    token = jwt.encode(claims(clock), EC_A.private, algorithm="ES384")
    assert "kid" not in jwt.get_unverified_header(token)
    assert one.verify(bearer(token), AUD)
    two_keys = write_jwks(tmp_path, EC_A, EC_B, name="two.json")
    two = make_verifier(clock, http, IssuerSettings(ISS, jwks_file=two_keys))
    rejects(two, bearer(jwt.encode(claims(clock), EC_A.private, "ES384")), "kid required")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, NO_CREDENTIALS),
        ("  ", NO_CREDENTIALS),
        ("Basic dXNlcjpwdw==", "malformed authorization header"),
        ("Bearer", "malformed authorization header"),
        ("Bearer a.b.c extra", "malformed authorization header"),
        ("Bearer a.b", "malformed token"),
        ("Bearer a+b.c.d", "malformed token"),
        ("Bearer eyJhbGciOiJFUzM4NCJ9.bm90LWpzb24.c2ln", "malformed token"),
    ],
)
def test_missing_or_malformed_header(
    header: str | None, reason: str, file_verifier: TokenVerifier
) -> None:
    rejects(file_verifier, header, reason)


def _hs256_with_public_pem(clock: Clock) -> str:
    pem = RSA_A.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": RSA_A.kid}, claims(clock))
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def _tampered(clock: Clock) -> str:
    head, _, sig = sign(EC_A, claims(clock)).split(".")
    return f"{head}.{b64(json.dumps(claims(clock, jti='forged')).encode())}.{sig}"


NOW = int(T0)


def signed(**overrides: Any) -> Callable[[Clock], str]:
    return lambda c: sign(EC_A, claims(c, **overrides))


def alg_none(c: Clock) -> str:
    return unsigned({"alg": "none", "typ": "JWT", "kid": EC_A.kid}, claims(c)) + "."


REJECTED: list[tuple[str, Callable[[Clock], str], str]] = [
    ("other key", lambda c: sign(ec_key(EC_A.kid), claims(c)), "signature invalid"),
    ("tampered payload", _tampered, "signature invalid"),
    ("alg none", alg_none, "algorithm not allowed"),
    ("HS256 with public PEM", _hs256_with_public_pem, "algorithm not allowed"),
    (
        "RSA alg, EC kid",
        lambda c: sign(RSA_A, claims(c), kid=EC_A.kid),
        "algorithm does not match key",
    ),
    ("typ not JWT", lambda c: sign(EC_A, claims(c), typ="at+jwt"), "token type not allowed"),
    ("unknown kid", lambda c: sign(ec_key("nope"), claims(c)), "unknown signing key"),
    ("expired", signed(exp=NOW - 30, iat=NOW - 330), "token expired"),
    ("future iat", signed(iat=NOW + 31, exp=NOW + 331), "token issued in the future"),
    ("not before", signed(nbf=NOW + 60), "token not yet valid"),
    ("exp 10 years ahead", signed(exp=NOW + 10 * 365 * 86400), "token lifetime too long"),
    ("lifetime just past the cap", signed(exp=NOW + 331), "token lifetime too long"),
    ("iat 20 years ago", signed(iat=NOW - 20 * 365 * 86400), "token issued too long ago"),
    ("iat just past the cap", signed(iat=NOW - 331, exp=NOW), "token issued too long ago"),
    ("exp not a number", signed(exp="soon"), "malformed time claim"),
    ("exp NaN", signed(exp=float("nan")), "malformed time claim"),
    ("wrong aud", signed(aud="https://cds.example.org/cds-services"), "audience mismatch"),
    ("aud two slashes", signed(aud=AUD + "//"), "audience mismatch"),
    ("unknown iss", signed(iss="https://evil.test"), "issuer not allowed"),
    ("wrong tenant", signed(tenant="t2"), "tenant not allowed"),
    ("missing tenant", signed(tenant=None), "tenant not allowed"),
    *[(f"missing {n}", signed(**{n: None}), f"missing claim {n}") for n in REQUIRED_CLAIMS],
]


@pytest.mark.parametrize(
    ("build", "reason"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_rejected(
    build: Callable[[Clock], str], reason: str, file_verifier: TokenVerifier, clock: Clock
) -> None:
    rejects(file_verifier, bearer(build(clock)), reason)


def test_replayed_jti_rejected(file_verifier: TokenVerifier, clock: Clock) -> None:
    token = sign(EC_A, claims(clock))
    assert file_verifier.verify(bearer(token), AUD)
    rejects(file_verifier, bearer(token), "token replayed")
    # A freshly signed token reusing the jti is a replay too: the nonce is what is remembered.
    clock.now += 10
    payload = jwt.decode(token, options={"verify_signature": False})
    again = sign(EC_A, {**payload, "iat": int(clock.now), "exp": int(clock.now) + 300})
    rejects(file_verifier, bearer(again), "token replayed")


def test_jku_not_allow_listed_rejected_without_fetching(
    jwks_server: JwksServer, tmp_path: Path, clock: Clock, http: Any
) -> None:
    jwks_server.serve(EC_A)
    issuer = IssuerSettings(
        ISS, jku=("https://ehr.example.org/jwks.json",), jwks_file=write_jwks(tmp_path, EC_A)
    )
    verifier = make_verifier(clock, http, issuer)
    rejects(verifier, bearer(sign(EC_A, claims(clock), jku=jwks_server.url)), "jku not allowed")
    assert jwks_server.hits == 0


def test_allow_listed_jku_is_fetched_and_cached(
    jwks_server: JwksServer, clock: Clock, http: Any
) -> None:
    jwks_server.serve(EC_A)
    verifier = make_verifier(clock, http, IssuerSettings(ISS, jku=(jwks_server.url,)))
    for _ in range(3):
        verifier.verify(bearer(sign(EC_A, claims(clock), jku=jwks_server.url)), AUD)
    # A token without jku uses the issuer's single allow-listed jku.
    verifier.verify(bearer(sign(EC_A, claims(clock))), AUD)
    assert jwks_server.hits == 1
    clock.now += 3601  # the cached set has expired
    # Still valid for the token, so it is used while the set is fetched again in the background.
    verifier.verify(bearer(sign(EC_A, claims(clock), jku=jwks_server.url)), AUD)
    deadline = time.monotonic() + 5
    while jwks_server.hits < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert jwks_server.hits == 2


def test_key_rotation_refetches_once_and_unknown_kid_is_rate_limited(
    jwks_server: JwksServer, clock: Clock, http: Any
) -> None:
    jwks_server.serve(EC_A)
    verifier = make_verifier(clock, http, IssuerSettings(ISS, jku=(jwks_server.url,)))
    verifier.verify(bearer(sign(EC_A, claims(clock), jku=jwks_server.url)), AUD)
    assert jwks_server.hits == 1

    jwks_server.serve(EC_A, EC_B)  # the client rotates to key B
    clock.now += 60
    verifier.verify(bearer(sign(EC_B, claims(clock), jku=jwks_server.url)), AUD)
    assert jwks_server.hits == 2  # exactly one refetch for the unknown kid

    stranger = ec_key("stranger")
    clock.now += 1
    for _ in range(3):
        token = sign(stranger, claims(clock), jku=jwks_server.url)
        rejects(verifier, bearer(token), "unknown signing key")
    assert jwks_server.hits == 2  # refetched 1 s ago: rate-limited
    clock.now += 30
    for _ in range(3):
        token = sign(stranger, claims(clock), jku=jwks_server.url)
        rejects(verifier, bearer(token), "unknown signing key")
    assert jwks_server.hits == 3  # one refetch, kid still unknown, then rate-limited again


def test_configured_set_tried_before_jku(
    jwks_server: JwksServer, tmp_path: Path, clock: Clock, http: Any
) -> None:
    jwks_server.serve(EC_A, EC_B)
    issuer = IssuerSettings(ISS, jku=(jwks_server.url,), jwks_file=write_jwks(tmp_path, EC_A))
    verifier = make_verifier(clock, http, issuer)
    verifier.verify(bearer(sign(EC_A, claims(clock), jku=jwks_server.url)), AUD)
    assert jwks_server.hits == 0  # found in the configured file
    verifier.verify(bearer(sign(EC_B, claims(clock), jku=jwks_server.url)), AUD)
    assert jwks_server.hits == 1  # kid only in the jku set: fetched once


@pytest.mark.parametrize(
    ("status", "document"),
    [
        (500, {"keys": []}),
        (302, {"keys": []}),
        (200, b"<html>not json</html>"),
        (200, {"no": "keys"}),
        (200, {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "ec-a"}]}),
    ],
)
def test_unusable_key_host_gives_keys_unavailable(
    status: int, document: Any, jwks_server: JwksServer, clock: Clock, http: Any
) -> None:
    jwks_server.status, jwks_server.document = status, document
    verifier = make_verifier(clock, http, IssuerSettings(ISS, jwks_url=jwks_server.url))
    rejects(verifier, bearer(sign(EC_A, claims(clock))), "signing keys unavailable")
    rejects(verifier, bearer(sign(EC_A, claims(clock))), "signing keys unavailable")
    assert jwks_server.hits == 1  # failures back off instead of hammering the host


def test_unreachable_key_host(clock: Clock, http: Any) -> None:
    verifier = make_verifier(clock, http, IssuerSettings(ISS, jwks_url="http://127.0.0.1:9/jwks"))
    rejects(verifier, bearer(sign(EC_A, claims(clock))), "signing keys unavailable")


def test_token_never_logged(
    file_verifier: TokenVerifier, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    token = sign(EC_A, claims(clock, aud="https://elsewhere.example"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AuthError) as caught:
        file_verifier.verify(bearer(token), AUD)
    assert "audience mismatch" in caplog.text
    for part in token.split("."):
        assert part not in caplog.text
        assert part not in caught.value.reason


def test_www_authenticate_and_audience_for() -> None:
    assert www_authenticate(NO_CREDENTIALS) == 'Bearer realm="flare-cds"'
    assert www_authenticate("token expired") == (
        'Bearer realm="flare-cds", error="invalid_token", error_description="token expired"'
    )
    url = "http://10.0.0.5:8080/cds-services/x"
    assert audience_for(url + "?a=1", "/cds-services/x", None) == url
    public = audience_for(url, "/cds-services/x", "https://cds.example.org/")
    assert public == "https://cds.example.org/cds-services/x"


def test_in_memory_replay_cache_expires_entries(clock: Clock) -> None:
    cache = InMemoryReplayCache(clock=clock)
    assert cache.remember("iss|1", T0 + 10)
    assert not cache.remember("iss|1", T0 + 10)
    clock.now += 10
    assert cache.remember("iss|1", T0 + 100)
    clock.now += 200  # past the purge interval: old entries are swept
    assert cache.remember("iss|2", clock.now + 10)
    assert len(cache) == 1


def test_sqlite_replay_cache_shared_between_workers(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "nested" / "dir" / "replay.sqlite3"
    worker_1 = SqliteReplayCache(path, clock=clock)
    worker_2 = SqliteReplayCache(path, clock=clock)
    assert worker_1.remember("iss|jti-1", T0 + 60)
    assert not worker_2.remember("iss|jti-1", T0 + 60)
    assert not worker_1.remember("iss|jti-1", T0 + 60)
    assert worker_2.remember("other-iss|jti-1", T0 + 60)
    clock.now += 60
    assert worker_2.remember("iss|jti-1", T0 + 120)  # an expired entry may be reused
    assert not worker_1.remember("iss|jti-1", T0 + 120)
    clock.now += 61  # purge interval passed: expired rows are deleted
    assert worker_1.remember("iss|jti-2", clock.now + 60)
    assert len(worker_1) == 1


def test_sqlite_replay_cache_race_has_one_winner(tmp_path: Path) -> None:
    caches = [SqliteReplayCache(tmp_path / "replay.sqlite3") for _ in range(8)]
    results: list[bool] = []
    barrier = threading.Barrier(len(caches))

    def worker(cache: SqliteReplayCache) -> None:
        barrier.wait()
        results.append(cache.remember("iss|racy", 4_000_000_000.0))

    threads = [threading.Thread(target=worker, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
