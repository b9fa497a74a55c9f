"""One JSON error shape for every failure a client can cause (openapi.yaml `Error`)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

# Werkzeug's own errors, named the way the contract names them.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "header_fields_too_large",
    503: "service_unavailable",
}

log = logging.getLogger("flare_cds.errors")


class ApiError(Exception):
    """An error answered as JSON: `error` (a code), `message` and optional details."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        details: Sequence[dict[str, str]] = (),
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.details = list(details)
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> Response:
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.details:
            body["details"] = self.details
        body.update(self.extra)
        response = jsonify(body)
        response.status_code = self.status
        response.headers.update(self.headers)
        return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error.response()

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = {
            404: "no such endpoint",
            405: "method not allowed on this endpoint",
            413: "request body is larger than the service accepts",
        }.get(status, error.description or "request failed")
        response = ApiError(status, code, message).response()
        if status == 405 and error.get_headers():
            for name, value in error.get_headers():
                if name.lower() == "allow":
                    response.headers["Allow"] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        # Where it failed goes to the log (next to the request line with the same request id),
        # never to the client. Not the exception's text: messages quote whatever they were
        # given (a patient id in a KeyError, a header in a library's error), and logs must not.
        log.error(
            "unhandled %s",
            _type_name(error),
            extra={"request_id": g.get("request_id"), "stack": stack_without_messages(error)},
        )
        return ApiError(
            500, "internal_error", "the service failed to handle this request"
        ).response()


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def stack_without_messages(error: BaseException) -> str:
    """The traceback of `error` and of what caused it, each exception named by its type only."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.format_list(traceback.extract_tb(current.__traceback__))
        parts.append("".join(frames) + _type_name(current))
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    # Root cause first, the way Python prints a chain.
    return "\n-- which led to --\n".join(reversed(parts))
