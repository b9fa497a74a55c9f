"""Authenticates CDS Clients by the signed JWT that CDS Hooks 2.0 puts in `Authorization: Bearer`.

Checks follow the spec's "Trusting CDS Clients" order: `iss` allow-listed, `aud` is the URL called,
`exp`/`iat` sane, `tenant` allow-listed, signature against the issuer's JWK Set, `jti` not replayed.
The early checks read the claims before the signature is verified only to give a precise reason and
to pick the issuer's keys; every claim is checked again on the verified payload, and only that is
returned.

Key sources, per issuer: a configured `jwks_file` and `jwks_url` are tried first; the token's `jku`
header is used only if it is on the issuer's `jku` allow-list (otherwise the token is refused even
when a configured set would verify it), and it is fetched only if the configured sets do not hold
the token's `kid`. An issuer configured with a single `jku` and nothing else uses it for tokens
that omit the header. Sets are cached per source for `jwks_cache_seconds`; an unknown `kid` causes
one refetch, at most every MIN_REFETCH_SECONDS per source, so forged tokens cannot make us hammer
the client's key host.

Neither the token nor any part of it is logged; reasons are short and safe to show the client.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests
from werkzeug.urls import iri_to_uri

from service.replay_cache import ReplayCache
from service.settings import AuthSettings, IssuerSettings

log = logging.getLogger(__name__)

REALM = "flare-cds"
NO_CREDENTIALS = "missing bearer token"
# Asymmetric algorithms only (the spec forbids `none` and HMAC), each with the key it needs.
ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
}
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
FETCH_TIMEOUT = (2.0, 2.0)  # connect, read: a hook call must answer in about half a second
MAX_JWKS_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 16 * 1024
MIN_REFETCH_SECONDS = 30.0
FAILURE_BACKOFF_SECONDS = 5.0
MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_BEARER = re.compile(r"Bearer +(\S+) *", re.IGNORECASE)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class AuthError(Exception):
    """The request is not authenticated; `reason` is short and never contains the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def www_authenticate(reason: str) -> str:
    """RFC 6750 challenge; a request with no token gets no error code (section 3.1)."""
    if reason == NO_CREDENTIALS:
        return f'Bearer realm="{REALM}"'
    safe = reason.replace("\\", "\\\\").replace('"', '\\"')
    return f'Bearer realm="{REALM}", error="invalid_token", error_description="{safe}"'


def audience_for(request_url: str, path: str, public_base_url: str | None) -> str:
    """The `aud` a client must have used: behind a proxy the request URL is not what it called.

    In URI form (non-ASCII percent-encoded, as on the wire): `path` arrives decoded and
    Werkzeug's request URL is an IRI, so without this the same endpoint had two spellings.
    """
    if public_base_url:
        return _as_uri(public_base_url.rstrip("/") + path)
    return _as_uri(request_url.split("#", 1)[0].split("?", 1)[0])


@dataclass(frozen=True)
class _Jwk:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class _Source:
    location: str
    is_file: bool


@dataclass
class _CachedSet:
    keys: list[_Jwk]
    fetched_at: float


class _FetchError(Exception):
    pass


class TokenVerifier:
    def __init__(
        self,
        settings: AuthSettings,
        replay_cache: ReplayCache,
        *,
        http: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._replay = replay_cache
        self._http = http or requests.Session()
        self._clock = clock
        self._issuers: dict[str, IssuerSettings] = {}
        for issuer in settings.issuers:
            self._issuers.setdefault(issuer.iss, issuer)
        self._sets: dict[_Source, _CachedSet] = {}
        self._last_attempt: dict[_Source, float] = {}
        self._locks: dict[_Source, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def verify(self, authorization_header: str | None, audience_url: str) -> dict[str, Any] | None:
        """Verified claims, or None when authentication is switched off; AuthError otherwise."""
        if not self._settings.required:
            return None
        iss: object = None
        try:
            token = _bearer_token(authorization_header)
            header, unverified = _peek(token)
            iss = unverified.get("iss")
            issuer = self._check_claims(unverified, audience_url)
            claims = self._check_signature(token, header, issuer)
            self._check_claims(claims, audience_url)
            exp = float(claims["exp"]) + self._settings.leeway_seconds
            if not self._replay.remember(f"{issuer.iss}|{claims['jti']}", exp):
                raise AuthError("token replayed")
        except AuthError as exc:
            # repr and truncation: the unverified iss is attacker text and must not forge log lines.
            log.info("client token rejected: %s (iss=%.120r)", exc.reason, iss)
            raise
        return claims

    def _check_claims(self, claims: dict[str, Any], audience_url: str) -> IssuerSettings:
        for name in REQUIRED_CLAIMS:
            if claims.get(name) in (None, "", []):
                raise AuthError(f"missing claim {name}")
        issuer = self._issuers.get(claims["iss"]) if isinstance(claims["iss"], str) else None
        if issuer is None:
            raise AuthError("issuer not allowed")
        if not _audience_matches(claims["aud"], audience_url):
            raise AuthError("audience mismatch")
        now = self._clock()
        leeway = self._settings.leeway_seconds
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
        if not all(_is_number(v) for v in (exp, iat, nbf)):
            raise AuthError("malformed time claim")
        if now >= exp + leeway:
            raise AuthError("token expired")
        if iat > now + leeway:
            raise AuthError("token issued in the future")
        if nbf > now + leeway:
            raise AuthError("token not yet valid")
        if issuer.tenants and claims.get("tenant") not in issuer.tenants:
            raise AuthError("tenant not allowed")
        if not isinstance(claims["jti"], str):
            raise AuthError("malformed claim jti")
        return issuer

    def _check_signature(
        self, token: str, header: dict[str, Any], issuer: IssuerSettings
    ) -> dict[str, Any]:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise AuthError("algorithm not allowed")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise AuthError("token type not allowed")
        jwk = self._select_key(header, issuer)
        kty, crv = ALGORITHMS[alg]
        if jwk.kty != kty or (crv and jwk.crv != crv) or (jwk.alg and jwk.alg != alg):
            raise AuthError("algorithm does not match key")
        try:
            # Bind the key to the algorithm we allowed, never to one the token proposes.
            key = jwt.PyJWK(jwk.data, algorithm=alg)
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                # Times, iss and aud are checked by _check_claims with our clock and aud rules.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": list(REQUIRED_CLAIMS),
                },
            )
        except jwt.PyJWTError:
            raise AuthError("signature invalid") from None
        return claims

    def _select_key(self, header: dict[str, Any], issuer: IssuerSettings) -> _Jwk:
        kid, jku = header.get("kid"), header.get("jku")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token")
        sources = [_Source(issuer.jwks_file, True)] if issuer.jwks_file else []
        sources += [_Source(issuer.jwks_url, False)] if issuer.jwks_url else []
        if jku is not None:
            if not isinstance(jku, str) or jku not in issuer.jku:
                raise AuthError("jku not allowed")
            sources.append(_Source(jku, False))
        elif not sources and len(issuer.jku) == 1:
            sources.append(_Source(issuer.jku[0], False))
        if not sources:
            raise AuthError("jku required")
        loaded = False
        if kid is None:
            # The spec requires kid; without it only an unambiguous set can say which key signed.
            for source in sources:
                try:
                    keys = self._keys(source, refresh=False)
                except AuthError:
                    continue
                if len(keys) == 1:
                    return keys[0]
                raise AuthError("kid required")
            raise AuthError("signing keys unavailable")
        for refresh in (False, True):
            for source in sources:
                try:
                    keys = self._keys(source, refresh=refresh)
                except AuthError:
                    continue
                loaded = True
                for jwk in keys:
                    if jwk.kid == kid:
                        return jwk
        raise AuthError("unknown signing key" if loaded else "signing keys unavailable")

    def _keys(self, source: _Source, *, refresh: bool) -> list[_Jwk]:
        """Cached keys of one source; `refresh` asks for a rate-limited refetch (unknown kid)."""
        with self._lock_for(source):
            now = self._clock()
            cached = self._sets.get(source)
            fresh = cached and now - cached.fetched_at < self._settings.jwks_cache_seconds
            if cached and fresh and not refresh:
                return cached.keys
            last = self._last_attempt.get(source)
            wait = MIN_REFETCH_SECONDS if cached else FAILURE_BACKOFF_SECONDS
            if last is not None and now - last < wait:
                if cached:
                    return cached.keys
                raise AuthError("signing keys unavailable")
            self._last_attempt[source] = now
            try:
                keys = _parse_jwks(self._load(source))
            except _FetchError as exc:
                log.warning("cannot load signing keys from %s: %s", source.location, exc)
                if cached:
                    # A stale set beats refusing every client while its key host is down.
                    return cached.keys
                raise AuthError("signing keys unavailable") from None
            self._sets[source] = _CachedSet(keys, now)
            log.info("loaded %d signing key(s) from %s", len(keys), source.location)
            return keys

    def _lock_for(self, source: _Source) -> threading.Lock:
        # One lock per source: concurrent requests wait for a single fetch instead of each fetching.
        with self._locks_guard:
            return self._locks.setdefault(source, threading.Lock())

    def _load(self, source: _Source) -> bytes:
        if source.is_file:
            try:
                return Path(source.location).read_bytes()[: MAX_JWKS_BYTES + 1]
            except OSError as exc:
                raise _FetchError(f"cannot read file: {exc.strerror}") from None
        try:
            # No redirects: the allow-list names the exact URL we trust.
            with self._http.get(
                source.location,
                timeout=FETCH_TIMEOUT,
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP {response.status_code}")
                body = b""
                for chunk in response.iter_content(16 * 1024):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        break
                return body
        except requests.RequestException as exc:
            raise _FetchError(type(exc).__name__) from None


def _bearer_token(authorization_header: str | None) -> str:
    if authorization_header is None or not authorization_header.strip():
        raise AuthError(NO_CREDENTIALS)
    match = _BEARER.fullmatch(authorization_header.strip())
    if not match:
        raise AuthError("malformed authorization header")
    token = match.group(1)
    if len(token) > MAX_TOKEN_CHARS or not _COMPACT_JWS.fullmatch(token):
        raise AuthError("malformed token")
    return token


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims without verification: used to choose issuer and key, never trusted."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError):
        raise AuthError("malformed token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AuthError("malformed token")
    return header, claims


def _audience_matches(aud: object, audience_url: str) -> bool:
    values = aud if isinstance(aud, list) else [aud]
    return any(isinstance(v, str) and _same_url(v, audience_url) for v in values)


def _same_url(a: str, b: str) -> bool:
    # Exact, except that one trailing slash on either side is forgiven (clients differ on it)
    # and a client may write non-ASCII characters as they are or percent-encoded.
    a = _as_uri(a)
    return a == b or a == b + "/" or a + "/" == b


def _as_uri(url: str) -> str:
    try:
        return iri_to_uri(url)
    except ValueError:  # not a URL it can parse (a bad port...): compared as written
        return url


def _is_number(value: object) -> bool:
    # Python's json accepts NaN and Infinity; either would make a token that never expires.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_jwks(body: bytes) -> list[_Jwk]:
    if len(body) > MAX_JWKS_BYTES:
        raise _FetchError("key set too large")
    try:
        document = json.loads(body)
    except ValueError:
        raise _FetchError("not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("no 'keys' array")
    keys = [jwk for jwk in map(_usable_key, document["keys"]) if jwk is not None]
    if not keys:
        raise _FetchError("no usable signing keys")
    return keys


def _usable_key(raw: object) -> _Jwk | None:
    """A public signing key PyJWT can load, or None (encryption keys, HMAC secrets, weak RSA...)."""
    if not isinstance(raw, dict) or raw.get("kty") not in ("RSA", "EC"):
        return None
    if raw.get("use", "sig") != "sig":
        return None
    ops = raw.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kid, alg, crv = raw.get("kid"), raw.get("alg"), raw.get("crv")
    if kid is not None and not isinstance(kid, str):
        return None
    if alg is not None and alg not in ALGORITHMS:
        return None
    if raw["kty"] == "EC":
        probe_alg = next((a for a, (_, c) in ALGORITHMS.items() if c and c == crv), None)
    else:
        probe_alg = "RS256"
    if probe_alg is None:
        return None
    # A published private key must never turn verification into signing: keep public members only.
    data = {k: v for k, v in raw.items() if k not in _PRIVATE_MEMBERS}
    try:
        key = jwt.PyJWK(data, algorithm=probe_alg).key
    except (jwt.PyJWTError, ValueError, TypeError):
        return None
    if raw["kty"] == "RSA" and getattr(key, "key_size", 0) < MIN_RSA_BITS:
        return None
    return _Jwk(kid=kid, kty=raw["kty"], crv=crv, alg=alg, data=data)
