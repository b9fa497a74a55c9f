"""Fetch the prefetch data a CDS client did not send, from its own FHIR server.

CDS Hooks 2.0 ("FHIR Resource Access") lets a service run its prefetch queries against
`fhirServer` with `fhirAuthorization.access_token` as a bearer token. The URL comes from the
caller, so it is checked first (`service.record.address_policy`), the token only ever goes to the
fhirServer's own origin, every connection is checked again for the address actually reached, and
the whole fetch is bounded by one deadline because the client expects an answer in about 500 ms.

The deadline is a whole-call one: when it passes, the sockets of the queries still running are
shut down (service.record.fhir_http), so a server that trickles its answer a byte at a time
holds nothing past the call. Each FHIR origin has its own bounded pool of fetchers, so one slow
server cannot starve calls to another.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import orjson
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, SSLError
from urllib3.exceptions import TimeoutError as HTTPTimeoutError
from urllib3.util import Timeout

# FhirServerRefused is re-exported: it is part of this module's API (gathering catches it).
from service import metrics
from service.record.address_policy import (
    FhirServerPolicy,
    FhirServerRefused,
    Origin,
    has_dot_segments,
    origin_of,
)

# Bound under this module's name on purpose: tests patch `fhir_client._resolves_to_forbidden`.
from service.record.address_policy import resolves_to_forbidden as _resolves_to_forbidden
from service.record.fhir_http import (
    NO_RETRIES,
    ForbiddenPeerError,
    OriginPools,
    QueryScope,
    new_origin_pool,
    request_target,
)
from service.settings import FhirSettings

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
# A prefetch answer is a few hundred kB at most; this only stops a runaway or hostile server.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
# RFC 6750 is stricter; visible ASCII is enough to keep the token out of header-injection errors.
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]+")
# Origins with a pool of their own; past this, the least recently used pool is let go.
MAX_ORIGIN_POOLS = 32


@dataclass(frozen=True)
class FetchOutcome:
    """The answer to one prefetch query.

    `resource` is a resource for a read, or one searchset Bundle holding the entries of every
    page for a search. It is None whenever `error` is set, so incomplete data is never used.
    """

    key: str
    query: str
    resource: dict[str, Any] | None = None
    error: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class _Call:
    """What every query of one fetch_all shares."""

    connections: HTTPConnectionPool  # the origin's, which every URL of the call is on
    base: str
    token: str | None
    deadline: float


class _ResolveTimeout(Exception):
    """The fhirServer name did not resolve before the deadline."""


class _FetchError(Exception):
    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class FhirFetcher:
    """Runs prefetch queries concurrently against a client's FHIR server.

    One instance serves the whole process: its pools keep connections and threads as long as
    it lives. Call close() when done.
    """

    def __init__(self, settings: FhirSettings) -> None:
        self._settings = settings
        self._policy = FhirServerPolicy(settings.allowed_servers)
        # One bounded pool per FHIR origin: a server that stalls fills only its own.
        self._pools: OrderedDict[Origin, OriginPools] = OrderedDict()
        self._pools_lock = threading.Lock()
        # getaddrinfo has no timeout of its own; a few threads bound both the wait and the
        # number of lookups a dead resolver can hold at once.
        self._resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fhir-dns")
        self._closed = False
        if not self._policy.restricted:
            log.warning(
                "fhir.allowed_servers is empty: any fhirServer a client sends will be called "
                "(link-local and cloud metadata addresses are still refused)"
            )

    def close(self) -> None:
        self._closed = True
        # Workers are bounded by the deadline already; do not wait for them here.
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            pool.close()
        self._resolver.shutdown(wait=False, cancel_futures=True)

    def check_server(self, fhir_server: str) -> None:
        """Raise FhirServerRefused unless this service may call `fhir_server`."""
        try:
            self._checked_base(fhir_server, time.monotonic() + self._settings.deadline_seconds)
        except _ResolveTimeout:
            raise FhirServerRefused("fhirServer name did not resolve in time") from None

    def fetch_all(
        self, fhir_server: str, access_token: str | None, queries: Mapping[str, str]
    ) -> dict[str, FetchOutcome]:
        """Run every query (prefetch key -> relative FHIR URL) within one deadline.

        Raises FhirServerRefused before contacting anything if the server is not acceptable.
        """
        if self._closed:
            raise RuntimeError("FhirFetcher is closed")
        deadline = time.monotonic() + self._settings.deadline_seconds
        try:
            base = self._checked_base(fhir_server, deadline)
        except _ResolveTimeout:
            reason = f"{self._deadline_reason()} resolving the FHIR server name"
            return _counted({key: FetchOutcome(key, q, error=reason) for key, q in queries.items()})
        if access_token and not _BEARER_TOKEN.fullmatch(access_token):
            reason = "access token cannot be sent as a bearer token"
            return _counted({key: FetchOutcome(key, q, error=reason) for key, q in queries.items()})
        pools = self._pool_for(origin_of(base))
        call = _Call(pools.connections, base, access_token, deadline)
        scopes = {key: QueryScope() for key in queries}
        futures = {
            key: pools.fetchers.submit(self._fetch_one, call, key, query, scopes[key])
            for key, query in queries.items()
        }
        wait(futures.values(), timeout=max(0.0, deadline - time.monotonic()))
        outcomes: dict[str, FetchOutcome] = {}
        for key, future in futures.items():
            if future.done() and not future.cancelled():
                outcomes[key] = future.result()
            else:
                future.cancel()  # frees the queue slot if it never started
                scopes[key].cancel()  # and ends the fetch if it did
                outcomes[key] = FetchOutcome(key, queries[key], error=self._deadline_reason())
        failures = [f"{o.key}: {o.error}" for o in outcomes.values() if not o.ok]
        if failures:  # netloc only: the query holds patient ids, and credentials were refused
            log.warning("FHIR fetch from %s incomplete: %s", urlsplit(base).netloc, failures)
        return _counted(outcomes)

    def _pool_for(self, origin: Origin) -> OriginPools:
        with self._pools_lock:
            pools = self._pools.get(origin)
            if pools is None:
                size = self._settings.pool_size
                pools = OriginPools(
                    ThreadPoolExecutor(max_workers=size, thread_name_prefix="fhir-fetch"),
                    new_origin_pool(origin, size),
                )
                self._pools[origin] = pools
                if len(self._pools) > MAX_ORIGIN_POOLS:
                    self._pools.popitem(last=False)[1].let_go()
            self._pools.move_to_end(origin)
            return pools

    def _deadline_reason(self) -> str:
        return f"timed out after {self._settings.deadline_seconds:g} s"

    def _checked_base(self, fhir_server: str, deadline: float) -> str:
        return self._policy.checked_base(
            fhir_server, lambda host, port: self._resolves_in_time(host, port, deadline)
        )

    def _resolves_in_time(self, host: str, port: int | None, deadline: float) -> bool:
        """_resolves_to_forbidden, given up on at the deadline (raises _ResolveTimeout)."""
        lookup = self._resolver.submit(_resolves_to_forbidden, host, port)
        try:
            return lookup.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:  # concurrent.futures raises the builtin since 3.11
            lookup.cancel()
            raise _ResolveTimeout from None

    def _fetch_one(self, call: _Call, key: str, query: str, scope: QueryScope) -> FetchOutcome:
        try:
            if scope.cancelled or time.monotonic() >= call.deadline:
                raise _FetchError(self._deadline_reason())  # queued until its call was over
            with scope:
                resource, status = self._run_query(call, query)
        except Exception as exc:
            if scope.cancelled:  # whatever the cut-off socket raised, the reason is the deadline
                return FetchOutcome(key, query, error=self._deadline_reason())
            if isinstance(exc, _FetchError):
                return FetchOutcome(key, query, error=exc.reason, status=exc.status)
            # The type only: some library messages echo header values, i.e. the token.
            log.error("unexpected %s fetching prefetch key %s", type(exc).__name__, key)
            return FetchOutcome(key, query, error="internal error while fetching")
        return FetchOutcome(key, query, resource=resource, status=status)

    def _run_query(self, call: _Call, query: str) -> tuple[dict[str, Any], int]:
        is_read, resource_type, relative = _classify(query)
        url = f"{call.base}/{relative}"
        if is_read:
            status, resource = self._get_json(call, url, is_read=True)
            if resource.get("resourceType") != resource_type:
                raise _FetchError(f"response is not a {resource_type} resource", status)
            return resource, status
        first: dict[str, Any] | None = None
        entries: list[Any] = []
        pages = 0
        while True:
            status, bundle = self._get_json(call, url, is_read=False)
            page_entries = bundle.get("entry", [])
            if bundle.get("resourceType") != "Bundle" or not isinstance(page_entries, list):
                raise _FetchError(_not_a_bundle(bundle), status)
            pages += 1
            first = first or bundle
            entries.extend(page_entries)
            next_url = _next_link(bundle)
            if next_url is None:
                return _merged(first, entries), status
            next_url = urljoin(url, next_url)
            if "@" in urlsplit(next_url).netloc:
                # Credentials in a link are not this service's to send anywhere.
                raise _FetchError("next link with user credentials not followed", status)
            # The token must never travel to, nor data be taken from, another origin.
            if origin_of(next_url) != origin_of(call.base):
                raise _FetchError("next link to another origin not followed", status)
            if pages >= self._settings.max_pages:
                raise _FetchError(f"more than {self._settings.max_pages} pages", status)
            url = next_url

    def _get_json(self, call: _Call, url: str, *, is_read: bool) -> tuple[int, dict[str, Any]]:
        status, body = self._get(call, url)
        if status in (404, 410) and is_read:
            raise _FetchError("not found", status)
        if status in (401, 403):
            what = "refused the access token" if call.token else "requires an access token"
            raise _FetchError(f"FHIR server {what} ({status})", status)
        if 300 <= status < 400:
            raise _FetchError(f"FHIR server answered {status}; redirects are not followed", status)
        if not 200 <= status < 300:
            raise _FetchError(f"FHIR server answered {status}", status)
        try:
            # Strict JSON: NaN and Infinity are not JSON, and a NaN IgM would compare as "low".
            resource = orjson.loads(body)
        except orjson.JSONDecodeError:  # includes invalid UTF-8
            raise _FetchError("response is not JSON", status) from None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise _FetchError("response is not a FHIR resource", status)
        return status, resource

    def _get(self, call: _Call, url: str) -> tuple[int, bytes]:
        """GET `url`, an address on the call's origin (next links are checked)."""
        token, deadline = call.token, call.deadline
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _FetchError(self._deadline_reason())
        headers = {"Accept": FHIR_JSON, "Accept-Encoding": "gzip, deflate"}
        if token and origin_of(url) == origin_of(call.base):
            headers["Authorization"] = f"Bearer {token}"
        settings = self._settings
        # Capped by what is left of the deadline so no worker outlives the call by much.
        timeout = Timeout(
            connect=min(settings.connect_timeout_seconds, remaining),
            read=min(settings.read_timeout_seconds, remaining),
        )
        response, complete = None, False
        try:
            response = call.connections.urlopen(
                "GET",
                request_target(url),
                headers=headers,
                timeout=timeout,
                retries=NO_RETRIES,
                redirect=False,
                preload_content=False,
            )
            chunks, size = [], 0
            for chunk in response.stream(64 * 1024):
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise _FetchError("response is too large", response.status)
                if time.monotonic() > deadline:
                    raise _FetchError(self._deadline_reason(), response.status)
                chunks.append(chunk)
            complete = True
            return response.status, b"".join(chunks)
        except ForbiddenPeerError:
            reason = "FHIR server address is link-local or metadata; not contacted"
            raise _FetchError(reason) from None
        # Before timeouts: urllib3's NewConnectionError is also a TimeoutError.
        except (NewConnectionError, ProtocolError, SSLError) as exc:
            if response is not None and isinstance(exc, ProtocolError):  # cut short mid-body
                raise _FetchError("request to the FHIR server failed") from None
            raise _FetchError("could not connect to the FHIR server") from None
        except HTTPTimeoutError:
            raise _FetchError(self._timeout_reason(deadline)) from None
        except HTTPError:  # e.g. a body that does not decode
            raise _FetchError("request to the FHIR server failed") from None
        finally:
            if response is not None:
                if not complete:  # a half-read connection must not go back to the pool
                    response.close()
                response.release_conn()  # urllib3 may have released it at the end already

    def _timeout_reason(self, deadline: float) -> str:
        if time.monotonic() >= deadline - 0.01:
            return self._deadline_reason()
        return "timed out waiting for the FHIR server"


def _counted(outcomes: dict[str, FetchOutcome]) -> dict[str, FetchOutcome]:
    metrics.count_fhir_outcomes(o.error for o in outcomes.values())
    return outcomes


def _classify(query: str) -> tuple[bool, str, str]:
    """(is a read, resource type, relative URL) for a filled-in prefetch query."""
    if not isinstance(query, str) or any(ord(ch) < 32 or ch == "\x7f" for ch in query):
        raise _FetchError("query is not a valid FHIR query")
    parts = urlsplit(query)
    if parts.scheme or parts.netloc:
        raise _FetchError("query is not a relative FHIR URL")
    path = parts.path.strip("/")
    segments = path.split("/")
    if not path or "" in segments or has_dot_segments(path):
        raise _FetchError("query is not a valid FHIR query")
    if not _RESOURCE_TYPE.fullmatch(segments[0]):
        raise _FetchError("query does not start with a FHIR resource type")
    is_read = (len(segments) == 2 and not segments[1].startswith(("$", "_"))) or (
        len(segments) == 4 and segments[2] == "_history"
    )
    relative = f"{path}?{parts.query}" if parts.query else path
    return is_read, segments[0], relative


def _not_a_bundle(resource: dict[str, Any]) -> str:
    kind = resource.get("resourceType")
    if isinstance(kind, str) and _RESOURCE_TYPE.fullmatch(kind) and kind != "Bundle":
        return f"response is not a FHIR Bundle ({kind})"
    return "response is not a FHIR Bundle"


def _links(bundle: dict[str, Any], relation: str) -> list[dict[str, Any]]:
    links = bundle.get("link")
    links = links if isinstance(links, list) else []
    return [x for x in links if isinstance(x, dict) and x.get("relation") == relation]


def _next_link(bundle: dict[str, Any]) -> str | None:
    url = next((x.get("url") for x in _links(bundle, "next")), None)
    return url if isinstance(url, str) and url else None


def _merged(first: dict[str, Any], entries: list[Any]) -> dict[str, Any]:
    """One searchset Bundle with every page's entries; paging links no longer apply."""
    bundle = {k: v for k, v in first.items() if k not in ("entry", "link")}
    if self_links := _links(first, "self"):
        bundle["link"] = self_links
    if entries:  # FHIR JSON has no empty arrays
        bundle["entry"] = entries
    return bundle
