"""flare-cds: a CDS Hooks 2.0 service that warns about IgM flare with anti-CD20 antibodies."""

from __future__ import annotations

from typing import Any

from flask import Flask

from service.settings import Settings, load_settings, plain_http_key_urls

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, **runtime_overrides: Any) -> Flask:
    """The app factory. `runtime_overrides` (clock, fetcher, store, verifier) serve tests."""
    from service.api import middleware
    from service.api.errors import register_error_handlers
    from service.api.json_codec import OrjsonProvider
    from service.api.routes import bp
    from service.api.runtime import Runtime
    from service.logging_setup import configure_logging

    settings = settings or load_settings()
    configure_logging(settings.logging.level)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.http.max_body_bytes
    app.json = OrjsonProvider(app)  # cards keep the field order the spec lists
    app.extensions["flare_cds"] = Runtime(settings, **runtime_overrides)
    middleware.install(app)
    register_error_handlers(app)
    app.register_blueprint(bp)
    from service.app.views import install as install_timeline_app

    install_timeline_app(app)
    if not settings.auth.required:
        app.logger.warning("client authentication is OFF (auth.required = false): development only")
    for url in plain_http_key_urls(settings.auth):
        app.logger.warning(
            "signing keys are fetched over plain http from %s: development only", url
        )
    return app
