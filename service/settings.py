"""One typed settings object, loaded from a TOML file and FLARE_CDS_* environment variables.

Clinical thresholds live here so a site can tune them; unknown keys and impossible values are
refused at start-up, because a typo in a threshold must never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "FLARE_CDS_"
CONFIG_ENV = "FLARE_CDS_CONFIG"
# The folder relative storage paths are read against (else the config file's folder, else the
# working directory at start-up); not a setting of its own, so it is not a "data" section.
DATA_DIR_ENV = "FLARE_CDS_DATA_DIR"
DEFAULT_DATABASE = "var/flare-cds.sqlite3"
METRICS_ACCESS = ("off", "loopback", "token")


class SettingsError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class HttpSettings:
    max_body_bytes: int = 5 * 1024 * 1024
    cors_origins: tuple[str, ...] = ("*",)
    # From accept to the end of the request headers, and from there to the end of the body.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    # Open connections per worker; one more is answered 503 at once.
    max_connections: int = 1000


@dataclass(frozen=True)
class RulesSettings:
    igm_high_mg_dl: float = 4000.0
    igm_very_high_mg_dl: float = 5000.0
    viscosity_critical_cp: float = 4.0
    igm_lookback_days: int = 30
    viscosity_lookback_days: int = 30
    info_card_below_threshold: bool = True
    flare_rise_percent: float = 25.0
    flare_window_days: int = 120
    course_gap_days: int = 180
    baseline_max_age_days: int = 90
    btk_hold_window_days: int = 56
    btk_rebound_rise_percent: float = 25.0
    # IWWM-6: progression is a confirmed rise of more than 25% from the nadir.
    progression_rise_percent: float = 25.0


@dataclass(frozen=True)
class TerminologySettings:
    """Extra codes, each "system|code", added to the shipped value sets (local lab codes etc.),
    and extra names (`*_names`, matched as whole words in free text) for drugs and diagnoses."""

    igm_codes: tuple[str, ...] = ()
    viscosity_codes: tuple[str, ...] = ()
    wm_condition_codes: tuple[str, ...] = ()
    hyperviscosity_condition_codes: tuple[str, ...] = ()
    anti_cd20_codes: tuple[str, ...] = ()
    btk_inhibitor_codes: tuple[str, ...] = ()
    mgus_condition_codes: tuple[str, ...] = ()
    hyperviscosity_symptom_codes: tuple[str, ...] = ()
    plasma_exchange_codes: tuple[str, ...] = ()
    anti_cd20_names: tuple[str, ...] = ()
    btk_inhibitor_names: tuple[str, ...] = ()
    wm_condition_names: tuple[str, ...] = ()
    hyperviscosity_condition_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class FhirSettings:
    allowed_servers: tuple[str, ...] = ()
    connect_timeout_seconds: float = 0.25
    read_timeout_seconds: float = 0.4
    deadline_seconds: float = 0.45
    # Servers cap `_count` (often at 20-50): 20 pages let a chart of several hundred
    # Conditions through while still bounding a runaway server.
    max_pages: int = 20
    # Queries in flight to one FHIR server (origin) at a time, across all calls of a worker.
    pool_size: int = 32


@dataclass(frozen=True)
class IssuerSettings:
    iss: str
    jku: tuple[str, ...] = ()
    jwks_url: str | None = None
    jwks_file: str | None = None
    tenants: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuthSettings:
    required: bool = False
    public_base_url: str | None = None
    leeway_seconds: int = 30
    # exp - iat, and the age of iat, accepted at most (plus leeway); the spec recommends 5 min.
    max_token_lifetime_seconds: int = 300
    jwks_cache_seconds: int = 3600
    issuers: tuple[IssuerSettings, ...] = ()


@dataclass(frozen=True)
class StorageSettings:
    # sqlite:///relative/path, sqlite:////absolute/path or postgresql://user@host:port/db.
    # Unset: sqlite at `database` (the setting this one replaces, still accepted).
    url: str | None = None
    database: str = DEFAULT_DATABASE
    # Key for the keyed hash of patient ids; when unset, one is generated and kept in the store.
    patient_hash_key: str | None = None
    # Issued-card records the store could not take wait here, on this host, until it can.
    spool_directory: str = "var/issued-spool"
    pool_size: int = 4  # PostgreSQL connections per worker process
    timeout_seconds: float = 1.0  # longest wait for a PostgreSQL connection during a call


@dataclass(frozen=True)
class MetricsSettings:
    access: str = "loopback"  # off (404), loopback (127.0.0.1 / ::1 only) or token
    token: str | None = None  # the bearer token /metrics asks for when access = "token"


@dataclass(frozen=True)
class CardSettings:
    # Folder of card text files; unset means the project's own cards/ folder.
    directory: str | None = None
    source_label: str = "flare-cds: IgM flare guidance"
    source_url: str = "https://pubmed.ncbi.nlm.nih.gov/15493038/"


@dataclass(frozen=True)
class AppSettings:
    """The IgM timeline, a SMART on FHIR app under /app/ (see README, "The IgM timeline")."""

    client_id: str = "flare-cds"
    # Set: a confidential client (HTTP Basic at the token endpoint). Unset: a public client.
    client_secret: str | None = None
    # Who may frame the page (CSP frame-ancestors), e.g. the EHR's origin; empty: nobody.
    frame_ancestors: tuple[str, ...] = ()
    # FHIR bases that need no authorization (a public sandbox): cards link to the page directly.
    open_fhir_servers: tuple[str, ...] = ()
    launch_seconds: int = 600  # from launch to callback
    session_seconds: int = 3600  # at most; sooner when the access token expires sooner
    http_timeout_seconds: float = 5.0  # SMART discovery and the token exchange


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"


@dataclass(frozen=True)
class Settings:
    http: HttpSettings = field(default_factory=HttpSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    terminology: TerminologySettings = field(default_factory=TerminologySettings)
    fhir: FhirSettings = field(default_factory=FhirSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    cards: CardSettings = field(default_factory=CardSettings)
    app: AppSettings = field(default_factory=AppSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)

    def replace(self, **sections: Any) -> Settings:
        """A copy with whole sections, or {key: value} overrides, replaced (for tests and tools)."""
        updated = {}
        for name, value in sections.items():
            current = getattr(self, name)
            updated[name] = (
                dataclasses.replace(current, **value) if isinstance(value, Mapping) else value
            )
        return dataclasses.replace(self, **updated)


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults, then the TOML file (argument or FLARE_CDS_CONFIG), then FLARE_CDS_* variables."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        try:
            with Path(path).open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise SettingsError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    _merge_environment(data, environ)
    settings = _build(Settings, data, "")
    from service.settings_checks import check  # it needs the classes above

    check(settings)
    base = storage_base(path, environ)
    return settings.replace(storage=_resolved_storage(settings.storage, base))


def storage_base(
    config_path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Path:
    """What relative storage paths are read against: FLARE_CDS_DATA_DIR, else the config file's
    folder, else the working directory (all at start-up)."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(CONFIG_ENV)
    if environ.get(DATA_DIR_ENV):
        return Path(environ[DATA_DIR_ENV]).absolute()
    return Path(path).resolve().parent if path else Path.cwd()


def _resolved_storage(storage: StorageSettings, base: Path) -> StorageSettings:
    """Storage with every relative path made absolute against `base`, once, at start-up: the same
    file whatever folder a worker or a command runs in. `url` always set (sqlite:////abs/path)."""
    if storage.url and storage.database != DEFAULT_DATABASE:
        raise SettingsError("give storage.url or storage.database, not both")
    url = storage.url or f"sqlite:///{storage.database}"
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("sqlite", "postgresql", "postgres"):
        raise SettingsError(
            f"storage.url must start with sqlite:/// or postgresql://, not {url.split(':')[0]!r}"
        )
    database = storage.database
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise SettingsError("storage.url: write sqlite:///relative/path or sqlite:////abs/path")
        database = str(base / Path(rest[1:]).expanduser())
        url = f"sqlite:///{database}"
    spool = str(base / Path(storage.spool_directory).expanduser())
    return dataclasses.replace(storage, url=url, database=database, spool_directory=spool)


def _merge_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    sections = {f.name: f for f in fields(Settings)}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_ENV, DATA_DIR_ENV):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            raise SettingsError(f"unknown setting in environment: {name}")
        data.setdefault(section, {})[key] = raw


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise SettingsError(f"[{where}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"unknown setting(s) in [{where or 'top level'}]: {', '.join(unknown)}")
    values = {}
    for f in fields(cls):
        if f.name in data:
            key = f"{where}.{f.name}" if where else f.name
            values[f.name] = _coerce(hints[f.name], data[f.name], key)
    try:
        return cls(**values)
    except TypeError as exc:
        raise SettingsError(f"[{where}] is incomplete: {exc}") from exc


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "":
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is tuple:
        item = args[0]
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise SettingsError(f"{key} must be a list")
        return tuple(_coerce(item, v, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "0", "no", "off"}:
            return False
        raise SettingsError(f"{key} must be true or false, not {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise SettingsError(f"{key} must be a number, not {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{key} must be a number, not {value!r}") from exc
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise SettingsError(f"{key} must be a whole number, not {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise SettingsError(f"{key} must be a string")
        return value
    raise SettingsError(f"{key}: unsupported setting type {hint!r}")


def plain_http_key_urls(auth: AuthSettings) -> list[str]:
    """Key-set URLs on plain http (allowed only to loopback; start-up warns about each)."""
    from service.settings_checks import plain_http_key_urls as urls

    return urls(auth)
