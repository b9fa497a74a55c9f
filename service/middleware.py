"""What wraps every request: request id and timing, CORS, security headers, client auth.

Browser clients (the public CDS Hooks sandbox) call every route from the page, so CORS covers
all routes and answers preflight before authentication: a preflight carries no token.
"""

from __future__ import annotations

import logging
import time
import uuid

from flask import Flask, Response, g, request

from service.errors import ApiError

log = logging.getLogger("flare_cds.http")

# Routes anyone may read: liveness and the public contract.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.yaml"})
CORS_ALLOW_HEADERS = "Authorization, Content-Type, Accept, X-Request-Id"
CORS_ALLOW_METHODS = "GET, POST, OPTIONS"


def install(app: Flask) -> None:
    settings = app.extensions["flare_cds"].settings
    origins = settings.http.cors_origins

    @app.before_request
    def _start() -> Response | None:
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else (
            uuid.uuid4().hex
        )
        g.log_fields = {}
        if request.method == "OPTIONS":
            return Response(status=204)
        if request.path not in PUBLIC_PATHS and request.path.startswith("/cds-services"):
            _authenticate(app)
        return None

    @app.after_request
    def _finish(response: Response) -> Response:
        _cors(response, origins)
        headers = response.headers
        headers["X-Request-Id"] = g.get("request_id", "")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Cache-Control", "no-store")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        # Method, path, status and timing only: no body, no query string, no headers.
        log.info(
            "request",
            extra={
                "request_id": g.get("request_id"),
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "ms": round(elapsed_ms, 2),
                **g.get("log_fields", {}),
            },
        )
        return response


def _cors(response: Response, origins: tuple[str, ...]) -> None:
    origin = request.headers.get("Origin")
    if "*" in origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
    elif origin and origin in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")
    else:
        return
    response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
    response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
    response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, WWW-Authenticate"
    response.headers["Access-Control-Max-Age"] = "600"


def _authenticate(app: Flask) -> None:
    runtime = app.extensions["flare_cds"]
    if not runtime.settings.auth.required:
        return
    from service.auth import AuthError, audience_for, www_authenticate

    audience = audience_for(request.url, request.path, runtime.settings.auth.public_base_url)
    try:
        g.client_claims = runtime.verifier().verify(request.headers.get("Authorization"), audience)
    except AuthError as exc:
        g.log_fields = {"auth": exc.reason}
        raise ApiError(
            401, "unauthorized", exc.reason,
            headers={"WWW-Authenticate": www_authenticate(exc.reason)},
        ) from None
