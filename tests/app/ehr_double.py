"""A SMART on FHIR EHR on loopback, for the timeline app's tests: the true boundary, over HTTP.

It extends the FHIR test server with what an EHR adds around it: an EHR page that launches the
app in a frame, `.well-known/smart-configuration`, an authorize endpoint that approves at once
and redirects with a code, and a token endpoint that checks the code, the redirect URI, the
client and the PKCE verifier before it hands out a token and the patient in context. FHIR reads
then need that token. Every check that fails is recorded in `refusals`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import urlencode

from werkzeug.wrappers import Request, Response

from tests.fhir_test_server import FhirTestServer


@dataclass
class Grant:
    patient: str
    challenge: str
    redirect_uri: str
    client_id: str
    scope: str
    app_context: str | None


@dataclass
class EhrPolicy:
    client_id: str = "flare-cds"
    client_secret: str | None = None  # set: the token endpoint wants HTTP Basic
    expires_in: int = 3600
    standalone_patient: str = ""  # the patient a user would pick in a standalone launch
    extra: dict[str, Any] = field(default_factory=dict)


class SmartEhr(FhirTestServer):
    def __init__(self, policy: EhrPolicy | None = None) -> None:
        super().__init__()
        self.policy = policy or EhrPolicy()
        self.app_url = ""  # the app's launch URL, set once the app is running
        self._launches: dict[str, tuple[str, str | None]] = {}
        self._codes: dict[str, Grant] = {}
        self.tokens: dict[str, str] = {}  # access token -> patient
        self.refusals: list[str] = []
        self._ehr_lock = threading.Lock()

    @property
    def authorize_url(self) -> str:
        return f"{self.origin}/oauth/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.origin}/oauth/token"

    def ehr_page(self, patient: str, app_context: str | None = None) -> str:
        """The EHR's chart page for `patient`, which frames the app's EHR launch at 1024 px."""
        return f"{self.origin}/ehr/chart?" + urlencode(
            {"patient": patient, **({"appContext": app_context} if app_context else {})}
        )

    def fhir_requests(self) -> list[str]:
        """Paths of data requests made to the FHIR endpoint (discovery excluded)."""
        return [
            r.path
            for r in self.requests
            if r.path.startswith(self.base_path + "/") and "/.well-known/" not in r.path
        ]

    def _respond(self, request: Request) -> Response:
        path = request.path
        if path == "/ehr/chart":
            return self._chart(request)
        if path == f"{self.base_path}/.well-known/smart-configuration":
            return _json(
                200,
                {
                    "issuer": self.origin,
                    "authorization_endpoint": self.authorize_url,
                    "token_endpoint": self.token_url,
                    "capabilities": [
                        "launch-ehr",
                        "launch-standalone",
                        "client-public",
                        "client-confidential-symmetric",
                        "context-ehr-patient",
                        "context-standalone-patient",
                        "permission-v2",
                    ],
                    "code_challenge_methods_supported": ["S256"],
                    "grant_types_supported": ["authorization_code"],
                },
            )
        if path == "/oauth/authorize":
            return self._authorize(request)
        if path == "/oauth/token":
            return self._token(request)
        if path.startswith(self.base_path + "/"):
            token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
            with self._ehr_lock:
                known = token in self.tokens
            if not known:
                self.refusals.append("fhir: no valid bearer token")
                return _json(
                    401,
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {
                                "severity": "error",
                                "code": "login",
                                "diagnostics": "bearer token needed",
                            }
                        ],
                    },
                )
        return super()._respond(request)

    def launch_url(self, patient: str, app_context: str | None = None) -> str:
        """The app's EHR launch URL for `patient`, as the EHR would open it."""
        launch = secrets.token_urlsafe(16)
        with self._ehr_lock:
            self._launches[launch] = (patient, app_context)
        return f"{self.app_url}?" + urlencode({"iss": self.base_url, "launch": launch})

    def _chart(self, request: Request) -> Response:
        src = self.launch_url(request.args["patient"], request.args.get("appContext"))
        page = (
            "<!doctype html><html><head><title>EHR chart</title></head>"
            "<body style='margin:0'><h1 style='font:16px sans-serif'>EHR: patient chart</h1>"
            f"<iframe id='app' src='{escape(src)}' width='1024' height='1400' "
            "style='border:0'></iframe></body></html>"
        )
        return Response(page, 200, mimetype="text/html")

    def _authorize(self, request: Request) -> Response:
        args = request.args
        problems = []
        if args.get("response_type") != "code":
            problems.append("response_type")
        if args.get("client_id") != self.policy.client_id:
            problems.append("client_id")
        if args.get("aud") != self.base_url:
            problems.append("aud")
        if args.get("code_challenge_method") != "S256" or not args.get("code_challenge"):
            problems.append("pkce")
        if not args.get("state"):
            problems.append("state")
        scope = args.get("scope", "").split()
        if "openid" not in scope or "patient/Observation.rs" not in scope:
            problems.append("scope")
        launch = args.get("launch")
        with self._ehr_lock:
            context = self._launches.pop(launch, None) if launch else None
        if launch is not None:
            if context is None or "launch" not in scope:
                problems.append("launch")
        elif "launch/patient" not in scope or not self.policy.standalone_patient:
            problems.append("launch/patient")
        if problems:
            self.refusals.append("authorize: " + ", ".join(problems))
            return Response("authorization refused: " + ", ".join(problems), 400)
        patient, app_context = context or (self.policy.standalone_patient, None)
        code = secrets.token_urlsafe(24)
        with self._ehr_lock:
            self._codes[code] = Grant(
                patient,
                args["code_challenge"],
                args["redirect_uri"],
                args["client_id"],
                args["scope"],
                app_context,
            )
        target = args["redirect_uri"] + "?" + urlencode({"code": code, "state": args["state"]})
        return Response("", 302, headers={"Location": target})

    def _token(self, request: Request) -> Response:
        if request.method != "POST":
            return _json(405, {"error": "invalid_request"})
        form = request.form
        with self._ehr_lock:
            grant = self._codes.pop(form.get("code", ""), None)  # a code works once
        error = None
        if form.get("grant_type") != "authorization_code" or grant is None:
            error = "invalid_grant: code"
        elif form.get("redirect_uri") != grant.redirect_uri:
            error = "invalid_grant: redirect_uri"
        elif _challenge(form.get("code_verifier", "")) != grant.challenge:
            error = "invalid_grant: code_verifier"
        elif not self._client_ok(request, grant):
            error = "invalid_client"
        if error:
            self.refusals.append("token: " + error)
            return _json(400 if error != "invalid_client" else 401, {"error": error.split(":")[0]})
        token = secrets.token_urlsafe(32)
        with self._ehr_lock:
            self.tokens[token] = grant.patient
        answer = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.policy.expires_in,
            "scope": grant.scope,
            "patient": grant.patient,
            "need_patient_banner": False,
            **self.policy.extra,
        }
        if grant.app_context:
            answer["appContext"] = grant.app_context
        return _json(200, answer)

    def _client_ok(self, request: Request, grant: Grant) -> bool:
        if self.policy.client_secret is None:
            return request.form.get("client_id") == grant.client_id
        auth = request.authorization
        return (
            auth is not None
            and auth.type == "basic"
            and auth.username == grant.client_id
            and auth.password == self.policy.client_secret
        )


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(
        json.dumps(body),
        status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )
