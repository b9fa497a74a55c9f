"""The timeline app against the loopback EHR: the service on a real HTTP server, the EHR double
with the patient-view fixtures loaded, and a cookie-keeping agent for tests without a browser."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from service import create_app
from tests.app.ehr_double import EhrPolicy, SmartEhr
from tests.conftest import FIXTURE_NOW, FIXTURES, LiveServer, load_fixture, test_settings


def igm_results(scenario: str) -> list[tuple[str, str]]:
    """(Observation id, value as reported) for each serum IgM in a patient-view fixture."""
    body = load_fixture(f"patient-view/{scenario}")
    results = []
    for entry in body["prefetch"]["igm"].get("entry", []):
        resource = entry["resource"]
        quantity = resource.get("valueQuantity")
        if quantity:
            results.append((resource["id"], f"{quantity['value']} {quantity['unit']}"))
    return results


class Agent:
    """Follows redirects and keeps cookies the way a browser does on loopback.

    requests' cookie jar never sends a `Secure` cookie over http, while browsers treat
    127.0.0.1 as a secure context; the app's cookies are all Secure, so they are kept here.
    """

    def __init__(self) -> None:
        self.http = requests.Session()
        self.http.trust_env = False
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    def get(
        self, url: str, *, follow: bool = True, stop_at: str | None = None
    ) -> requests.Response:
        for _ in range(10):
            cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            response = self.http.get(
                url, headers={"Cookie": cookie} if cookie else {}, allow_redirects=False, timeout=20
            )
            for header in response.raw.headers.getlist("Set-Cookie"):
                self.set_cookie_headers.append(header)
                # By hand: http.cookies gives up on attributes it does not know (Partitioned).
                pair, *attributes = [part.strip() for part in header.split(";")]
                name, _, value = pair.partition("=")
                expired = any(a.lower() == "max-age=0" for a in attributes)
                if expired or not value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
            if not (follow and response.is_redirect):
                return response
            url = urljoin(url, response.headers["Location"])
            if stop_at and url.startswith(stop_at):
                response.url = url
                return response
            response.url = url
        raise AssertionError("too many redirects")


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent()
    yield a
    a.http.close()


@pytest.fixture
def ehr_policy(request: pytest.FixtureRequest) -> EhrPolicy:
    """The EHR's behaviour; a test changes it with `parametrize(..., indirect=True)`."""
    return getattr(request, "param", EhrPolicy())


@pytest.fixture
def ehr(ehr_policy: EhrPolicy) -> Iterator[SmartEhr]:
    with SmartEhr(ehr_policy) as server:
        server.load_fixture_requests([FIXTURES / "patient-view"])
        yield server


@pytest.fixture
def app_factory(tmp_path: Path, ehr: SmartEhr) -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def start(**sections: Any) -> LiveServer:
        sections.setdefault("fhir", {})
        sections["fhir"] = {
            "allowed_servers": (ehr.base_url,),
            "deadline_seconds": 5.0,
            "read_timeout_seconds": 5.0,
            "connect_timeout_seconds": 2.0,
            **sections["fhir"],
        }
        settings = test_settings(tmp_path, **sections)
        server = LiveServer(create_app(settings, clock=lambda: FIXTURE_NOW)).__enter__()
        started.append(server)
        ehr.app_url = f"{server.url}/app/launch"
        return server

    yield start
    for server in started:
        server.__exit__()


@pytest.fixture
def timeline_app(app_factory: Callable[..., LiveServer]) -> LiveServer:
    return app_factory()
