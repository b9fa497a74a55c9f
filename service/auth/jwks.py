"""The CDS Clients' signing keys: each issuer's JWK Sets, found, fetched, cached and filtered.

Key sources, per issuer: a configured `jwks_file` and `jwks_url` are tried first; the token's `jku`
header is used only if it is on the issuer's `jku` allow-list (otherwise the token is refused even
when a configured set would verify it), and it is fetched only if the configured sets do not hold
the token's `kid`. An issuer configured with a single `jku` and nothing else uses it for tokens
that omit the header. Sets are cached per source for `jwks_cache_seconds`; an unknown `kid` causes
one refetch, at most every MIN_REFETCH_SECONDS per source, so forged tokens cannot make us hammer
the client's key host.

Only public signing keys PyJWT can load are kept, each bound to the algorithms its type allows.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import requests

from service.settings import IssuerSettings

# Named as before the split from service.auth.tokens, so operators' log queries keep matching.
log = logging.getLogger("service.auth.tokens")

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
FETCH_TIMEOUT = (2.0, 2.0)  # connect, read: a hook call must answer in about half a second
MAX_JWKS_BYTES = 256 * 1024
MIN_REFETCH_SECONDS = 30.0
FAILURE_BACKOFF_SECONDS = 5.0
MIN_RSA_BITS = 2048
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


class SigningKeyError(Exception):
    """No trusted key for the token; `reason` is short, safe to show the client, and token-free."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Jwk:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    data: dict[str, Any]

    def fits(self, alg: str) -> bool:
        """Whether this key may verify `alg`, one of ALGORITHMS: type, curve and own `alg` agree."""
        kty, crv = ALGORITHMS[alg]
        return not (self.kty != kty or (crv and self.crv != crv) or (self.alg and self.alg != alg))


@dataclass(frozen=True)
class _Source:
    location: str
    is_file: bool


@dataclass
class _CachedSet:
    keys: list[Jwk]
    fetched_at: float


class _FetchError(Exception):
    pass


class SigningKeys:
    """The key sets of all issuers, shared by every request a verifier handles (thread-safe)."""

    def __init__(
        self,
        cache_seconds: float,
        *,
        http: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._cache_seconds = cache_seconds
        self._http = http or requests.Session()
        self._clock = clock
        self._sets: dict[_Source, _CachedSet] = {}
        self._last_attempt: dict[_Source, float] = {}
        self._locks: dict[_Source, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def key_for(self, header: dict[str, Any], issuer: IssuerSettings) -> Jwk:
        """The issuer's key the token header names; SigningKeyError if none can be trusted."""
        kid, jku = header.get("kid"), header.get("jku")
        if kid is not None and not isinstance(kid, str):
            raise SigningKeyError("malformed token")
        sources = [_Source(issuer.jwks_file, True)] if issuer.jwks_file else []
        sources += [_Source(issuer.jwks_url, False)] if issuer.jwks_url else []
        if jku is not None:
            if not isinstance(jku, str) or jku not in issuer.jku:
                raise SigningKeyError("jku not allowed")
            sources.append(_Source(jku, False))
        elif not sources and len(issuer.jku) == 1:
            sources.append(_Source(issuer.jku[0], False))
        if not sources:
            raise SigningKeyError("jku required")
        loaded = False
        if kid is None:
            # The spec requires kid; without it only an unambiguous set can say which key signed.
            for source in sources:
                try:
                    keys = self._keys(source, refresh=False)
                except SigningKeyError:
                    continue
                if len(keys) == 1:
                    return keys[0]
                raise SigningKeyError("kid required")
            raise SigningKeyError("signing keys unavailable")
        for refresh in (False, True):
            for source in sources:
                try:
                    keys = self._keys(source, refresh=refresh)
                except SigningKeyError:
                    continue
                loaded = True
                for jwk in keys:
                    if jwk.kid == kid:
                        return jwk
        raise SigningKeyError("unknown signing key" if loaded else "signing keys unavailable")

    def _keys(self, source: _Source, *, refresh: bool) -> list[Jwk]:
        """Cached keys of one source; `refresh` asks for a rate-limited refetch (unknown kid)."""
        with self._lock_for(source):
            now = self._clock()
            cached = self._sets.get(source)
            fresh = cached and now - cached.fetched_at < self._cache_seconds
            if cached and fresh and not refresh:
                return cached.keys
            last = self._last_attempt.get(source)
            wait = MIN_REFETCH_SECONDS if cached else FAILURE_BACKOFF_SECONDS
            if last is not None and now - last < wait:
                if cached:
                    return cached.keys
                raise SigningKeyError("signing keys unavailable")
            self._last_attempt[source] = now
            try:
                keys = _parse_jwks(self._load(source))
            except _FetchError as exc:
                log.warning("cannot load signing keys from %s: %s", source.location, exc)
                if cached:
                    # A stale set beats refusing every client while its key host is down.
                    return cached.keys
                raise SigningKeyError("signing keys unavailable") from None
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


def _parse_jwks(body: bytes) -> list[Jwk]:
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


def _usable_key(raw: object) -> Jwk | None:
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
    return Jwk(kid=kid, kty=raw["kty"], crv=crv, alg=alg, data=data)
