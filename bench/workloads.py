"""The benchmark's hook requests: real fixtures, enlarged to a long-treated patient's record.

A fixture holds 3-4 IgM results; a patient followed for years has dozens, and the cost of a call
grows with them, so each fixture is enlarged to 60 IgM Observations, 10 Conditions and 30
MedicationRequests of realistic R4 JSON. New data is added *before* the fixture's own, and
older values stay below the fixture's, so the fixture's expected card is still the right answer
(the bench checks it before loading the service). Dates are then moved to today, because the
server runs on the real clock.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bench import ROOT
from tests.fixture_dates import FIXTURE_NOW, as_of_today

FIXTURES = ROOT / "fhir_fixtures" / "hook_requests"
# Every fixture is dated against this instant (fhir_fixtures/README.md, tests/conftest.py).
ORDER_SIGN = "rituximab-flare-order-sign"
PATIENT_VIEW = "igm-flare-patient-view"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
FHIR_BASE = "http://example.org/fhir"

# Co-morbidities of an older WM patient; none is a WM, paraprotein or hyperviscosity code, so
# they add parsing work without changing the finding.
OTHER_CONDITIONS = (
    ("I10", "Essential (primary) hypertension"),
    ("E11.9", "Type 2 diabetes mellitus without complications"),
    ("E78.5", "Hyperlipidemia, unspecified"),
    ("I48.91", "Unspecified atrial fibrillation"),
    ("N18.30", "Chronic kidney disease, stage 3 unspecified"),
    ("D64.9", "Anemia, unspecified"),
    ("G62.9", "Polyneuropathy, unspecified"),
    ("K21.9", "Gastro-esophageal reflux disease without esophagitis"),
    ("M17.11", "Unilateral primary osteoarthritis, right knee"),
)
# Past and current prescriptions (RxNorm ingredients); no anti-CD20 antibody, no BTK inhibitor,
# so the patient-view course start and the order-sign decision are unchanged.
OTHER_DRUGS = (
    ("29046", "lisinopril", "10 mg oral daily"),
    ("6809", "metformin", "500 mg oral twice daily"),
    ("83367", "atorvastatin", "20 mg oral daily"),
    ("17767", "amlodipine", "5 mg oral daily"),
    ("281", "acyclovir", "400 mg oral twice daily"),
    ("519", "allopurinol", "300 mg oral daily"),
    ("7646", "omeprazole", "20 mg oral daily"),
    ("1364430", "apixaban", "5 mg oral twice daily"),
    ("4603", "furosemide", "20 mg oral daily"),
    ("25480", "gabapentin", "300 mg oral three times daily"),
    ("10582", "levothyroxine", "50 mcg oral daily"),
    ("26225", "ondansetron", "8 mg oral as needed"),
    ("8640", "prednisone", "20 mg oral daily"),
    ("2418", "cholecalciferol", "1000 units oral daily"),
    ("4511", "folic acid", "1 mg oral daily"),
)


@dataclass(frozen=True)
class Workload:
    """One benchmarked request and the card it must produce (checked before any load)."""

    name: str
    title: str
    service_id: str
    body: dict[str, Any]
    indicator: str
    finding: str
    uses_fhir_server: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/cds-services/{self.service_id}"

    def body_bytes(self) -> bytes:
        return json.dumps(self.body).encode("utf-8")


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    url = f"{FHIR_BASE}/{resource['resourceType']}/{resource['id']}"
    return {"fullUrl": url, "resource": resource, "search": {"mode": "match"}}


def _searchset(patient_id: str, query: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries),
        "link": [{"relation": "self", "url": f"{FHIR_BASE}/{query}"}],
        "entry": entries,
    }


def _older_observations(
    bundle: dict[str, Any], count: int, spacing_days: int, low: float, high: float, digits: int
) -> None:
    """Add `count` results before the bundle's oldest, rising from `low` (oldest) to `high`."""
    entries = bundle["entry"]
    template = entries[0]["resource"]
    prefix = template["id"].rsplit("-", 3)[0]  # "igm-2026-08-14" -> "igm"
    oldest = min(_parse(e["resource"]["effectiveDateTime"]) for e in entries)
    wiggle = random.Random(f"{prefix}-{count}")  # deterministic, but not a straight line
    for k in range(1, count + 1):
        when = oldest - timedelta(days=spacing_days * k)
        value = high - (high - low) * (k - 1) / max(count - 1, 1)
        value *= 1 + wiggle.uniform(-0.03, 0.0)  # only down: never above the fixture's values
        resource = copy.deepcopy(template)
        resource["id"] = f"{prefix}-{when:%Y-%m-%d}"
        resource["effectiveDateTime"] = _iso(when)
        resource["issued"] = _iso(when + timedelta(hours=4))
        resource["valueQuantity"]["value"] = round(value, digits) if digits else round(value)
        entries.append(_entry(resource))


def _conditions(bundle: dict[str, Any], total: int) -> None:
    template = bundle["entry"][0]["resource"]
    patient = template["subject"]["reference"].split("/")[-1]
    for number, (code, display) in enumerate(OTHER_CONDITIONS[: total - len(bundle["entry"])]):
        resource = copy.deepcopy(template)
        resource["id"] = f"{patient}-{code.lower().replace('.', '')}"
        resource["code"] = {
            "coding": [{"system": ICD10, "code": code, "display": display}],
            "text": display,
        }
        onset = FIXTURE_NOW - timedelta(days=400 + 170 * number)
        resource["onsetDateTime"] = resource["recordedDate"] = onset.date().isoformat()
        if number % 4 == 3:  # some problems are resolved, as on a real problem list
            resource["clinicalStatus"]["coding"][0].update(code="resolved", display="Resolved")
            resource["abatementDateTime"] = (onset + timedelta(days=120)).date().isoformat()
        bundle["entry"].append(_entry(resource))


def _medication_requests(
    template: dict[str, Any], existing: list[dict[str, Any]], total: int
) -> list[dict[str, Any]]:
    """`total` MedicationRequests: the existing ones and older or current oral prescriptions."""
    entries = list(existing)
    for number in range(total - len(existing)):
        code, name, dose = OTHER_DRUGS[number % len(OTHER_DRUGS)]
        current = number < len(OTHER_DRUGS) // 2  # the rest are past courses
        start = FIXTURE_NOW - timedelta(days=60 + 55 * number)
        resource = copy.deepcopy(template)
        resource.pop("meta", None)
        resource["id"] = f"{name.replace(' ', '-')}-{start:%Y-%m-%d}"
        resource["status"] = "active" if current else ("completed", "stopped")[number % 2]
        resource["intent"] = "order"
        resource["medicationCodeableConcept"] = {
            "coding": [{"system": RXNORM, "code": code, "display": name}],
            "text": f"{name} {dose}",
        }
        resource["authoredOn"] = _iso(start)
        dosage = resource["dosageInstruction"][0]
        dosage["text"] = dose
        period = {"start": start.date().isoformat()}
        if not current:
            period["end"] = (start + timedelta(days=90)).date().isoformat()
        dosage["timing"] = {
            "repeat": {"boundsPeriod": period, "frequency": 1, "period": 1, "periodUnit": "d"}
        }
        dosage["route"]["coding"][0].update(code="26643006", display="Oral route")
        quantity = dosage["doseAndRate"][0]["doseQuantity"]
        quantity.update(value=float(dose.split()[0]), unit="mg", code="mg")
        entries.append(_entry(resource))
    return entries


def enlarge(
    body: dict[str, Any],
    *,
    older_igm: tuple[float, float],
    igm_scale: float = 1.0,
    igm: int = 60,
    viscosity: int = 10,
    conditions: int = 10,
    medication_requests: int = 30,
) -> dict[str, Any]:
    """A copy of a fixture request with its record grown to the given sizes (fixture dates)."""
    body = copy.deepcopy(body)
    prefetch = body["prefetch"]
    patient_id = body["context"]["patientId"]
    _older_observations(prefetch["igm"], igm - len(prefetch["igm"]["entry"]), 30, *older_igm, 0)
    for entry in prefetch["igm"]["entry"]:
        quantity = entry["resource"]["valueQuantity"]
        quantity["value"] = round(quantity["value"] * igm_scale)
    _older_observations(
        prefetch["viscosity"], viscosity - len(prefetch["viscosity"]["entry"]), 90, 1.9, 2.6, 1
    )
    _conditions(prefetch["conditions"], conditions)
    existing = prefetch.get("medicationRequests", {}).get("entry", [])
    template = (
        existing[0]["resource"]
        if existing
        else body["context"]["draftOrders"]["entry"][0]["resource"]
    )
    # A long medication history (mostly other drugs) that the treatment history must read past.
    prefetch["medicationRequests"] = _searchset(
        patient_id,
        f"MedicationRequest?patient={patient_id}",
        _medication_requests(template, existing, medication_requests),
    )
    shuffle = random.Random(patient_id)  # fixtures are deliberately not newest-first either
    for value in prefetch.values():
        if value.get("resourceType") == "Bundle" and value.get("entry"):
            shuffle.shuffle(value["entry"])
            value["total"] = len(value["entry"])
    return body


def order_sign(high: bool, now: datetime | None = None) -> dict[str, Any]:
    fixture = load_fixture("order-sign/wm-igm-4500-rituximab")
    # HIGH keeps the fixture's 4500 mg/dL; LOW scales every IgM result to 55% (2475 mg/dL).
    body = enlarge(fixture, older_igm=(1500, 3300), igm_scale=1.0 if high else 0.55)
    return as_of_today(body, now)


def patient_view_flare(now: datetime | None = None) -> dict[str, Any]:
    fixture = load_fixture("patient-view/flare-after-rituximab")
    # Older results stay under the 3000 mg/dL baseline of 2026-09-01, which stays the baseline.
    return as_of_today(enlarge(fixture, older_igm=(1400, 2900)), now)


def without_prefetch(body: dict[str, Any], fhir_base_url: str) -> dict[str, Any]:
    """The same call with no prefetch: the service must query `fhirServer` for everything."""
    stripped = {k: v for k, v in body.items() if k != "prefetch"}
    return {**stripped, "fhirServer": fhir_base_url}


def build_workloads(fhir_base_url: str, names: list[str] | None = None) -> list[Workload]:
    high = order_sign(high=True)
    workloads = [
        Workload(
            "order-sign-high",
            "order-sign, full prefetch, HIGH risk (IgM 4500 mg/dL)",
            ORDER_SIGN,
            high,
            "warning",
            "igm-high",
        ),
        Workload(
            "order-sign-low",
            "order-sign, full prefetch, LOW risk (IgM 2475 mg/dL)",
            ORDER_SIGN,
            order_sign(high=False),
            "info",
            "igm-below-threshold",
        ),
        Workload(
            "patient-view-flare",
            "patient-view, full prefetch, flare after rituximab",
            PATIENT_VIEW,
            patient_view_flare(),
            "info",
            "flare",
        ),
        Workload(
            "order-sign-no-prefetch",
            "order-sign, no prefetch, FHIR server adds 50 ms per query (HIGH risk)",
            ORDER_SIGN,
            without_prefetch(high, fhir_base_url),
            "warning",
            "igm-high",
            uses_fhir_server=True,
        ),
    ]
    if names:
        unknown = sorted(set(names) - {w.name for w in workloads})
        if unknown:
            raise ValueError(f"unknown workload(s): {', '.join(unknown)}")
        workloads = [w for w in workloads if w.name in names]
    return workloads


def fhir_server_resources() -> list[dict[str, Any]]:
    """What the loopback FHIR server holds for the no-prefetch workload: the HIGH record."""
    return [v for v in order_sign(high=True)["prefetch"].values() if isinstance(v, dict)]


def record_sizes(body: dict[str, Any]) -> dict[str, int]:
    """Entries per prefetch Bundle, for the report."""
    return {
        key: len(value.get("entry", []))
        for key, value in (body.get("prefetch") or {}).items()
        if isinstance(value, dict) and value.get("resourceType") == "Bundle"
    }
