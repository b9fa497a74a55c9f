"""One JSON error shape for every failure a client can cause (openapi.yaml `Error`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

# Werkzeug's own errors, named the way the contract names them.
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


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
        # The cause goes to the log (with a request id), never to the client.
        app.logger.exception("unhandled error", exc_info=error)
        return ApiError(500, "internal_error", "the service failed to handle this request").response()
