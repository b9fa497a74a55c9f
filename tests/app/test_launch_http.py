"""The SMART launch over real HTTP against the loopback EHR: what succeeds, and every way it must
fail (wrong state, wrong verifier, iss not allowed, expired session) with a clear page, nothing
fetched and nothing secret logged."""

from __future__ import annotations

import logging
import time
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest

from tests.app.conftest import Agent, igm_results
from tests.app.ehr_double import EhrPolicy, SmartEhr
from tests.conftest import LiveServer

FLARE = "flare-after-rituximab"


def _launch(agent: Agent, ehr: SmartEhr, patient: str = FLARE, context: str | None = None):
    return agent.get(ehr.launch_url(patient, context))


def _secrets_in_log(caplog: pytest.LogCaptureFixture, values: list[str]) -> list[str]:
    """Which of `values` any record at INFO or above holds (the level a deployment logs at)."""
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    return [v for v in values if v and v in text]


def test_ehr_launch_ends_on_the_page_with_every_igm_value(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    page = _launch(agent, ehr)
    assert page.status_code == 200, page.text
    assert urlsplit(page.url).path == "/app/timeline"
    assert urlsplit(page.url).query == ""  # no code, no state in the address bar
    for observation_id, reported in igm_results(FLARE):
        assert f"<td>{reported}</td>" in page.text
        assert f"Observation/{observation_id}" in page.text
    assert f"Patient/{FLARE}" in page.text
    assert "Observation/igm-2026-10-08" in page.text
    assert "<script" not in page.text.lower()
    [token] = ehr.tokens
    assert token not in page.text
    assert ehr.refusals == []
    assert {"/fhir/Observation", "/fhir/Condition", "/fhir/MedicationRequest"} <= set(
        ehr.fhir_requests()
    )
    # Cookies that work inside an EHR frame, and hold no token.
    session_cookies = [h for h in agent.set_cookie_headers if h.startswith("flare_session=")]
    assert session_cookies
    for header in session_cookies:
        lowered = header.lower()
        for flag in ("secure", "httponly", "samesite=none", "partitioned", "path=/app/"):
            assert flag in lowered, header
        assert token not in header
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert "frame-ancestors 'none'" in policy
    assert _secrets_in_log(caplog, [token, FLARE, agent.cookies["flare_session"]]) == []


def test_authorize_request_carries_pkce_state_aud_launch_and_scopes(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    first = agent.get(ehr.launch_url(FLARE), follow=False)
    assert first.status_code == 302
    target = urlsplit(first.headers["Location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == ehr.authorize_url
    params = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert params["response_type"] == "code"
    assert params["client_id"] == "flare-cds"
    assert params["redirect_uri"] == f"{timeline_app.url}/app/callback"
    assert params["aud"] == ehr.base_url
    assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) == 43
    assert len(params["state"]) >= 40 and params["launch"]
    scopes = params["scope"].split()
    assert {"launch", "openid", "fhirUser"} <= set(scopes)
    for kind in (
        "Patient",
        "Observation",
        "Condition",
        "MedicationRequest",
        "MedicationAdministration",
        "Procedure",
    ):
        assert f"patient/{kind}.rs" in scopes


@pytest.mark.parametrize(
    "ehr_policy", [EhrPolicy(standalone_patient="btk-hold-rebound")], indirect=True
)
def test_standalone_launch_asks_for_launch_patient(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    page = agent.get(f"{timeline_app.url}/app/launch?" + urlencode({"iss": ehr.base_url}))
    assert page.status_code == 200, page.text
    assert "Patient/btk-hold-rebound" in page.text
    # Opened with no iss at all, it launches at the one EHR configured.
    again = Agent().get(f"{timeline_app.url}/app/launch")
    assert again.status_code == 200, again.text
    assert "Patient/btk-hold-rebound" in again.text
    assert ehr.refusals == []


def test_aud_is_the_iss_exactly_as_the_ehr_sent_it(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    spelled = ehr.base_url + "/"
    first = agent.get(
        f"{timeline_app.url}/app/launch?" + urlencode({"iss": spelled, "launch": "x"}),
        follow=False,
    )
    assert first.status_code == 302
    assert parse_qs(urlsplit(first.headers["Location"]).query)["aud"] == [spelled]


@pytest.mark.parametrize("ehr_policy", [EhrPolicy(client_secret="s3cret-value")], indirect=True)
def test_confidential_client_authenticates_with_its_secret(
    agent: Agent, ehr: SmartEhr, app_factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app_factory(app={"client_secret": "s3cret-value"})
    page = _launch(agent, ehr)
    assert page.status_code == 200, page.text
    assert _secrets_in_log(caplog, ["s3cret-value"]) == []


@pytest.mark.parametrize("ehr_policy", [EhrPolicy(client_secret="s3cret-value")], indirect=True)
def test_public_client_refused_by_a_confidential_ehr_gets_an_error_page(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    page = _launch(agent, ehr)
    assert page.status_code == 401
    assert "refused the token request" in page.text
    assert ehr.fhir_requests() == []


def _callback_url(agent: Agent, ehr: SmartEhr, app: LiveServer) -> str:
    """Run the launch up to the EHR's redirect back to the app, and return that address."""
    answer = agent.get(ehr.launch_url(FLARE), stop_at=f"{app.url}/app/callback")
    return answer.url


def test_wrong_state_is_refused_and_nothing_is_fetched(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    callback = urlsplit(_callback_url(agent, ehr, timeline_app))
    params = {k: v[0] for k, v in parse_qs(callback.query).items()}
    forged = urlunsplit(callback._replace(query=urlencode({**params, "state": "x" * 43})))
    page = agent.get(forged)
    assert page.status_code == 400
    assert "This sign-in cannot be completed" in page.text
    assert ehr.tokens == {} and ehr.fhir_requests() == []
    assert _secrets_in_log(caplog, [params["code"], params["state"]]) == []


def test_state_from_another_browser_is_refused(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    callback = _callback_url(agent, ehr, timeline_app)
    other = Agent()
    page = other.get(callback)  # the right state, but not the browser that started the launch
    assert page.status_code == 400
    assert ehr.tokens == {} and ehr.fhir_requests() == []
    again = agent.get(callback)  # and the state is used up by that attempt
    assert again.status_code == 400


def test_wrong_verifier_is_refused_by_the_ehr_and_nothing_is_fetched(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    first = agent.get(ehr.launch_url(FLARE), follow=False)
    target = urlsplit(first.headers["Location"])
    params = {k: v[0] for k, v in parse_qs(target.query).items()}
    # The EHR sees another challenge than the app's, so the app's verifier cannot match it.
    params["code_challenge"] = "A" * 43
    page = agent.get(urlunsplit(target._replace(query=urlencode(params))))
    assert page.status_code == 401
    assert "refused the token request" in page.text and "invalid_grant" in page.text
    assert ehr.refusals == ["token: invalid_grant: code_verifier"]
    assert ehr.tokens == {} and ehr.fhir_requests() == []


def test_iss_not_on_the_allow_list_is_refused_before_any_request(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    other = SmartEhr().start()
    try:
        page = agent.get(
            f"{timeline_app.url}/app/launch?" + urlencode({"iss": other.base_url, "launch": "x"})
        )
        assert page.status_code == 403
        assert "not an allowed FHIR server" in page.text
        assert other.requests == [] and ehr.requests == []
    finally:
        other.stop()


def test_no_allow_list_means_no_launch(agent: Agent, ehr: SmartEhr, app_factory) -> None:
    app = app_factory(fhir={"allowed_servers": ()})
    page = agent.get(f"{app.url}/app/launch?" + urlencode({"iss": ehr.base_url, "launch": "x"}))
    assert page.status_code == 403
    assert "fhir.allowed_servers" in page.text
    assert ehr.requests == []


@pytest.mark.parametrize("ehr_policy", [EhrPolicy(expires_in=1)], indirect=True)
def test_expired_session_shows_an_error_and_fetches_nothing(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    page = _launch(agent, ehr)
    assert page.status_code == 200
    fetched = len(ehr.fhir_requests())
    time.sleep(1.2)
    again = agent.get(f"{timeline_app.url}/app/timeline")
    assert again.status_code == 401
    assert "has ended" in again.text
    assert len(ehr.fhir_requests()) == fetched


def test_no_session_cookie_is_an_error_page(agent: Agent, timeline_app: LiveServer) -> None:
    page = agent.get(f"{timeline_app.url}/app/timeline")
    assert page.status_code == 401
    assert page.headers["Content-Type"].startswith("text/html")


def test_frame_ancestors_come_from_the_settings(agent: Agent, ehr: SmartEhr, app_factory) -> None:
    app = app_factory(app={"frame_ancestors": (ehr.origin, "'self'")})
    page = _launch(agent, ehr)
    assert page.status_code == 200
    assert f"frame-ancestors {ehr.origin} 'self'" in page.headers["Content-Security-Policy"]
    assert app.url


def test_order_card_link_shows_the_order_hooks_reading_word_for_word(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer, tmp_path
) -> None:
    from service import create_app
    from tests.conftest import FIXTURE_NOW, load_fixture, post_hook, test_settings

    body = load_fixture("order-sign/wm-igm-4500-rituximab")
    client = create_app(test_settings(tmp_path / "hooks"), clock=lambda: FIXTURE_NOW).test_client()
    [card] = post_hook(client, body).get_json()["cards"]
    # Once signed, the EHR holds the order the card was about, next to the patient's data.
    ehr.add_resources(v for v in body["prefetch"].values() if v)
    ehr.add_resources([body["context"]["draftOrders"]])
    link = card["links"][0]
    page = agent.get(ehr.launch_url(body["context"]["patientId"], link["appContext"]))
    assert page.status_code == 200, page.text
    assert f'data-finding="{card["source"]["topic"]["code"]}"' in page.text
    assert f'<p class="card-summary">{card["summary"]}</p>' in page.text
    assert "the card you came from" in page.text


def test_an_ehr_that_cannot_be_reached_is_a_clear_424(agent: Agent, app_factory) -> None:
    app = app_factory(fhir={"allowed_servers": ("http://127.0.0.1:9/fhir",)})
    page = agent.get(f"{app.url}/app/launch?" + urlencode({"iss": "http://127.0.0.1:9/fhir"}))
    assert page.status_code == 424
    assert "could not be reached (discovery)" in page.text


def test_data_the_ehr_will_not_give_is_named_on_the_page_not_shown_as_no_risk(
    agent: Agent, ehr: SmartEhr, timeline_app: LiveServer
) -> None:
    ehr.fail_status = {"Observation": 500}
    page = _launch(agent, ehr)
    assert page.status_code == 424
    assert "igm: FHIR server answered 500" in page.text
    assert "no IgM flare" not in page.text
