"""Authenticates CDS Clients by the signed JWT that CDS Hooks 2.0 puts in `Authorization: Bearer`.

Checks follow the spec's "Trusting CDS Clients" order: `iss` allow-listed, `aud` is the URL called,
`exp`/`iat` sane, `tenant` allow-listed, signature against the issuer's JWK Set, `jti` not replayed.
The early checks read the claims before the signature is verified only to give a precise reason and
to pick the issuer's keys; every claim is checked again on the verified payload, and only that is
returned. Finding, fetching and caching the issuers' keys is service.auth.jwks's job.

Neither the token nor any part of it is logged; reasons are short and safe to show the client.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jwt
import requests
from werkzeug.urls import iri_to_uri

# Key-set names are re-exported: they were defined here before service.auth.jwks was split out.
from service.auth.jwks import (
    ALGORITHMS,
    FAILURE_BACKOFF_SECONDS,
    FETCH_TIMEOUT,
    MAX_JWKS_BYTES,
    MIN_REFETCH_SECONDS,
    MIN_RSA_BITS,
    SigningKeyError,
    SigningKeys,
)
from service.settings import AuthSettings, IssuerSettings
from service.storage.replay_cache import ReplayCache

__all__ = [
    "ALGORITHMS",
    "FAILURE_BACKOFF_SECONDS",
    "FETCH_TIMEOUT",
    "MAX_JWKS_BYTES",
    "MAX_TOKEN_CHARS",
    "MIN_REFETCH_SECONDS",
    "MIN_RSA_BITS",
    "NO_CREDENTIALS",
    "REALM",
    "REQUIRED_CLAIMS",
    "AuthError",
    "TokenCheckUnavailable",
    "TokenVerifier",
    "audience_for",
    "www_authenticate",
]

log = logging.getLogger(__name__)

REALM = "flare-cds"
NO_CREDENTIALS = "missing bearer token"
REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")
MAX_TOKEN_CHARS = 16 * 1024
_BEARER = re.compile(r"Bearer +(\S+) *", re.IGNORECASE)
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class AuthError(Exception):
    """The request is not authenticated; `reason` is short and never contains the token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenCheckUnavailable(Exception):
    """The token could not be checked against replays (the store is down): refuse it (503)."""

    reason = "replay check unavailable"


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
        self._clock = clock
        self._issuers: dict[str, IssuerSettings] = {}
        for issuer in settings.issuers:
            self._issuers.setdefault(issuer.iss, issuer)
        self._keys = SigningKeys(settings.jwks_cache_seconds, http=http, clock=clock)

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
            try:
                fresh = self._replay.remember(f"{issuer.iss}|{claims['jti']}", exp)
            except Exception as exc:
                log.warning(
                    "client token refused: replay cache unavailable (%s)", type(exc).__name__
                )
                raise TokenCheckUnavailable() from None
            if not fresh:
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
        # The spec recommends exp at most 5 minutes after iat: a token that lives for years is
        # a stolen credential waiting to be replayed once the replay cache has forgotten it.
        lifetime = self._settings.max_token_lifetime_seconds
        if iat < now - lifetime - leeway:
            raise AuthError("token issued too long ago")
        if exp - iat > lifetime + leeway:
            raise AuthError("token lifetime too long")
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
        try:
            jwk = self._keys.key_for(header, issuer)
        except SigningKeyError as exc:
            raise AuthError(exc.reason) from None
        if not jwk.fits(alg):
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
