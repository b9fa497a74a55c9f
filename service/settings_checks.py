"""The checks a loaded configuration must pass before the service starts.

Each failure is a SettingsError naming the key, so a bad value stops start-up with a message an
operator can act on rather than surfacing as odd behaviour later.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import fields
from urllib.parse import urlsplit

from service.settings import METRICS_ACCESS, AuthSettings, Settings, SettingsError


def check(settings: Settings) -> None:
    rules = settings.rules
    positive = {
        "rules.igm_high_mg_dl": rules.igm_high_mg_dl,
        "rules.igm_very_high_mg_dl": rules.igm_very_high_mg_dl,
        "rules.viscosity_critical_cp": rules.viscosity_critical_cp,
        "rules.igm_lookback_days": rules.igm_lookback_days,
        "rules.viscosity_lookback_days": rules.viscosity_lookback_days,
        "rules.flare_rise_percent": rules.flare_rise_percent,
        "rules.flare_window_days": rules.flare_window_days,
        "rules.course_gap_days": rules.course_gap_days,
        "rules.baseline_max_age_days": rules.baseline_max_age_days,
        "rules.btk_hold_window_days": rules.btk_hold_window_days,
        "rules.btk_rebound_rise_percent": rules.btk_rebound_rise_percent,
        "rules.progression_rise_percent": rules.progression_rise_percent,
        "fhir.connect_timeout_seconds": settings.fhir.connect_timeout_seconds,
        "fhir.read_timeout_seconds": settings.fhir.read_timeout_seconds,
        "fhir.deadline_seconds": settings.fhir.deadline_seconds,
        "fhir.max_pages": settings.fhir.max_pages,
        "fhir.pool_size": settings.fhir.pool_size,
        "http.max_body_bytes": settings.http.max_body_bytes,
        "app.launch_seconds": settings.app.launch_seconds,
        "app.session_seconds": settings.app.session_seconds,
        "app.http_timeout_seconds": settings.app.http_timeout_seconds,
        "http.header_timeout_seconds": settings.http.header_timeout_seconds,
        "http.body_timeout_seconds": settings.http.body_timeout_seconds,
        "http.max_connections": settings.http.max_connections,
        "auth.max_token_lifetime_seconds": settings.auth.max_token_lifetime_seconds,
        "auth.jwks_cache_seconds": settings.auth.jwks_cache_seconds,
        "storage.pool_size": settings.storage.pool_size,
        "storage.timeout_seconds": settings.storage.timeout_seconds,
    }
    for key, value in positive.items():
        if not math.isfinite(value) or value <= 0:
            raise SettingsError(f"{key} must be greater than zero, not {value}")
    if settings.auth.leeway_seconds < 0:
        # A negative leeway would refuse every token before it expires.
        raise SettingsError(
            f"auth.leeway_seconds must not be negative, not {settings.auth.leeway_seconds}"
        )
    if rules.igm_very_high_mg_dl < rules.igm_high_mg_dl:
        raise SettingsError("rules.igm_very_high_mg_dl must not be below rules.igm_high_mg_dl")
    terminology = settings.terminology
    for f in fields(terminology):
        if f.name.endswith("_names"):
            for name in getattr(terminology, f.name):
                if not name.strip():
                    raise SettingsError(f"terminology.{f.name}: names must not be empty")
            continue
        for code in getattr(terminology, f.name):
            system, sep, value = code.partition("|")
            if not sep or not value or not system:
                raise SettingsError(f"terminology.{f.name}: {code!r} is not 'system|code'")
    if settings.auth.required and not settings.auth.issuers:
        raise SettingsError("auth.required is true but no [[auth.issuers]] are configured")
    for issuer in settings.auth.issuers:
        if not (issuer.jku or issuer.jwks_url or issuer.jwks_file):
            raise SettingsError(f"auth issuer {issuer.iss}: give jku, jwks_url or jwks_file")
        for url in (*issuer.jku, *([issuer.jwks_url] if issuer.jwks_url else [])):
            if not _secure_key_url(url) and url not in plain_http_key_urls(settings.auth):
                raise SettingsError(
                    f"auth issuer {issuer.iss}: key set URL {url!r} must be https "
                    "(plain http only to a loopback address)"
                )
    if not settings.app.client_id:
        raise SettingsError("app.client_id must not be empty")
    for server in settings.app.open_fhir_servers:
        if not server.lower().startswith(("http://", "https://")):
            raise SettingsError(f"app.open_fhir_servers: {server!r} is not an http(s) URL")
    for source in settings.app.frame_ancestors:
        if not source or any(ch.isspace() or ch in ';,"' for ch in source):
            raise SettingsError(f"app.frame_ancestors: {source!r} is not one CSP source")
    metrics = settings.metrics
    if metrics.access not in METRICS_ACCESS:
        raise SettingsError(f"metrics.access must be one of {', '.join(METRICS_ACCESS)}")
    if metrics.access == "token" and not metrics.token:
        raise SettingsError("metrics.access is 'token' but metrics.token is not set")
    if settings.logging.level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"logging.level {settings.logging.level!r} is not a log level")


def _secure_key_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() == "https" and bool(parts.hostname)


def plain_http_key_urls(auth: AuthSettings) -> list[str]:
    """Configured http:// key set URLs to a loopback address: allowed for local set-ups, and
    warned about at start-up (anyone on the path could swap the keys)."""
    found = []
    for issuer in auth.issuers:
        for url in (*issuer.jku, *([issuer.jwks_url] if issuer.jwks_url else [])):
            parts = urlsplit(url)
            if parts.scheme.lower() == "http" and _is_loopback(parts.hostname or ""):
                found.append(url)
    return found


def _is_loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
