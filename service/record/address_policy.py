"""Which fhirServer URLs this service will call, and with which origin a URL is compared.

The fhirServer of a CDS Hooks request comes from the caller, so it is checked like any untrusted
URL before anything is fetched from it: http(s) only, no credentials, query or dot segments,
never a link-local or cloud metadata address (by name, literal or DNS answer), and, when
`fhir.allowed_servers` is set, under one of its prefixes. The connect-time check of the address
actually reached lives with the HTTP pool in `service.record.fhir_http`; it uses `forbidden_ip`.

Standard library only, so importing it never builds the HTTP machinery.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import unquote, urlsplit, urlunsplit

_METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal"})
# Cloud instance metadata services: AWS, GCP and Azure (169.254.169.254, also link-local), AWS
# over IPv6 (fd00:ec2::254), Alibaba Cloud (100.100.100.200) and Oracle Cloud (192.0.0.192).
_METADATA_IPS = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
# IPv6 prefixes whose low 32 bits are an IPv4 address: NAT64 (RFC 6052), IPv4-compatible
# (deprecated, ::a.b.c.d) and IPv4-translated (RFC 2765, ::ffff:0:a.b.c.d). IPv4-mapped, 6to4
# and Teredo have their own accessors on IPv6Address.
_LOW_32_BITS_IPV4 = tuple(
    ipaddress.ip_network(prefix) for prefix in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96")
)
# RFC 8215 local-use NAT64 prefix, written with the RFC 6052 /48 layout: the IPv4 address in
# bits 48-63 and 72-87 (bits 64-71 are zero).
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class FhirServerRefused(Exception):
    """The fhirServer URL is not one this service will call; `reason` is safe to show a client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int | None


def origin_of(url: str) -> Origin:
    """Scheme, host and port as compared for the allow-list and for where the token may go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    return Origin(scheme, host, parts.port or _DEFAULT_PORTS.get(scheme))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address the IPv6 address may carry, in any of the standard spellings."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client); the client is already de-obfuscated
    value = int(ip)
    if any(ip in prefix for prefix in _LOW_32_BITS_IPV4) and value > 0xFFFF:
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))  # ::1 and :: stay themselves
    if ip in _NAT64_LOCAL:
        found.append(ipaddress.IPv4Address(((value >> 64) & 0xFFFF) << 16 | (value >> 40) & 0xFFFF))
    return found


def forbidden_ip(address: str) -> bool:
    """True for link-local and cloud metadata addresses, including IPv4 embedded in IPv6."""
    ip = _ip(address)
    if ip is None:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(_forbidden(embedded) for embedded in _embedded_ipv4(ip)):
            return True
    return _forbidden(ip)


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_link_local or ip in _METADATA_IPS


def resolves_to_forbidden(host: str, port: int | None) -> bool:
    """True if any DNS answer for `host` is a forbidden address. Blocks: getaddrinfo has no
    timeout, so callers bound the wait themselves."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        # Nothing to connect to; the fetch fails on its own and the connect guard still applies.
        return False
    return any(forbidden_ip(str(info[4][0])) for info in infos)


def has_dot_segments(path: str) -> bool:
    return any(unquote(segment) in (".", "..") for segment in path.split("/"))


def _parse_prefix(prefix: str) -> tuple[Origin, str]:
    parts = urlsplit(prefix.strip())
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"fhir.allowed_servers entry {prefix!r} is not an http(s) URL")
    return origin_of(prefix.strip()), parts.path.rstrip("/")


class FhirServerPolicy:
    """The fhirServer checks, with the `fhir.allowed_servers` prefixes parsed once.

    Raises ValueError on construction for an allow-list entry that is not an http(s) URL.
    """

    def __init__(self, allowed_servers: Iterable[str]) -> None:
        self._allowed = tuple(_parse_prefix(p) for p in allowed_servers)

    @property
    def restricted(self) -> bool:
        """False when the allow-list is empty, i.e. any non-forbidden server is accepted."""
        return bool(self._allowed)

    def checked_base(
        self, fhir_server: str, name_is_forbidden: Callable[[str, int | None], bool]
    ) -> str:
        """The normalised base URL to fetch from, or FhirServerRefused.

        `name_is_forbidden(host, port)`, typically `resolves_to_forbidden` run under a deadline,
        is only called for a host name that passed every other check; what it raises propagates.
        """
        if not isinstance(fhir_server, str) or not fhir_server:
            raise FhirServerRefused("fhirServer is missing")
        if any(ch.isspace() or ord(ch) < 32 or ch in "\\\x7f" for ch in fhir_server):
            raise FhirServerRefused("fhirServer is not a valid URL")
        try:
            parts = urlsplit(fhir_server)
            origin = origin_of(fhir_server)
        except ValueError:
            raise FhirServerRefused("fhirServer is not a valid URL") from None
        if origin.scheme not in _DEFAULT_PORTS:
            raise FhirServerRefused("fhirServer must be an http or https URL")
        if not origin.host:
            raise FhirServerRefused("fhirServer has no host")
        if "@" in parts.netloc:
            raise FhirServerRefused("fhirServer must not contain user credentials")
        if parts.query or parts.fragment or fhir_server.endswith(("?", "#")):
            raise FhirServerRefused("fhirServer must not have a query or fragment")
        if has_dot_segments(parts.path):
            raise FhirServerRefused("fhirServer path must not contain '.' or '..' segments")
        # Refused whatever the allow-list says: these reach cloud credentials, not FHIR data.
        if origin.host in _METADATA_HOSTS or forbidden_ip(origin.host):
            raise FhirServerRefused("fhirServer is a link-local or cloud metadata address")
        path = parts.path.rstrip("/")
        # A prefix must end at a path boundary: /fhir allows /fhir/x but not /fhir2.
        if self._allowed and not any(
            allowed == origin and (path == prefix or path.startswith(prefix + "/"))
            for allowed, prefix in self._allowed
        ):
            raise FhirServerRefused("fhirServer is not an allowed FHIR server")
        # Resolved after the allow-list so refused names cost no DNS lookup.
        if _ip(origin.host) is None and name_is_forbidden(origin.host, origin.port):
            raise FhirServerRefused("fhirServer resolves to a link-local or cloud metadata address")
        return urlunsplit((origin.scheme, parts.netloc.lower(), path, "", ""))
