"""Gather the record for one hook call: prefetch first, the FHIR server for what is missing.

CDS Hooks 2.0: a prefetch value that is present is used; `null` means "no data" and is not
fetched again; an absent key or an OperationOutcome (a failed query) is fetched from
`fhirServer` with the given access token. What still cannot be had is a 412, never a silent
"no risk".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from service.clinical.fhir_values import UnreadableData, objects
from service.clinical.record import (
    RECORD_KEYS,
    PatientRecord,
    build_record,
    patient_test,
)
from service.record.definitions import ServiceDefinition, fill_template


@dataclass(frozen=True)
class MissingData:
    key: str
    query: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"key": self.key, "query": self.query, "reason": self.reason}


class DataUnavailable(Exception):
    """Required data could not be had from prefetch or the FHIR server (HTTP 412)."""

    def __init__(self, missing: list[MissingData]) -> None:
        super().__init__("; ".join(f"{m.key}: {m.reason}" for m in missing))
        self.missing = missing


class InvalidPrefetch(UnreadableData):
    """A prefetch value the client sent is not what its template asks for (HTTP 400)."""

    error = "invalid_prefetch"


class Fetcher(Protocol):
    def fetch_all(
        self, fhir_server: str, access_token: str | None, queries: Mapping[str, str]
    ) -> Mapping[str, Any]: ...


def _needs_fetch(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _has_next_page(bundle: Mapping[str, Any]) -> bool:
    return any(link.get("relation") == "next" for link in objects(bundle.get("link")))


def _check_value(key: str, value: Mapping[str, Any], patient_id: str, where: str) -> None:
    """Refuse a search result that is not a Bundle or that holds another patient's data."""
    if value.get("resourceType") != "Bundle":
        raise InvalidPrefetch(where, f"expected a FHIR Bundle, got {value.get('resourceType')!r}")
    # Checked here because the readers skip what they cannot iterate: an `entry` object would
    # otherwise read as "no results", i.e. a confident "no IgM on record".
    resources = []  # what bundle_resources reads from the entries, once they are checked
    for field in ("entry", "link"):
        items = value.get(field)
        if items is None:
            continue
        if not isinstance(items, list):
            raise InvalidPrefetch(f"{where}.{field}", "must be an array")
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidPrefetch(f"{where}.{field}[{index}]", "must be an object")
            if field == "entry" and "resource" in item:
                resource = item["resource"]
                _check_entry_resource(resource, where, index)
                resources.append(resource)
    expected = RECORD_KEYS[key][1]
    about_patient = patient_test(patient_id)  # made once for the whole Bundle
    for resource in resources:
        if resource.get("resourceType") != expected or about_patient(resource):
            continue
        raise InvalidPrefetch(
            where,
            f"{expected}/{resource.get('id')} is about another patient, not Patient/{patient_id}",
        )


def _check_entry_resource(resource: Any, bundle: str, index: int) -> None:
    """An entry's resource must be one: the readers skip what is not, and a result skipped for
    its shape would read as "no such result" (entries of other types, such as included
    Medications, are kept for what they are). Its location is made only to refuse it: this runs
    for every entry of every Bundle."""
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    if isinstance(kind, str) and kind:
        return
    where = f"{bundle}.entry[{index}].resource"
    if not isinstance(resource, dict):
        raise InvalidPrefetch(where, "must be a FHIR resource (an object)")
    raise InvalidPrefetch(f"{where}.resourceType", "must name the resource's type")


def _check_patient(value: Any, patient_id: str) -> None:
    """No rule reads the Patient, but one sent for another patient says the prefetch was
    gathered for the wrong chart: nothing in it can be trusted for this one."""
    if value is None or _needs_fetch(value):
        return
    if not isinstance(value, dict):
        raise InvalidPrefetch("prefetch.patient", "must be a FHIR resource or null")
    if value.get("resourceType") != "Patient":
        raise InvalidPrefetch(
            "prefetch.patient", f"expected a FHIR Patient, got {value.get('resourceType')!r}"
        )
    sent = value.get("id")
    if isinstance(sent, str) and sent and sent != patient_id:
        raise InvalidPrefetch(
            "prefetch.patient", f"Patient/{sent[:64]} is another patient, not Patient/{patient_id}"
        )


def gather_record(
    body: Mapping[str, Any], definition: ServiceDefinition, fetcher_factory: Any
) -> PatientRecord:
    """The record for this call; `fetcher_factory()` gives the FHIR fetcher, only if needed."""
    context = body["context"]
    patient_id = context["patientId"]
    prefetch = body.get("prefetch") or {}
    searches: dict[str, Mapping[str, Any] | None] = {}
    to_fetch: dict[str, str] = {}
    # Why each key must be fetched, so a 412 without fhirServer says what the client sent.
    lacking: dict[str, str] = {}
    for key, template in definition.prefetch.items():
        if key == "patient":
            _check_patient(prefetch.get(key), patient_id)
        if key not in RECORD_KEYS:
            continue  # `patient`: asked for, but no rule depends on it
        value = prefetch.get(key, ...)
        fetch_because = ""
        if value is None:
            searches[key] = None
        elif value is ...:
            fetch_because = "not in prefetch"
        elif _needs_fetch(value):
            fetch_because = "prefetch query failed (OperationOutcome)"
        elif isinstance(value, dict):
            _check_value(key, value, patient_id, f"prefetch.{key}")
            if _has_next_page(value):
                # Only part of the result came: fetch it whole rather than judge on a page.
                fetch_because = "prefetch holds only one page"
            else:
                searches[key] = value
        else:
            raise InvalidPrefetch(f"prefetch.{key}", "must be a FHIR resource or null")
        if fetch_because:
            # The query is filled in only for a key that must be fetched (most calls: none).
            to_fetch[key], lacking[key] = fill_template(template, context), fetch_because
    if to_fetch:
        searches.update(_fetch(body, to_fetch, lacking, patient_id, fetcher_factory))
    return build_record(patient_id, searches)


def _fetch(
    body: Mapping[str, Any],
    queries: dict[str, str],
    lacking: Mapping[str, str],
    patient_id: str,
    fetcher_factory: Any,
) -> dict[str, Mapping[str, Any]]:
    server = body.get("fhirServer")
    if not isinstance(server, str) or not server:
        raise DataUnavailable(
            [
                MissingData(k, q, f"{lacking[k]} and no fhirServer to fetch it from")
                for k, q in queries.items()
            ]
        )
    # Imported here so that an app serving only full prefetch never builds the HTTP pool.
    from service.record.fhir_client import FhirServerRefused

    auth = body.get("fhirAuthorization") or {}
    token = auth.get("access_token") if isinstance(auth, dict) else None
    fetcher = fetcher_factory()
    try:
        # fetch_all checks the server first; checking separately before it would cost a second
        # DNS lookup outside the deadline, and a refusal from either must be a 412.
        outcomes = fetcher.fetch_all(server, token, queries)
    except FhirServerRefused as exc:
        raise DataUnavailable(
            [MissingData(k, q, f"fhirServer refused: {exc.reason}") for k, q in queries.items()]
        ) from None
    missing: list[MissingData] = []
    results: dict[str, Mapping[str, Any]] = {}
    for key, query in queries.items():
        outcome = outcomes.get(key)
        if outcome is None or not outcome.ok or not isinstance(outcome.resource, dict):
            reason = outcome.error if outcome is not None and outcome.error else "no answer"
            missing.append(MissingData(key, query, reason))
            continue
        try:
            _check_value(key, outcome.resource, patient_id, f"fhirServer {key}")
        except InvalidPrefetch as exc:
            missing.append(MissingData(key, query, exc.problem))
            continue
        results[key] = outcome.resource
    if missing:
        raise DataUnavailable(missing)
    return results
