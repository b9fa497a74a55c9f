"""Every card links to the timeline, and the page reads the same finding and summary as the card.

Smart links name the launch URL and a small appContext; a hook call without fhirAuthorization
whose fhirServer is a listed open server gets an absolute link straight to the page, and that
page refuses any iss not on the list."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from service import create_app
from tests.app.conftest import Agent
from tests.conftest import (
    FIXTURE_NOW,
    LiveServer,
    assert_conforms,
    load_fixture,
    post_hook,
    test_settings,
)
from tests.fhir_test_server import FhirTestServer

BASE = "https://cds.example.org"
LINKED = [
    ("patient-view/flare-after-rituximab", "flare"),
    ("patient-view/btk-hold-rebound", "btk-rebound"),
    ("patient-view/flare-with-hyperviscosity", "flare-hyperviscosity"),
    ("order-sign/wm-igm-4500-rituximab", "igm-high"),
    ("order-select/wm-rituximab-selected", None),
]


@pytest.mark.parametrize(("fixture", "finding"), LINKED)
def test_every_card_carries_a_smart_link_to_the_launch_url(tmp_path, fixture, finding) -> None:
    app = create_app(
        test_settings(tmp_path, auth={"public_base_url": BASE}), clock=lambda: FIXTURE_NOW
    )
    response = post_hook(app.test_client(), load_fixture(fixture))
    assert response.status_code == 200
    answer = response.get_json()
    assert_conforms(answer, "CdsResponse")
    assert answer["cards"]
    for card in answer["cards"]:
        [link] = card["links"]
        assert link["label"] == "IgM timeline"
        assert link["type"] == "smart"
        assert link["url"] == f"{BASE}/app/launch"
        context = json.loads(link["appContext"])
        assert context == {"finding": card["source"]["topic"]["code"], "card": card["uuid"]}
        if finding:
            assert context["finding"] == finding


def test_open_fhir_server_without_authorization_gets_an_absolute_link(tmp_path) -> None:
    open_server = "https://launch.example.org/v/r4/fhir"
    settings = test_settings(
        tmp_path, auth={"public_base_url": BASE}, app={"open_fhir_servers": (open_server,)}
    )
    client = create_app(settings, clock=lambda: FIXTURE_NOW).test_client()
    body = {**load_fixture("patient-view/flare-after-rituximab"), "fhirServer": open_server}
    [card] = post_hook(client, body).get_json()["cards"]
    [link] = card["links"]
    assert link["type"] == "absolute" and "appContext" not in link
    url = urlsplit(link["url"])
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{BASE}/app/timeline"
    assert parse_qs(url.query) == {
        "iss": [open_server],
        "patient": ["flare-after-rituximab"],
        "finding": [card["source"]["topic"]["code"]],
    }
    # With an access token the same server is not "open": the link is a SMART launch.
    authorized = {
        **body,
        "fhirAuthorization": {
            "access_token": "t",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.rs",
            "subject": "cds",
        },
    }
    [card] = post_hook(client, authorized).get_json()["cards"]
    assert card["links"][0]["type"] == "smart"
    # An unlisted server, no token: still a SMART link (the page would refuse it).
    other = {**body, "fhirServer": "https://other.example.org/fhir"}
    [card] = post_hook(client, other).get_json()["cards"]
    assert card["links"][0]["type"] == "smart"


def _open_server_app(tmp_path: Any, fhir: FhirTestServer, fixture: str) -> tuple[Any, Any]:
    """An app that links to `fhir` as an open server holding the fixture's data, and the body."""
    body = load_fixture(fixture)
    fhir.add_resources(v for v in body["prefetch"].values() if v)
    settings = test_settings(
        tmp_path,
        app={"open_fhir_servers": (fhir.base_url,)},
        fhir={"deadline_seconds": 5.0, "read_timeout_seconds": 5.0},
    )
    return create_app(settings, clock=lambda: FIXTURE_NOW), body


def test_open_server_page_reads_the_same_summary_as_the_card(tmp_path, agent: Agent) -> None:
    with FhirTestServer() as fhir:
        app, body = _open_server_app(tmp_path, fhir, "patient-view/flare-after-rituximab")
        [card] = post_hook(app.test_client(), body).get_json()["cards"]
        with LiveServer(app) as server:
            query = urlencode({"iss": fhir.base_url, "patient": "flare-after-rituximab"})
            page = agent.get(f"{server.url}/app/timeline?{query}")
            assert page.status_code == 200, page.text
            assert f'<p class="card-summary">{card["summary"]}</p>' in page.text
            assert fhir.requests and all(r.authorization is None for r in fhir.requests)
            fhir.clear_requests()
            refused = agent.get(
                f"{server.url}/app/timeline?"
                + urlencode({"iss": "http://127.0.0.1:9/fhir", "patient": "x"})
            )
            assert refused.status_code == 403
            assert "not an allowed FHIR server" in refused.text
            assert fhir.requests == []


def test_an_order_cards_absolute_link_opens_on_that_cards_reading(tmp_path, agent: Agent) -> None:
    # Without the finding in the link, the page showed only the patient-view rules ("no flare,
    # no card due") under a warning the clinician had just been given.
    with FhirTestServer() as fhir:
        app, body = _open_server_app(tmp_path, fhir, "order-sign/wm-igm-4500-rituximab")
        [card] = post_hook(app.test_client(), {**body, "fhirServer": fhir.base_url}).get_json()[
            "cards"
        ]
        assert card["indicator"] == "warning"
        [link] = card["links"]
        assert link["type"] == "absolute"
        with LiveServer(app) as server:
            page = agent.get(
                server.url + urlsplit(link["url"]).path + "?" + urlsplit(link["url"]).query
            )
            assert page.status_code == 200, page.text
            # The draft order is not on record yet, so the order reading cannot be recomputed:
            # the page says so, as it does after a SMART launch from the same card.
            assert "The card came from an order hook" in page.text
            unlinked = urlencode({"iss": fhir.base_url, "patient": "wm-igm-4500"})
            plain = agent.get(f"{server.url}/app/timeline?{unlinked}")
            assert plain.status_code == 200 and "The card came from an order hook" not in plain.text
            # A finding the link makes up is ignored, never echoed.
            forged = urlencode({"iss": fhir.base_url, "patient": "wm-igm-4500", "finding": "<b>x"})
            odd = agent.get(f"{server.url}/app/timeline?{forged}")
            assert odd.status_code == 200 and "<b>x" not in odd.text


def test_absolute_links_are_off_by_default(tmp_path, agent: Agent) -> None:
    app = create_app(test_settings(tmp_path), clock=lambda: FIXTURE_NOW)
    with LiveServer(app) as server:
        query = urlencode({"iss": "http://127.0.0.1:9/fhir", "patient": "x"})
        page = agent.get(f"{server.url}/app/timeline?{query}")
        assert page.status_code == 403
        assert "not enabled" in page.text


def test_without_a_public_base_url_the_link_follows_the_host_called(tmp_path) -> None:
    # Each call's link is built from the scheme, Host and mount point of that call, so two
    # names for one service (behind two proxies) each get links to themselves.
    app = create_app(test_settings(tmp_path), clock=lambda: FIXTURE_NOW)
    client = app.test_client()
    body = load_fixture("order-sign/wm-igm-4500-rituximab")
    seen = []
    for base, mount in (
        ("http://cds-a.example.org", ""),
        ("https://cds-b.example.org:8443", ""),
        ("http://cds-a.example.org", "/flare"),
        ("http://cds-a.example.org", ""),
    ):
        response = client.post(
            "/cds-services/rituximab-flare-order-sign",
            json=body,
            base_url=base + mount,
        )
        assert response.status_code == 200, response.get_data(as_text=True)[:300]
        [link] = response.get_json()["cards"][0]["links"]
        seen.append(link["url"])
    assert seen == [
        "http://cds-a.example.org/app/launch",
        "https://cds-b.example.org:8443/app/launch",
        "http://cds-a.example.org/flare/app/launch",
        "http://cds-a.example.org/app/launch",
    ]
