"""FhirFetcher against a real FHIR test server on loopback (127.0.0.1 / 127.0.0.2 only)."""

from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.record import fhir_http
from service.record.address_policy import forbidden_ip, origin_of
from service.record.fhir_client import FetchOutcome, FhirFetcher, FhirServerRefused
from service.settings import FhirSettings
from tests.fhir_test_server import FhirTestServer, hook_request_resources

TOKEN = "s3cret-fhir-access-token-7f1c"
LOINC_IGM = "http://loinc.org|2472-9"
FIXTURES = Path(__file__).resolve().parents[2] / "fhir_fixtures" / "hook_requests"
# Generous per-request limits so functional tests do not flake on a busy machine.
RELAXED = {"connect_timeout_seconds": 1.0, "read_timeout_seconds": 1.0, "deadline_seconds": 3.0}


def _observation(oid: str, patient: str, date: str, code: str = "2472-9") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{patient}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": date,
        "valueQuantity": {"value": 4200, "unit": "mg/dL"},
    }


RESOURCES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "p1", "gender": "female"},
    {"resourceType": "Patient", "id": "p2"},
    *(_observation(f"igm-{i}", "p1", f"2024-0{i}-01T08:00:00Z") for i in range(1, 8)),
    _observation("visc-1", "p1", "2024-03-15", code="33968-9"),
    _observation("igm-other", "p2", "2024-05-01"),
    *(
        {"resourceType": "MedicationRequest", "id": mid, "status": status, "intent": "order",
         "subject": {"reference": "Patient/p1"}, "authoredOn": date}
        for mid, status, date in (("mr-1", "active", "2024-06-01"), ("mr-2", "stopped", "2023-01"))
    ),
]  # fmt: skip


@pytest.fixture
def fhir() -> Iterator[FhirTestServer]:
    with FhirTestServer() as server:
        server.add_resources(RESOURCES)
        yield server


@pytest.fixture
def make_fetcher() -> Iterator[Any]:
    made: list[FhirFetcher] = []

    def make(**settings: Any) -> FhirFetcher:
        fetcher = FhirFetcher(FhirSettings(**{**RELAXED, **settings}))
        made.append(fetcher)
        return fetcher

    yield make
    for fetcher in made:
        fetcher.close()


def _ids(outcome: FetchOutcome) -> list[str]:
    assert outcome.resource is not None
    return [e["resource"]["id"] for e in outcome.resource.get("entry", [])]


def _fetch_one(fetcher: FhirFetcher, fhir: FhirTestServer, query: str) -> FetchOutcome:
    return fetcher.fetch_all(fhir.base_url, TOKEN, {"k": query})["k"]


# -- query kinds -------------------------------------------------------------------------------


def test_read_sends_token_only_when_given(fhir: FhirTestServer, make_fetcher: Any) -> None:
    fetcher = make_fetcher()
    outcome = _fetch_one(fetcher, fhir, "Patient/p1")
    assert outcome.ok and outcome.status == 200
    assert outcome.resource == {"resourceType": "Patient", "id": "p1", "gender": "female"}
    assert fetcher.fetch_all(fhir.base_url, None, {"p": "Patient/p1"})["p"].ok
    with_token, without = fhir.requests
    assert with_token.path == "/fhir/Patient/p1"
    assert with_token.authorization == f"Bearer {TOKEN}"
    assert with_token.accept == "application/fhir+json"
    assert without.authorization is None


def test_read_failures(fhir: FhirTestServer, make_fetcher: Any) -> None:
    missing = _fetch_one(make_fetcher(), fhir, "Patient/nobody")
    assert not missing.ok and missing.resource is None
    assert (missing.error, missing.status) == ("not found", 404)
    fhir.operation_outcome = {"Patient"}
    wrong_type = _fetch_one(make_fetcher(), fhir, "Patient/p1")
    assert (wrong_type.resource, wrong_type.error) == (None, "response is not a Patient resource")


def test_search_filters_by_patient_code_and_sorts(fhir: FhirTestServer, make_fetcher: Any) -> None:
    query = f"Observation?patient=p1&code={LOINC_IGM}&_sort=-date&_count=100"
    outcome = _fetch_one(make_fetcher(), fhir, query)
    assert outcome.ok
    bundle = outcome.resource
    assert bundle is not None
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == 7
    assert _ids(outcome) == [f"igm-{i}" for i in range(7, 0, -1)]
    assert bundle["entry"][0]["search"] == {"mode": "match"}
    assert bundle["entry"][0]["fullUrl"] == f"{fhir.base_url}/Observation/igm-7"
    assert fhir.requests[0].args.get("code") == LOINC_IGM  # the "|" survived encoding


def test_search_code_lists_bare_codes_and_status(fhir: FhirTestServer, make_fetcher: Any) -> None:
    fetcher = make_fetcher()
    outcomes = fetcher.fetch_all(
        fhir.base_url,
        TOKEN,
        {
            "both": f"Observation?patient=p1&code={LOINC_IGM},http://loinc.org|33968-9&_sort=date",
            "bare": "Observation?patient=Patient/p1&code=33968-9",
            "active": "MedicationRequest?patient=p1&status=active,completed",
            "none": "Observation?patient=p3",
        },
    )
    assert all(o.ok for o in outcomes.values())
    assert _ids(outcomes["both"])[:3] == ["igm-1", "igm-2", "igm-3"]
    assert "visc-1" in _ids(outcomes["both"]) and len(_ids(outcomes["both"])) == 8
    assert _ids(outcomes["bare"]) == ["visc-1"]
    assert _ids(outcomes["active"]) == ["mr-1"]
    empty = outcomes["none"].resource
    assert empty is not None and empty["total"] == 0 and "entry" not in empty


# -- paging ------------------------------------------------------------------------------------


def test_pages_are_merged_into_one_bundle(fhir: FhirTestServer, make_fetcher: Any) -> None:
    outcome = _fetch_one(make_fetcher(), fhir, f"Observation?patient=p1&code={LOINC_IGM}&_count=3")
    assert outcome.ok
    assert _ids(outcome) == [f"igm-{i}" for i in range(1, 8)]
    bundle = outcome.resource
    assert bundle is not None and bundle["total"] == 7
    assert [link["relation"] for link in bundle["link"]] == ["self"]
    assert len(fhir.requests) == 3
    assert {r.authorization for r in fhir.requests} == {f"Bearer {TOKEN}"}


def test_more_pages_than_allowed_is_an_error(fhir: FhirTestServer, make_fetcher: Any) -> None:
    query = f"Observation?patient=p1&code={LOINC_IGM}&_count=3"
    outcome = _fetch_one(make_fetcher(max_pages=2), fhir, query)
    assert outcome.resource is None
    assert outcome.error == "more than 2 pages"
    assert len(fhir.requests) == 2


def test_next_link_to_another_origin_is_not_followed(
    fhir: FhirTestServer, make_fetcher: Any
) -> None:
    with FhirTestServer(host="127.0.0.2") as foreign:
        foreign.add_resources(RESOURCES)
        fhir.next_link_origin = foreign.origin
        outcome = _fetch_one(make_fetcher(), fhir, "Observation?patient=p1&_count=2")
        assert outcome.resource is None
        assert outcome.error == "next link to another origin not followed"
        assert foreign.requests == []  # never contacted, so the token cannot have reached it
    assert len(fhir.requests) == 1


# -- deadline and concurrency ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read_timeout", "error"),
    [(0.4, "timed out waiting for the FHIR server"), (5.0, "timed out after 0.45 s")],
)
def test_hung_server_is_cut_off_at_the_deadline(
    fhir: FhirTestServer, make_fetcher: Any, read_timeout: float, error: str
) -> None:
    fhir.delay_seconds = {"Observation": 5.0}
    fetcher = make_fetcher(read_timeout_seconds=read_timeout, deadline_seconds=0.45)
    started = time.monotonic()
    outcomes = fetcher.fetch_all(
        fhir.base_url, TOKEN, {"patient": "Patient/p1", "igm": "Observation?patient=p1"}
    )
    elapsed = time.monotonic() - started
    assert elapsed < 0.45 + 0.2
    assert outcomes["patient"].ok  # what did arrive in time is kept
    assert (outcomes["igm"].resource, outcomes["igm"].error) == (None, error)


def test_one_deadline_covers_every_page(fhir: FhirTestServer, make_fetcher: Any) -> None:
    fhir.delay_seconds = {"Observation": 0.2}  # 4 pages, each well within the read timeout
    fetcher = make_fetcher(read_timeout_seconds=1.0, deadline_seconds=0.45)
    started = time.monotonic()
    outcome = _fetch_one(fetcher, fhir, "Observation?patient=p1&_count=2")
    assert time.monotonic() - started < 0.45 + 0.2
    assert outcome.error == "timed out after 0.45 s"
    assert outcome.resource is None


def test_queries_run_concurrently(fhir: FhirTestServer, make_fetcher: Any) -> None:
    fhir.delay_seconds = 0.5
    fetcher = make_fetcher(read_timeout_seconds=1.5, deadline_seconds=3.0)
    queries = {
        "patient": "Patient/p1",
        "igm": f"Observation?patient=p1&code={LOINC_IGM}",
        "viscosity": "Observation?patient=p1&code=33968-9",
        "meds": "MedicationRequest?patient=p1",
    }
    started = time.monotonic()
    outcomes = fetcher.fetch_all(fhir.base_url, TOKEN, queries)
    elapsed = time.monotonic() - started
    assert all(o.ok for o in outcomes.values()), outcomes
    # Close to the slowest query, far from the 2 s sum; the slack is for a busy shared machine.
    assert elapsed < 1.4


def test_connections_are_kept_between_queries_and_calls(make_fetcher: Any) -> None:
    # A server that keeps connections open (as production FHIR servers do) must not be sent a
    # new TCP connection per query: that is a handshake each time, and gevent's resolver thread.
    queries = {
        "patient": "Patient/p1",
        "igm": f"Observation?patient=p1&code={LOINC_IGM}",
        "meds": "MedicationRequest?patient=p1",
    }
    with FhirTestServer(keep_alive=True) as server:
        server.add_resources(RESOURCES)
        fetcher = make_fetcher()
        for _ in range(5):
            outcomes = fetcher.fetch_all(server.base_url, TOKEN, queries)
            assert all(o.ok for o in outcomes.values()), outcomes
        assert len(server.requests) == 15
        # At most one connection per query running at once, reused by the next calls.
        assert server.connections_opened <= len(queries)


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_server_with_an_untrusted_certificate_is_not_sent_the_query(
    tmp_path: Path, make_fetcher: Any
) -> None:
    # The token and the patient's query go only to a server whose certificate chains to a
    # trusted authority; a self-signed one (a man in the middle, or a misconfigured server)
    # ends the query at the handshake.
    cert_path, key_path = _self_signed_certificate(tmp_path)
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"https://127.0.0.1:{server.server_address[1]}/fhir"
        outcome = make_fetcher().fetch_all(base, TOKEN, {"p": "Patient/p1"})["p"]
    finally:
        server.shutdown()
        server.server_close()
    assert not outcome.ok
    assert outcome.error == "could not connect to the FHIR server"
    assert seen == []


def test_cutting_off_a_query_spares_the_query_that_reused_its_connection() -> None:
    # Query A's connection goes back to the pool while A's call is still running; query B of
    # another call takes it. When A's call reaches its deadline and cuts A off, B's request on
    # that same socket must go on.
    with FhirTestServer(keep_alive=True) as server:
        server.add_resources(RESOURCES)
        server.delay_seconds = {"Observation": 0.4}
        origin = origin_of(server.base_url)
        pool = fhir_http.new_origin_pool(origin, 1)  # one connection: B must reuse A's
        url = server.base_url

        def get(path: str) -> Any:
            target = fhir_http.request_target(url + path)
            response = pool.urlopen("GET", target, retries=fhir_http.NO_RETRIES)
            return response.status, json.loads(response.data)

        a = fhir_http.QueryScope()
        with a:
            assert get("/Patient/p1")[0] == 200
            answers: list[Any] = []

            def query_b() -> None:
                with fhir_http.QueryScope():
                    try:
                        answers.append(get("/Observation?patient=p1"))
                    except Exception as exc:
                        answers.append(exc)

            other_call = threading.Thread(target=query_b)
            other_call.start()
            time.sleep(0.15)  # B is waiting for its answer on the pooled connection
            a.cancel()
            other_call.join(timeout=5)
        assert server.connections_opened == 1
        ((status, bundle),) = answers
        assert status == 200 and bundle["resourceType"] == "Bundle"


# -- server failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "value", "error", "status"),
    [
        ("fail_status", {"Observation": 500}, "FHIR server answered 500", 500),
        ("fail_status", {"Observation": 401}, "FHIR server refused the access token (401)", 401),
        ("fail_status", {"Observation": 403}, "FHIR server refused the access token (403)", 403),
        ("malformed", {"Observation"}, "response is not JSON", 200),
        (
            "operation_outcome",
            {"Observation"},
            "response is not a FHIR Bundle (OperationOutcome)",
            200,
        ),
    ],
)
def test_server_failures_are_reported(
    fhir: FhirTestServer, make_fetcher: Any, fault: str, value: Any, error: str, status: int
) -> None:
    setattr(fhir, fault, value)
    outcomes = make_fetcher().fetch_all(
        fhir.base_url, TOKEN, {"patient": "Patient/p1", "igm": "Observation?patient=p1"}
    )
    assert outcomes["patient"].ok  # one failing type does not spoil the others
    assert (outcomes["igm"].resource, outcomes["igm"].error) == (None, error)
    assert outcomes["igm"].status == status


def test_wrong_token_is_refused(fhir: FhirTestServer, make_fetcher: Any) -> None:
    fhir.required_token = "the-right-one"
    outcome = _fetch_one(make_fetcher(), fhir, "Patient/p1")
    assert outcome.error == "FHIR server refused the access token (401)"


def test_unreachable_server(make_fetcher: Any) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcomes = make_fetcher().fetch_all(f"http://127.0.0.1:{port}/fhir", TOKEN, {"p": "Patient/1"})
    assert outcomes["p"].error == "could not connect to the FHIR server"


@pytest.mark.parametrize(
    "query", ["http://127.0.0.2/fhir/Patient/p1", "//127.0.0.2/x", "Patient/../../admin", "patient"]
)
def test_bad_queries_are_not_sent(fhir: FhirTestServer, make_fetcher: Any, query: str) -> None:
    outcome = _fetch_one(make_fetcher(), fhir, query)
    assert outcome.error is not None and outcome.error.startswith("query ")
    assert fhir.requests == []


# -- which servers may be called ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.10.20:8080/fhir",
        "http://[fe80::1]/fhir",
        "http://[fe80::1%25eth0]/fhir",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/latest/meta-data/",  # Alibaba Cloud
        "http://[::ffff:100.100.100.200]/",
        "http://192.0.0.192/opc/v2/instance/",  # Oracle Cloud
        "http://[64:ff9b::c000:c0]/",  # 192.0.0.192 through NAT64
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://METADATA.google.internal./",
        "http://metadata/",
    ],
)
@pytest.mark.parametrize(
    "allowed",
    [
        (),
        (
            "http://169.254.169.254",
            "http://metadata",
            "http://100.100.100.200",
            "http://192.0.0.192",
        ),
    ],
)
def test_link_local_and_metadata_always_refused(
    make_fetcher: Any, url: str, allowed: tuple[str, ...]
) -> None:
    fetcher = make_fetcher(allowed_servers=allowed)
    with pytest.raises(FhirServerRefused, match="link-local or cloud metadata"):
        fetcher.check_server(url)
    with pytest.raises(FhirServerRefused):
        fetcher.fetch_all(url, TOKEN, {"p": "Patient/1"})


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("100.100.100.200", True),
        ("192.0.0.192", True),
        ("::ffff:100.100.100.200", True),
        ("2002:c000:c0::1", True),  # 6to4 around 192.0.0.192
        # Their neighbours are ordinary addresses: without an allow-list they are accepted.
        ("100.100.100.201", False),
        ("192.0.0.193", False),
    ],
)
def test_alibaba_and_oracle_metadata_addresses_are_forbidden(
    make_fetcher: Any, address: str, forbidden: bool
) -> None:
    assert forbidden_ip(address) is forbidden
    host = f"[{address}]" if ":" in address else address
    fetcher = make_fetcher()
    if forbidden:
        with pytest.raises(FhirServerRefused, match="link-local or cloud metadata"):
            fetcher.check_server(f"http://{host}/fhir")
    else:
        fetcher.check_server(f"http://{host}/fhir")  # an IP literal: no DNS lookup


def test_hostname_resolving_to_link_local_is_refused(
    make_fetcher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "fhir.rebind.test":  # never reaches DNS
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(FhirServerRefused, match="resolves to a link-local"):
        make_fetcher().check_server("https://fhir.rebind.test/fhir")


def test_connect_guard_checks_the_address_actually_reached(
    fhir: FhirTestServer, make_fetcher: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands in for a DNS answer that changed between check_server and connect.
    monkeypatch.setattr(fhir_http, "_peer_forbidden", lambda address: address == "127.0.0.1")
    outcome = _fetch_one(make_fetcher(), fhir, "Patient/p1")
    assert outcome.error == "FHIR server address is link-local or metadata; not contacted"
    assert fhir.requests == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://127.0.0.1/fhir", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("127.0.0.1/fhir", "http or https"),
        ("http:///fhir", "no host"),
        ("http://user:hunter2@127.0.0.1/fhir", "user credentials"),
        ("http://127.0.0.1/fhir?x=1", "query or fragment"),
        ("http://127.0.0.1/fhir/../admin", "'..'"),
        ("http://127.0.0.1/fh ir", "not a valid URL"),
        ("", "missing"),
    ],
)
def test_malformed_servers_refused(make_fetcher: Any, url: str, reason: str) -> None:
    with pytest.raises(FhirServerRefused) as refused:
        make_fetcher().check_server(url)
    assert reason in refused.value.reason
    assert "hunter2" not in refused.value.reason


def test_allow_list_prefix_must_end_at_a_path_boundary(
    fhir: FhirTestServer, make_fetcher: Any
) -> None:
    fetcher = make_fetcher(allowed_servers=(fhir.base_url, "https://fhir.example.org"))
    for ok in (
        fhir.base_url,
        fhir.base_url + "/",
        fhir.base_url + "/tenant-a",
        fhir.base_url.replace("http://", "HTTP://"),
    ):
        fetcher.check_server(ok)
    # Refused ones are decided before any DNS lookup, so these names are never resolved.
    for refused in (
        fhir.base_url + "2",
        fhir.base_url + "-evil",
        fhir.origin + "/other",
        f"http://127.0.0.2:{fhir.port}/fhir",
        f"http://127.0.0.1:{fhir.port + 1}/fhir",
        "https://fhir.example.org.evil.com/fhir",
        "https://fhir.example.org:8443/fhir",
        "http://fhir.example.org/fhir",
    ):
        with pytest.raises(FhirServerRefused, match="not an allowed FHIR server"):
            fetcher.check_server(refused)
    with pytest.raises(FhirServerRefused):  # fetch_all checks too, before any request
        fetcher.fetch_all(fhir.origin + "/fhir2", TOKEN, {"p": "Patient/p1"})
    assert fhir.requests == []
    assert _fetch_one(fetcher, fhir, "Patient/p1").ok


def test_empty_allow_list_warns_once(
    fhir: FhirTestServer, make_fetcher: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="service.record.fhir_client"):
        fetcher = make_fetcher()
        fetcher.fetch_all(fhir.base_url, TOKEN, {"p": "Patient/p1"})
        fetcher.fetch_all(fhir.base_url, TOKEN, {"p": "Patient/p1"})
    assert [r.getMessage() for r in caplog.records if "allowed_servers" in r.getMessage()] == [
        "fhir.allowed_servers is empty: any fhirServer a client sends will be called "
        "(link-local and cloud metadata addresses are still refused)"
    ]
    caplog.clear()
    make_fetcher(allowed_servers=(fhir.base_url,))
    assert not caplog.records


# -- the token stays secret --------------------------------------------------------------------


def test_token_never_appears_in_errors_or_logs(
    fhir: FhirTestServer, make_fetcher: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3's connection logs included
    fetcher = make_fetcher(deadline_seconds=0.5, read_timeout_seconds=0.3)
    fhir.fail_status = {"Condition": 500, "MedicationRequest": 401}
    fhir.malformed = {"MedicationAdministration"}
    fhir.delay_seconds = {"Encounter": 2.0}
    errors: list[str] = []
    with FhirTestServer(host="127.0.0.2") as foreign:
        fhir.next_link_origin = foreign.origin
        outcomes = fetcher.fetch_all(
            fhir.base_url,
            TOKEN,
            {
                "conditions": "Condition?patient=p1",
                "medicationRequests": "MedicationRequest?patient=p1",
                "medicationAdministrations": "MedicationAdministration?patient=p1",
                "encounters": "Encounter?patient=p1",
                "paged": "Observation?patient=p1&_count=2",
                "missing": "Patient/none",
            },
        )
        assert foreign.requests == []
    errors += [o.error or "" for o in outcomes.values()]
    assert all(errors), outcomes
    for bad_token in (TOKEN + "\r\nX-Injected: 1", TOKEN + " tail"):
        outcome = fetcher.fetch_all(fhir.base_url, bad_token, {"p": "Patient/p1"})["p"]
        errors.append(outcome.error or "")
    assert errors[-1] == "access token cannot be sent as a bearer token"
    with pytest.raises(FhirServerRefused) as refused:
        fetcher.fetch_all(f"http://x:{TOKEN}@127.0.0.1/fhir", TOKEN, {"p": "Patient/p1"})
    errors.append(str(refused.value))
    assert not [e for e in errors if TOKEN in e]
    assert caplog.records  # the failures were logged ...
    assert TOKEN not in caplog.text  # ... without the token
    assert all(TOKEN not in repr(r.args) for r in caplog.records)


# -- lifecycle and fixtures --------------------------------------------------------------------


def test_closed_fetcher_refuses_work(fhir: FhirTestServer, make_fetcher: Any) -> None:
    fetcher = make_fetcher()
    fetcher.close()
    with pytest.raises(RuntimeError):
        fetcher.fetch_all(fhir.base_url, TOKEN, {"p": "Patient/p1"})


def test_server_loads_resources_from_hook_request_files(tmp_path: Path, make_fetcher: Any) -> None:
    condition = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/w1"}}
    prefetch = {
        "patient": {"resourceType": "Patient", "id": "w1"},
        "conditions": {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": condition}],
        },
        "igm": None,
        "viscosity": {"resourceType": "OperationOutcome", "issue": []},
    }
    request = {"hook": "patient-view", "context": {"patientId": "w1"}, "prefetch": prefetch}
    (tmp_path / "patient-view").mkdir()
    (tmp_path / "patient-view" / "w1.json").write_text(json.dumps(request))
    with FhirTestServer() as server:
        assert server.load_fixture_requests([tmp_path]) == 2
        outcomes = make_fetcher().fetch_all(
            server.base_url, None, {"patient": "Patient/w1", "conditions": "Condition?patient=w1"}
        )
    assert outcomes["patient"].ok
    assert _ids(outcomes["conditions"]) == ["c1"]


def test_shipped_fixtures_load(make_fetcher: Any) -> None:
    """Every fixture patient's data can be fetched back, even where ids repeat across files."""
    files = sorted(FIXTURES.glob("*/*.json"))
    if not files:
        pytest.skip("no hook request fixtures yet")
    fetcher = make_fetcher(deadline_seconds=10.0)
    with FhirTestServer() as server:
        assert server.load_fixture_requests(files) == len(hook_request_resources(files)) > 0
        for file in files:
            patient_id = json.loads(file.read_text(encoding="utf-8"))["context"]["patientId"]
            expected: dict[str, set[str]] = {}
            for resource in hook_request_resources([file]):
                # Medications belong to no patient: they come with `_include`, not this search.
                if resource["resourceType"] not in ("Patient", "Medication"):
                    expected.setdefault(resource["resourceType"], set()).add(resource["id"])
            queries = {kind: f"{kind}?patient={patient_id}" for kind in expected}
            outcomes = fetcher.fetch_all(server.base_url, None, queries)
            got = {kind: set(_ids(outcome)) for kind, outcome in outcomes.items()}
            assert got == expected, file.name


@pytest.mark.parametrize(
    "address",
    [
        "::169.254.169.254",  # IPv4-compatible, dotted
        "::a9fe:a9fe",  # IPv4-compatible, hex
        "::ffff:a9fe:a9fe",  # IPv4-mapped, hex
        "0:0:0:0:0:ffff:169.254.169.254",  # IPv4-mapped, written out
        "::ffff:0:169.254.169.254",  # IPv4-translated (SIIT)
        "64:ff9b::a9fe:a9fe",  # NAT64 well-known prefix
        "64:ff9b:1:a9fe:a9:fe00::",  # NAT64 local-use prefix, RFC 6052 /48 layout
        "2002:a9fe:a9fe::1",  # 6to4
        "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254 obfuscated
        "FE80::1",  # link-local, upper case
        "fe80::1%25eth0",  # link-local with a (URL-encoded) zone id
        "febf:ffff::1",  # the top of fe80::/10
        "fd00:ec2:0:0:0:0:0:254",  # AWS IPv6 metadata, written out
        "::192.0.0.192",  # Oracle Cloud metadata, IPv4-compatible
    ],
)
def test_every_ipv6_spelling_of_metadata_and_link_local_is_refused(
    make_fetcher: Any, address: str
) -> None:
    assert forbidden_ip(address.replace("%25", "%"))
    with pytest.raises(FhirServerRefused, match="link-local or cloud metadata"):
        make_fetcher().check_server(f"http://[{address}]/fhir")


@pytest.mark.parametrize("address", ["::1", "::ffff:127.0.0.1", "2001:db8::1", "64:ff9b::a01:101"])
def test_ordinary_ipv6_addresses_are_not_refused(make_fetcher: Any, address: str) -> None:
    assert not forbidden_ip(address)
    make_fetcher().check_server(f"http://[{address}]/fhir")
