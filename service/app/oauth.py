"""The SMART App Launch 2.0 client: discovery, the authorization request, the token exchange.

The `iss` comes from whoever opened the launch URL, so it is checked like a hook's fhirServer
(`fhir.allowed_servers`, never a metadata address) before anything is fetched from it, and the
app refuses to launch at all while that allow-list is empty: otherwise any page could send a
user through this service to an authorization server of its choosing. Codes, verifiers, secrets
and tokens are never logged and never put in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from service.record.address_policy import (
    FhirServerPolicy,
    FhirServerRefused,
    origin_of,
    resolves_to_forbidden,
)
from service.settings import AppSettings, FhirSettings

if TYPE_CHECKING:
    import requests

RESOURCES = (
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "MedicationAdministration",
    "Procedure",
)
READ_SCOPES = " ".join(f"patient/{kind}.rs" for kind in RESOURCES)
MAX_ANSWER_BYTES = 256 * 1024  # a SMART configuration or token answer is a few kB
# The EHR failed or misbehaved (unreachable, refused, malformed answer): 424 Failed Dependency.
# Not a 5xx: this service did not fail, and the page says which step of the EHR's did.
EHR_FAILED = 424


class LaunchError(Exception):
    """The launch cannot go on. `message` is safe to show; `reason` is a short code to log."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class SmartConfiguration:
    authorization_endpoint: str
    token_endpoint: str


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = secrets.token_urlsafe(64)  # 86 characters: RFC 7636 allows 43 to 128
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def scopes(ehr_launch: bool) -> str:
    launch = "launch" if ehr_launch else "launch/patient"
    return f"{launch} openid fhirUser {READ_SCOPES}"


class SmartClient:
    def __init__(self, app: AppSettings, fhir: FhirSettings) -> None:
        self._app = app
        self._fhir = fhir
        self._policy = FhirServerPolicy(fhir.allowed_servers)
        self._open = FhirServerPolicy(app.open_fhir_servers)
        # Made on the first launch: requests (with urllib3) is a few MB a worker that serves only
        # hooks from prefetch never needs.
        self._session: requests.Session | None = None

    def checked_iss(self, iss: str | None) -> tuple[str, str]:
        """(normalised FHIR base to read from, `iss` as given for `aud`), or LaunchError if this
        app may not launch against it."""
        if not self._policy.restricted:
            raise LaunchError(
                403,
                "no_allowed_servers",
                "This service has no list of allowed FHIR servers (fhir.allowed_servers), so "
                "the timeline cannot be launched. Ask the administrator to configure it.",
            )
        if not iss and len(self._fhir.allowed_servers) == 1:
            iss = self._fhir.allowed_servers[0]  # a standalone launch at the one EHR configured
        # The EHR compares `aud` with its own spelling of its base URL: send it back unchanged.
        return _checked(self._policy, iss), str(iss)

    def checked_open_server(self, iss: str | None) -> str:
        """A base listed in app.open_fhir_servers (read without authorization), or LaunchError."""
        if not self._open.restricted:
            raise LaunchError(403, "open_servers_off", "Open FHIR servers are not enabled here.")
        return _checked(self._open, iss)

    def is_open_server(self, fhir_server: Any) -> bool:
        if not self._open.restricted or not isinstance(fhir_server, str):
            return False
        try:
            self._open.checked_base(fhir_server, lambda host, port: False)
        except FhirServerRefused:
            return False
        return True

    def discover(self, iss: str) -> SmartConfiguration:
        """`{iss}/.well-known/smart-configuration`, with both endpoints checked."""
        answer = self._json("GET", f"{iss}/.well-known/smart-configuration", "discovery")
        methods = answer.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise LaunchError(
                EHR_FAILED,
                "no_pkce",
                "The EHR's authorization server does not support PKCE (S256).",
            )
        endpoints = []
        for name in ("authorization_endpoint", "token_endpoint"):
            url = answer.get(name)
            if not isinstance(url, str) or not _trusted_endpoint(url, iss):
                raise LaunchError(
                    EHR_FAILED,
                    "bad_configuration",
                    f"The EHR's SMART configuration has no usable {name} "
                    "(it must be https, or on the FHIR server's own origin).",
                )
            endpoints.append(url)
        return SmartConfiguration(*endpoints)

    def authorize_url(
        self,
        config: SmartConfiguration,
        *,
        aud: str,
        redirect_uri: str,
        state: str,
        pkce: Pkce,
        launch: str | None,
    ) -> str:
        params = {
            "response_type": "code",
            "client_id": self._app.client_id,
            "redirect_uri": redirect_uri,
            "scope": scopes(ehr_launch=launch is not None),
            "state": state,
            "aud": aud,
            "code_challenge": pkce.challenge,
            "code_challenge_method": "S256",
        }
        if launch is not None:
            params["launch"] = launch
        parts = urlsplit(config.authorization_endpoint)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in params]
        return urlunsplit(parts._replace(query=urlencode([*query, *params.items()])))

    def exchange(
        self, token_endpoint: str, *, code: str, redirect_uri: str, verifier: str
    ) -> dict[str, Any]:
        """The token response for `code`; LaunchError unless it holds a bearer token."""
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        auth = None
        if self._app.client_secret:
            auth = (self._app.client_id, self._app.client_secret)  # client_secret_basic
        else:
            form["client_id"] = self._app.client_id
        answer = self._json("POST", token_endpoint, "token", data=form, auth=auth)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise LaunchError(
                EHR_FAILED, "no_token", "The EHR's token answer holds no access token."
            )
        if str(answer.get("token_type", "")).lower() != "bearer":
            raise LaunchError(EHR_FAILED, "not_bearer", "The EHR's token is not a bearer token.")
        return answer

    def _json(self, method: str, url: str, step: str, **kwargs: Any) -> dict[str, Any]:
        import requests

        if self._session is None:
            session = requests.Session()
            session.trust_env = False  # no proxy or .netrc credentials from the environment
            self._session = session
        try:
            with self._session.request(
                method,
                url,
                headers={"Accept": "application/json"},
                timeout=self._app.http_timeout_seconds,
                allow_redirects=False,
                stream=True,
                **kwargs,
            ) as response:
                body = response.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
                status = response.status_code
        except requests.RequestException:
            raise LaunchError(
                EHR_FAILED, f"{step}_unreachable", f"The EHR could not be reached ({step})."
            ) from None
        if status != 200:
            # An OAuth error answer names only a code; nothing secret is echoed.
            error = _oauth_error(body)
            raise LaunchError(
                EHR_FAILED if step == "discovery" else 401,
                f"{step}_refused",
                f"The EHR refused the {step} request (HTTP {status}{error}).",
            )
        if len(body) > MAX_ANSWER_BYTES:
            raise LaunchError(
                EHR_FAILED, f"{step}_too_large", f"The EHR's {step} answer is too large."
            )
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise LaunchError(
                EHR_FAILED, f"{step}_not_json", f"The EHR's {step} answer is not JSON."
            )
        return answer


def _checked(policy: FhirServerPolicy, iss: str | None) -> str:
    if not iss:
        raise LaunchError(400, "no_iss", "The launch did not say which FHIR server (iss) to use.")
    try:
        return policy.checked_base(iss, resolves_to_forbidden)
    except FhirServerRefused as exc:
        raise LaunchError(
            403, "iss_refused", f"The FHIR server is refused: {exc.reason}."
        ) from None


def _trusted_endpoint(url: str, iss: str) -> bool:
    """https anywhere (not a metadata address), or plain http only on the FHIR server's origin."""
    try:
        origin = origin_of(url)
        bare = urlunsplit(urlsplit(url)._replace(query=""))
        FhirServerPolicy(()).checked_base(bare, resolves_to_forbidden)
    except (ValueError, FhirServerRefused):
        return False
    return origin.scheme == "https" or origin == origin_of(iss)


def _oauth_error(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    return f": {error}" if isinstance(error, str) and error.isascii() and len(error) < 40 else ""


def granted_patient(answer: Mapping[str, Any]) -> str | None:
    patient = answer.get("patient")
    return patient if isinstance(patient, str) and patient else None
