"""The /app/ routes: SMART launch, callback, and the timeline page (HTML, no script at all).

Every failure is a page that says what went wrong and what to do, with a status to match; the
log gets a short reason code and never a code, state, token or patient id (the request log
records the path only, never the query string).
"""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, g, redirect, render_template, request

from service.app.oauth import EHR_FAILED, LaunchError, Pkce, SmartClient, granted_patient
from service.app.reading import FHIR_ID, read_timeline
from service.clinical.fhir_values import UnreadableData
from service.record.gathering import DataUnavailable
from service.settings import StorageSettings
from service.storage.app_state import AppStateStore
from service.storage.location import POSTGRESQL, storage_location

if TYPE_CHECKING:
    from service.app.sealed_state import SealedState

log = logging.getLogger("flare_cds.app")
bp = Blueprint(
    "timeline", __name__, url_prefix="/app", template_folder="templates", static_folder="static"
)
LAUNCH_COOKIE = "flare_launch"
SESSION_COOKIE = "flare_session"
EXTENSION = "flare_cds_app"


class AppServices:
    """What the app builds once per Flask app: the SMART client and the sealed state."""

    def __init__(self, flask_app: Flask) -> None:
        runtime = flask_app.extensions["flare_cds"]
        self.runtime = runtime
        self.settings = runtime.settings.app
        self.smart = SmartClient(self.settings, runtime.settings.fhir)
        self._state: SealedState | None = None

    def state(self) -> SealedState:
        if self._state is None:  # opened in the worker that uses it
            # Imported here: cryptography is about 9 MB a worker serving only hooks never needs.
            from service.app.sealed_state import SealedState

            self._state = SealedState(_state_store(self.runtime.settings.storage))
        return self._state


def _state_store(storage: StorageSettings) -> AppStateStore:
    """Launches and sessions where every worker, and on PostgreSQL every instance, sees them."""
    location = storage_location(storage)
    if location.backend == POSTGRESQL:
        from service.storage.postgres_app_state import PostgresAppStateStore

        return PostgresAppStateStore(location.conninfo or "")
    from service.storage.app_state import SqliteAppStateStore

    return SqliteAppStateStore(_beside(storage.database, "app-state.sqlite3"))


def install(flask_app: Flask) -> None:
    flask_app.extensions[EXTENSION] = AppServices(flask_app)
    flask_app.register_blueprint(bp)


def _services() -> AppServices:
    return current_app.extensions[EXTENSION]


def public_base() -> str:
    """The base URL clients use: auth.public_base_url, else (in development) this request's."""
    configured = _services().runtime.settings.auth.public_base_url
    return (configured or request.url_root).rstrip("/")


@bp.after_request
def _headers(response: Response) -> Response:
    ancestors = " ".join(_services().settings.frame_ancestors) or "'none'"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; base-uri 'none'; "
        f"form-action 'none'; frame-ancestors {ancestors}"
    )
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"  # the callback's address holds a code
    return response


def _cookie(response: Response, name: str, value: str, max_age: int) -> None:
    # SameSite=None so the cookie is sent inside an EHR's frame; Partitioned keeps it to that
    # EHR's site where browsers block third-party cookies.
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/app/",
        secure=True,
        httponly=True,
        samesite="None",
        partitioned=True,
    )


def _error(status: int, reason: str, message: str, hint: str = "") -> tuple[str, int]:
    g.log_fields = {"app_error": reason}
    log.warning("timeline app refused a request", extra={"reason": reason, "status": status})
    page = render_template("error.html", message=message, hint=hint, status=status)
    return page, status


RELAUNCH = "Open the IgM timeline again from the patient's chart or the card."


@bp.get("/launch")
def launch() -> Any:
    services = _services()
    launch_id = request.args.get("launch") or None
    try:
        iss, aud = services.smart.checked_iss(request.args.get("iss"))
        config = services.smart.discover(iss)
    except LaunchError as exc:
        return _error(exc.status, exc.reason, exc.message)
    pkce = Pkce.new()
    redirect_uri = f"{public_base()}/app/callback"
    pending = {
        "iss": iss,
        "token_endpoint": config.token_endpoint,
        "verifier": pkce.verifier,
        "redirect_uri": redirect_uri,
    }
    lifetime = services.settings.launch_seconds
    state, browser = services.state().begin_launch(pending, lifetime)
    target = services.smart.authorize_url(
        config, aud=aud, redirect_uri=redirect_uri, state=state, pkce=pkce, launch=launch_id
    )
    response = redirect(target, 302)
    _cookie(response, LAUNCH_COOKIE, browser, lifetime)
    g.log_fields = {"app": "ehr-launch" if launch_id is not None else "standalone-launch"}
    return response


@bp.get("/callback")
def callback() -> Any:
    services = _services()
    state = request.args.get("state", "")
    if not state:
        return _error(400, "no_state", "The sign-in answer has no state.", RELAUNCH)
    reason, pending = services.state().finish_launch(state, request.cookies.get(LAUNCH_COOKIE, ""))
    if pending is None:
        return _error(
            400,
            reason,
            "This sign-in cannot be completed: it was not started in this browser, it was "
            "already used, or it took too long.",
            RELAUNCH,
        )
    if "error" in request.args:
        error = request.args.get("error", "")[:60]
        return _error(
            401,
            "authorization_denied",
            f"The EHR did not authorize the timeline ({error}).",
            RELAUNCH,
        )
    code = request.args.get("code", "")
    if not code:
        return _error(400, "no_code", "The sign-in answer has no authorization code.", RELAUNCH)
    try:
        answer = services.smart.exchange(
            pending["token_endpoint"],
            code=code,
            redirect_uri=pending["redirect_uri"],
            verifier=pending["verifier"],
        )
    except LaunchError as exc:
        return _error(exc.status, exc.reason, exc.message, RELAUNCH)
    patient = granted_patient(answer)
    if patient is None or not FHIR_ID.match(patient):
        return _error(
            EHR_FAILED,
            "no_patient",
            "The EHR did not say which patient the timeline is for.",
            RELAUNCH,
        )
    lifetime = services.settings.session_seconds
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        lifetime = min(lifetime, int(expires_in))
    expires_at = time.time() + lifetime
    session = {
        "iss": pending["iss"],
        "access_token": answer["access_token"],
        "patient": patient,
        "expires_at": expires_at,
        "finding": _linked_finding(answer.get("appContext")),
    }
    secret = services.state().open_session(session, expires_at)
    # The code leaves the address bar here.
    response = redirect(f"{public_base()}/app/timeline", 303)
    _cookie(response, SESSION_COOKIE, secret, lifetime)
    response.delete_cookie(
        LAUNCH_COOKIE, path="/app/", secure=True, httponly=True, samesite="None", partitioned=True
    )
    g.log_fields = {"app": "signed-in"}
    return response


def _linked_finding(app_context: Any) -> str | None:
    """The finding named by the card's appContext: only which reading to put first, nothing
    more is taken from it."""
    if not isinstance(app_context, str) or len(app_context) > 512:
        return None
    try:
        value = json.loads(app_context)
    except ValueError:
        return None
    return _finding_name(value.get("finding") if isinstance(value, dict) else None)


def _finding_name(value: Any) -> str | None:
    """A finding code as the cards write them (letters and hyphens), else None."""
    if isinstance(value, str) and value.replace("-", "").isalpha() and len(value) <= 64:
        return value
    return None


@bp.get("/timeline")
def timeline() -> Any:
    services = _services()
    if "iss" in request.args:  # an absolute link for an open FHIR server
        try:
            iss = services.smart.checked_open_server(request.args.get("iss"))
        except LaunchError as exc:
            return _error(exc.status, exc.reason, exc.message)
        patient = request.args.get("patient", "")
        if not FHIR_ID.match(patient):
            return _error(400, "bad_patient", "The link does not name a patient by FHIR id.")
        token, finding = None, _finding_name(request.args.get("finding"))
    else:
        session = services.state().session(request.cookies.get(SESSION_COOKIE, ""))
        if session is None:
            return _error(
                401,
                "no_session",
                "There is no signed-in timeline session, or it has ended.",
                RELAUNCH,
            )
        iss, token, patient = session["iss"], session["access_token"], session["patient"]
        finding = session.get("finding")
    try:
        view = read_timeline(services.runtime, iss, token, patient, finding)
    except DataUnavailable as exc:
        problems = "; ".join(f"{m.key}: {m.reason}" for m in exc.missing)
        return _error(
            EHR_FAILED,
            "data_unavailable",
            f"The patient's data could not be read from the EHR ({problems}).",
        )
    except UnreadableData as exc:
        return _error(
            EHR_FAILED, "data_unreadable", f"The EHR's data could not be read: {exc.problem}."
        )
    g.log_fields = {"app": "timeline", "findings": [r.finding for r in view.readings]}
    chart_b64 = base64.b64encode(view.chart_svg.encode("utf-8")).decode("ascii")
    return render_template("timeline.html", view=view, linked=finding, chart_b64=chart_b64)


def _beside(database: str, name: str) -> str:
    from pathlib import Path

    return str(Path(database).with_name(name))
