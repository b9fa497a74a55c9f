"""Settings: TOML file, environment, and refusal of anything that could silently change a rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, load_settings, plain_http_key_urls


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flare-cds.toml"
    path.write_text(text, "utf-8")
    return path


def test_defaults_are_the_clinical_brief() -> None:
    rules = load_settings(environ={}).rules
    assert (rules.igm_high_mg_dl, rules.igm_very_high_mg_dl, rules.viscosity_critical_cp) == (
        4000.0,
        5000.0,
        4.0,
    )
    assert rules.igm_lookback_days == 30 and rules.flare_rise_percent == 25.0
    assert load_settings(environ={}).auth.required is False


def test_toml_file_and_environment_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[rules]\nigm_high_mg_dl = 3500\n[fhir]\nallowed_servers = ["https://fhir.example.org"]\n',
    )
    settings = load_settings(path, environ={"FLARE_CDS_RULES_IGM_LOOKBACK_DAYS": "45"})
    assert settings.rules.igm_high_mg_dl == 3500.0
    assert settings.rules.igm_lookback_days == 45
    assert settings.fhir.allowed_servers == ("https://fhir.example.org",)


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[rules]\nflare_window_days = 90\n")
    assert load_settings(environ={"FLARE_CDS_CONFIG": str(path)}).rules.flare_window_days == 90


def test_environment_lists_and_booleans() -> None:
    settings = load_settings(
        environ={
            "FLARE_CDS_HTTP_CORS_ORIGINS": "https://a.example, https://b.example",
            "FLARE_CDS_RULES_INFO_CARD_BELOW_THRESHOLD": "false",
        }
    )
    assert settings.http.cors_origins == ("https://a.example", "https://b.example")
    assert settings.rules.info_card_below_threshold is False


def test_auth_issuers_from_toml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[auth]
required = true
public_base_url = "https://cds.example.org"
[[auth.issuers]]
iss = "https://sandbox.cds-hooks.org"
jku = ["https://sandbox.cds-hooks.org/.well-known/jwks.json"]
tenants = ["t1"]
""",
    )
    auth = load_settings(path, environ={}).auth
    assert auth.required and auth.issuers[0].iss == "https://sandbox.cds-hooks.org"
    assert auth.issuers[0].tenants == ("t1",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[rules]\nigm_hihg_mg_dl = 3000\n", "unknown setting"),
        ("[rulez]\n", "unknown setting"),
        ("[rules]\nigm_high_mg_dl = -1\n", "greater than zero"),
        ("[rules]\nigm_high_mg_dl = 'high'\n", "must be a number"),
        ("[rules]\nigm_very_high_mg_dl = 3000\n", "must not be below"),
        ("[rules]\nigm_lookback_days = 30.5\n", "whole number"),
        ("[rules]\ninfo_card_below_threshold = 'maybe'\n", "true or false"),
        ("[terminology]\nigm_codes = ['2472-9']\n", "system|code"),
        ("[auth]\nrequired = true\n", "no [[auth.issuers]]"),
        ("[[auth.issuers]]\niss = 'x'\n", "jku, jwks_url or jwks_file"),
        ("[logging]\nlevel = 'LOUD'\n", "not a log level"),
        ("[[auth.issuers]]\niss = 'x'\njku = ['http://keys.example.org/jwks']\n", "must be https"),
        ("[[auth.issuers]]\niss = 'x'\njwks_url = 'http://10.0.0.5/jwks'\n", "must be https"),
        ("[[auth.issuers]]\niss = 'x'\njwks_url = 'ftp://keys.example.org/jwks'\n", "https"),
        ("[auth]\nmax_token_lifetime_seconds = 0\n", "greater than zero"),
        ("[http]\nheader_timeout_seconds = 0\n", "greater than zero"),
        ("[http]\nmax_connections = -1\n", "greater than zero"),
        ("not toml at all [", "not valid TOML"),
    ],
)
def test_bad_configuration_is_refused_with_a_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(SettingsError, match=message.replace("[", r"\[").replace("|", r"\|")):
        load_settings(write(tmp_path, text), environ={})


def test_unknown_environment_variable_is_refused() -> None:
    with pytest.raises(SettingsError, match="FLARE_CDS_RULE_X"):
        load_settings(environ={"FLARE_CDS_RULE_X": "1"})


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_replace_keeps_other_values() -> None:
    settings = Settings().replace(rules={"igm_high_mg_dl": 3000.0})
    assert settings.rules.igm_high_mg_dl == 3000.0 and settings.rules.igm_lookback_days == 30


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_thresholds_are_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="greater than zero"):
        load_settings(environ={"FLARE_CDS_RULES_IGM_HIGH_MG_DL": value})


def test_readme_site_codes_example_loads(tmp_path: Path) -> None:
    """The example of site-added codes and names in the README is a working configuration."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text("utf-8")
    section = readme.split("### Site codes (example)", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "site.toml"
    path.write_text(example, "utf-8")
    settings = load_settings(path, environ={})
    assert "http://www.whocc.no/atc|L04AG08" in settings.terminology.anti_cd20_codes
    from service.clinical.terminology import build_terminology, match_drug

    terms = build_terminology(settings.terminology)
    assert match_drug({"text": "RTX-local 700 mg"}, terms.anti_cd20)[0].name == "RTX-local"
    atc = {"coding": [{"system": "http://www.whocc.no/atc", "code": "L04AG08"}]}
    assert match_drug(atc, terms.anti_cd20) is not None


def test_plain_http_key_urls_only_to_loopback_and_named_for_a_warning(tmp_path: Path) -> None:
    text = """
[[auth.issuers]]
iss = "https://a.example.org"
jku = ["http://127.0.0.1:8123/jwks.json", "https://a.example.org/jwks.json"]
[[auth.issuers]]
iss = "https://b.example.org"
jwks_url = "http://[::1]:8124/jwks.json"
[[auth.issuers]]
iss = "https://c.example.org"
jwks_url = "http://localhost:8125/jwks.json"
"""
    auth = load_settings(write(tmp_path, text), environ={}).auth
    assert plain_http_key_urls(auth) == [
        "http://127.0.0.1:8123/jwks.json",
        "http://[::1]:8124/jwks.json",
        "http://localhost:8125/jwks.json",
    ]


# -- storage location (resolved once, at start-up) -----------------------------------------


def test_relative_storage_paths_are_read_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, '[storage]\nurl = "sqlite:///data/cds.sqlite3"\n')
    storage = load_settings(path, environ={}).storage
    assert storage.database == str(tmp_path / "data" / "cds.sqlite3")
    assert storage.url == f"sqlite:///{tmp_path / 'data' / 'cds.sqlite3'}"
    assert storage.spool_directory == str(tmp_path / "var" / "issued-spool")


def test_the_legacy_database_setting_still_works_and_resolves_the_same_way(tmp_path: Path) -> None:
    path = write(tmp_path, '[storage]\ndatabase = "old/flare.sqlite3"\n')
    storage = load_settings(path, environ={}).storage
    assert storage.database == str(tmp_path / "old" / "flare.sqlite3")
    assert storage.url == f"sqlite:///{storage.database}"


def test_a_data_dir_wins_over_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    data = tmp_path / "elsewhere"
    storage = load_settings(path, environ={"FLARE_CDS_DATA_DIR": str(data)}).storage
    assert storage.database == str(data / "var" / "flare-cds.sqlite3")


def test_without_a_config_file_the_start_folder_is_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).storage.database == str(tmp_path / "var/flare-cds.sqlite3")


def test_absolute_sqlite_and_postgresql_urls_are_kept(tmp_path: Path) -> None:
    absolute = load_settings(environ={"FLARE_CDS_STORAGE_URL": f"sqlite:///{tmp_path}/x.db"})
    assert absolute.storage.database == f"{tmp_path}/x.db"
    url = "postgresql://flare@db.example.org:5432/flare"
    assert load_settings(environ={"FLARE_CDS_STORAGE_URL": url}).storage.url == url


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('url = "mysql://x/y"', "must start with sqlite:/// or postgresql://"),
        ('url = "sqlite://relative.db"', "sqlite:///relative/path"),
        ('url = "sqlite:///a.db"\ndatabase = "b.db"', "not both"),
        ("pool_size = 0", "storage.pool_size must be greater than zero"),
    ],
)
def test_unusable_storage_settings_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(problem)):
        load_settings(write(tmp_path, f"[storage]\n{text}\n"), environ={})


def test_metrics_access_is_checked(tmp_path: Path) -> None:
    assert load_settings(environ={}).metrics.access == "loopback"
    with pytest.raises(SettingsError, match=re.escape("metrics.access must be one of")):
        load_settings(environ={"FLARE_CDS_METRICS_ACCESS": "public"})
    with pytest.raises(SettingsError, match=re.escape("metrics.token is not set")):
        load_settings(environ={"FLARE_CDS_METRICS_ACCESS": "token"})
    env = {"FLARE_CDS_METRICS_ACCESS": "token", "FLARE_CDS_METRICS_TOKEN": "t0ken"}
    assert load_settings(environ=env).metrics.token == "t0ken"


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        # A negative leeway refuses a 60-second token as expired the moment it is made.
        ("FLARE_CDS_AUTH_LEEWAY_SECONDS", "-100", "auth.leeway_seconds must not be negative"),
        ("FLARE_CDS_AUTH_JWKS_CACHE_SECONDS", "-1", "auth.jwks_cache_seconds must be greater"),
        ("FLARE_CDS_AUTH_JWKS_CACHE_SECONDS", "0", "auth.jwks_cache_seconds must be greater"),
    ],
)
def test_impossible_token_check_timings_are_refused(
    variable: str, value: str, problem: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(problem)):
        load_settings(environ={variable: value})


def test_no_leeway_at_all_is_allowed() -> None:
    assert load_settings(environ={"FLARE_CDS_AUTH_LEEWAY_SECONDS": "0"}).auth.leeway_seconds == 0
