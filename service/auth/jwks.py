"""The CDS Clients' signing keys: each issuer's JWK Sets, found, fetched, cached and filtered.

Key sources, per issuer: a configured `jwks_file` and `jwks_url` are tried first; the token's `jku`
header is used only if it is on the issuer's `jku` allow-list (otherwise the token is refused even
when a configured set would verify it), and it is fetched only if the configured sets do not hold
the token's `kid`. An issuer configured with a single `jku` and nothing else uses it for tokens
that omit the header. Sets are cached per source for `jwks_cache_seconds`; an unknown `kid` causes
one refetch, at most every MIN_REFETCH_SECONDS per source, so forged tokens cannot make us hammer
the client's key host.

A key host that is slow or hostile costs only its own issuer, and little: no lock is held while a
set is fetched, each source has at most one fetch in flight (the others wait for it, up to its
deadline, or are served the last good set at once), every fetch has an overall deadline of
FETCH_DEADLINE_SECONDS, and the back-off is counted from when an attempt ended.

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
import urllib3

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
# From the first byte sent to the last received; past it, callers stop waiting for the fetch.
FETCH_DEADLINE_SECONDS = 1.5
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


class _Flight:
    """One fetch of one source under way; `done` is set when it has ended either way."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.deadline = time.monotonic() + FETCH_DEADLINE_SECONDS


@dataclass
class _SourceState:
    cached: _CachedSet | None = None
    last_attempt: float | None = None  # when the last fetch ended, by the injected clock
    flight: _Flight | None = None


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
        self._states: dict[_Source, _SourceState] = {}
        # Guards _states only, and is never held across I/O.
        self._lock = threading.Lock()

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
        with self._lock:
            state = self._states.setdefault(source, _SourceState())
            now = self._clock()
            cached = state.cached
            if cached and not refresh and now - cached.fetched_at < self._cache_seconds:
                return cached.keys
            flight = state.flight
            if flight is None:
                wait = MIN_REFETCH_SECONDS if cached else FAILURE_BACKOFF_SECONDS
                if state.last_attempt is not None and now - state.last_attempt < wait:
                    if cached:
                        return cached.keys
                    raise SigningKeyError("signing keys unavailable")
                flight = state.flight = _Flight()
                threading.Thread(
                    target=self._fetch, args=(source, flight), name="jwks-fetch", daemon=True
                ).start()
            if cached and not refresh:
                # Expired, not wrong: the last good set serves while the new one is fetched.
                return cached.keys
        flight.done.wait(max(0.0, flight.deadline - time.monotonic()))
        with self._lock:
            latest = state.cached
        if latest is not None:
            # The new set if it came; otherwise a stale one beats refusing every client.
            return latest.keys
        raise SigningKeyError("signing keys unavailable")

    def _fetch(self, source: _Source, flight: _Flight) -> None:
        keys: list[Jwk] | None = None
        try:
            keys = _parse_jwks(self._load(source, flight.deadline))
        except _FetchError as exc:
            log.warning("cannot load signing keys from %s: %s", source.location, exc)
        except Exception as exc:  # a bug here must not leave the flight open forever
            log.error(
                "unexpected %s loading signing keys from %s", type(exc).__name__, source.location
            )
        with self._lock:
            state = self._states[source]
            # Stamped when the attempt ended, so a slow failure still backs off in full.
            state.last_attempt = self._clock()
            if keys is not None:
                state.cached = _CachedSet(keys, state.last_attempt)
            state.flight = None
        flight.done.set()
        if keys is not None:
            log.info("loaded %d signing key(s) from %s", len(keys), source.location)

    def _load(self, source: _Source, deadline: float) -> bytes:
        if source.is_file:
            try:
                return Path(source.location).read_bytes()[: MAX_JWKS_BYTES + 1]
            except OSError as exc:
                raise _FetchError(f"cannot read file: {exc.strerror}") from None

        def remaining(limit: float) -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _FetchError("timed out")
            return min(limit, left)

        try:
            # No redirects: the allow-list names the exact URL we trust.
            with self._http.get(
                source.location,
                timeout=(remaining(FETCH_TIMEOUT[0]), remaining(FETCH_TIMEOUT[1])),
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status_code != 200:
                    raise _FetchError(f"HTTP {response.status_code}")
                body = b""
                # read1: whatever has arrived, so a host that trickles meets the deadline.
                while len(body) <= MAX_JWKS_BYTES:
                    chunk = response.raw.read1(16 * 1024)
                    if not chunk:
                        break
                    body += chunk
                    remaining(FETCH_TIMEOUT[1])  # raises once the deadline has passed
                return body
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
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
