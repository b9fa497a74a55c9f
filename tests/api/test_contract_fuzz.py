"""Property-based contract tests: schemathesis fuzzes every operation of openapi.yaml in-process.

Every answer must be documented for its operation, match the documented schema and media type,
and never be a 5xx; data that violates the request schema must be refused. Runs are bounded and
derandomized so a failure reproduces.

Authentication is on, as the contract declares: cases get a freshly signed client JWT, except
those whose generated headers are the schema violation (a missing or malformed Authorization),
which must be refused with 401.

Left to itself, the generator would almost never hit a real service (the `{id}` is a free string)
nor a body for the right hook, so `steer` sends most cases to the real services and replaces some
bodies for the hook call with fixture requests (which produce real cards to check), keeping a
share of unknown ids and untouched bodies. Schema-invalid cases keep their body: it is what the
service must refuse.
"""

from __future__ import annotations

import copy
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.parameters import ParameterLocation

from service import create_app
from service.settings import IssuerSettings
from tests.api.test_security_http import client_jwt
from tests.auth.test_tokens import EC_A, bearer, write_jwks
from tests.conftest import (
    FIXTURE_NOW,
    ROOT,
    SERVICE_FOR_HOOK,
    all_fixture_names,
    load_fixture,
    test_settings,
)

CONTRACT = ROOT / "openapi.yaml"
# Loaded from the file, called in-process against the Flask app (`app=`); the test below proves
# the app serves this very file at /openapi.yaml.
schema = schemathesis.openapi.from_path(CONTRACT)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
HOOK_OF_SERVICE = {service: hook for hook, service in SERVICE_FOR_HOOK.items()}
SERVICES = sorted(HOOK_OF_SERVICE)
FIXTURES = {hook: [load_fixture(n) for n in all_fixture_names(hook)] for hook in SERVICE_FOR_HOOK}
# Any URL a generated request names as fhirServer is refused before it is contacted:
# fuzzing must not reach the network.
NO_FHIR_SERVER = ("http://127.0.0.1:9/fhir",)
BASE = "https://cds.example.org"  # auth.public_base_url, so `aud` does not depend on the transport
ISS = "https://ehr.example.org/"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    issuer = IssuerSettings(ISS, jwks_file=write_jwks(tmp, EC_A))
    settings_ = test_settings(
        tmp,
        fhir={"allowed_servers": NO_FHIR_SERVER},
        auth={"required": True, "public_base_url": BASE, "issuers": (issuer,)},
    )
    return create_app(settings_, clock=lambda: FIXTURE_NOW)


def authorize(case: Any) -> None:
    """A valid client JWT for the URL the case calls, unless its headers are the invalid part."""
    if not case.operation.path.startswith("/cds-services"):
        return
    meta = case.meta
    header_info = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    if header_info is not None and header_info.mode.is_negative:
        return
    # Generated ids come percent-encoded as sent; `aud` names the endpoint with them decoded,
    # the way the service sees its path (the verifier compares both in URI form).
    service_id = unquote(str((case.path_parameters or {}).get("id")))
    path = case.operation.path.replace("{id}", service_id)
    case.headers = {**(case.headers or {}), "Authorization": bearer(client_jwt(BASE + path))}


def steer(case: Any) -> None:
    """Point the case at a real service most of the time; for hook calls, vary the body.

    Choices come from a hash of the generated case, not from a random source, so a run repeats.
    """
    params = case.path_parameters
    if not params or not isinstance(params.get("id"), str):
        return
    digest = zlib.crc32(repr((params["id"], case.body)).encode("utf-8", "backslashreplace"))
    ids = [*SERVICES, params["id"]]  # one share stays as generated: mostly unknown services
    params["id"] = ids[digest % len(ids)]
    hook = HOOK_OF_SERVICE.get(params["id"])
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if hook is None or negative or case.operation.path != "/cds-services/{id}":
        return
    choice = digest // len(ids)
    if choice % 3 == 1:
        bodies = FIXTURES[hook]
        case.body = copy.deepcopy(bodies[choice % len(bodies)])
    elif choice % 3 == 2 and isinstance(case.body, dict):
        # A generated body, aimed at the service's hook so it gets past the hook check.
        case.body["hook"] = hook
        if isinstance(case.body.get("context"), dict):
            case.body["context"].setdefault("userId", "Practitioner/fuzz")
            case.body["context"].setdefault("patientId", "fuzz")


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    # Each case is a full in-process request; slow generation is expected, not a problem.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_operation_keeps_its_contract(case: Any, app: Any) -> None:
    steer(case)
    authorize(case)
    case.call_and_validate(app=app, checks=CHECKS)


def test_the_app_serves_the_contract_that_was_fuzzed(app: Any) -> None:
    served = app.test_client().get("/openapi.yaml")
    assert served.status_code == 200
    assert served.get_data() == CONTRACT.read_bytes()
