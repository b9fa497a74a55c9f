"""The [app] settings: defaults, the secret from the environment, and values refused at start."""

from __future__ import annotations

import pytest

from service.settings import SettingsError, load_settings


def test_defaults_are_a_public_client_with_no_framing_and_no_open_servers() -> None:
    app = load_settings(environ={}).app
    assert app.client_id == "flare-cds" and app.client_secret is None
    assert app.frame_ancestors == () and app.open_fhir_servers == ()


def test_secret_and_frame_ancestors_from_the_environment() -> None:
    app = load_settings(
        environ={
            "FLARE_CDS_APP_CLIENT_SECRET": "s3cret",
            "FLARE_CDS_APP_FRAME_ANCESTORS": "https://ehr.example.org, 'self'",
        }
    ).app
    assert app.client_secret == "s3cret"
    assert app.frame_ancestors == ("https://ehr.example.org", "'self'")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("FLARE_CDS_APP_CLIENT_ID", "", "app.client_id"),
        ("FLARE_CDS_APP_FRAME_ANCESTORS", "https://a.example;script-src", "app.frame_ancestors"),
        ("FLARE_CDS_APP_SESSION_SECONDS", "0", "app.session_seconds"),
        ("FLARE_CDS_APP_LAUNCH_SECONDS", "-5", "app.launch_seconds"),
        ("FLARE_CDS_APP_OPEN_FHIR_SERVERS", "ftp://x.example/fhir", "app.open_fhir_servers"),
    ],
)
def test_impossible_values_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ={key: value})
