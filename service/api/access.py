"""Who may read /metrics: nobody (off), callers on this host (loopback, the default), or callers
with the configured bearer token. Not the CDS client JWT: a scraper is not an EHR."""

from __future__ import annotations

import hmac
import ipaddress

from flask import request

from service.api.errors import ApiError
from service.settings import MetricsSettings

_BEARER = "bearer "


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return (mapped or ip).is_loopback


def check_metrics_access(settings: MetricsSettings) -> None:
    """Raises the JSON error the caller gets instead of the metrics."""
    if settings.access == "off":
        raise ApiError(404, "not_found", "no such endpoint")
    if settings.access == "loopback":
        if not is_loopback(request.remote_addr):
            raise ApiError(403, "forbidden", "metrics are served to this host only")
        return
    header = request.headers.get("Authorization", "")
    given = header[len(_BEARER) :].strip() if header.lower().startswith(_BEARER) else ""
    expected = settings.token or ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "metrics need the configured bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="flare-cds-metrics"'},
        )
