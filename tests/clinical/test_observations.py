"""Unit conversion and date reading, including property-style tests of the IgM factors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.clinical.observations import classify, parse_fhir_datetime
from service.clinical.terminology import concept_matches, normalise_code

UCUM = "http://unitsofmeasure.org"
FACTORS = {"mg/dL": 1.0, "g/L": 100.0, "mg/L": 0.1, "g/dL": 1000.0}


def obs(
    value: Any, unit: str | None = None, code: str | None = None, **extra: Any
) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": value}
    if unit is not None:
        quantity["unit"] = unit
    if code is not None:
        quantity.update(system=UCUM, code=code)
    return {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "effectiveDateTime": "2026-11-15",
        "valueQuantity": quantity,
        **extra,
    }


@given(
    mg_dl=st.floats(min_value=1, max_value=20000, allow_nan=False),
    unit=st.sampled_from(sorted(FACTORS)),
)
def test_every_unit_round_trips_to_mg_dl(mg_dl: float, unit: str) -> None:
    value = mg_dl / FACTORS[unit]
    [reading], unusable = classify([obs(value, unit, unit)], "igm")
    assert not unusable
    assert reading.normalised == pytest.approx(mg_dl, rel=1e-9)


@given(
    value=st.floats(min_value=0.01, max_value=1e5, allow_nan=False),
    unit=st.sampled_from(sorted(FACTORS)),
)
def test_conversion_is_monotonic_and_unit_consistent(value: float, unit: str) -> None:
    [low], _ = classify([obs(value, unit, unit)], "igm")
    [high], _ = classify([obs(value * 2, unit, unit)], "igm")
    assert high.normalised == pytest.approx(2 * low.normalised)


@given(
    unit=st.text(min_size=1, max_size=8).filter(
        lambda u: u.strip().lower() not in {k.lower() for k in FACTORS}
    )
)
def test_any_other_unit_is_never_guessed(unit: str) -> None:
    readings, unusable = classify([obs(5.0, unit, unit)], "igm")
    assert readings == [] and len(unusable) == 1


@pytest.mark.parametrize("unit", ["mg/dl", "MG/DL", "g/l", " g/L "])
def test_unit_strings_without_ucum_code_are_read_case_insensitively(unit: str) -> None:
    [reading], _ = classify([obs(1.0, unit)], "igm")
    assert reading.normalised > 0


def test_missing_unit_is_not_usable() -> None:
    readings, [unusable] = classify([obs(4000)], "igm")
    assert readings == [] and unusable.reason == "no unit given"


def test_unit_and_code_that_disagree_are_not_usable() -> None:
    _, [unusable] = classify([obs(45, "mg/dL", "g/L")], "igm")
    assert "disagree" in unusable.reason


def test_ucum_code_decides_over_a_unit_label() -> None:
    [reading], _ = classify([obs(45, "grams per litre", "g/L")], "igm")
    assert reading.normalised == 4500


def test_non_numeric_value_is_unusable_with_a_reason() -> None:
    resource = obs(1)
    del resource["valueQuantity"]
    resource["valueString"] = "> 6000"
    _, [unusable] = classify([resource], "igm")
    assert unusable.reason == "no numeric value"


def test_boolean_is_not_a_number() -> None:
    _, [unusable] = classify([obs(True, "mg/dL", "mg/dL")], "igm")
    assert unusable.reason == "not a number"


def test_viscosity_accepts_cp_and_relative_units() -> None:
    readings, unusable = classify(
        [obs(4.0, "cP", "cP"), obs(3.1, "mPa.s", "mPa.s"), obs(2.0, "1", "1")], "viscosity"
    )
    assert [r.normalised for r in readings] == [4.0, 3.1, 2.0] or len(readings) == 3
    assert not unusable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-15", datetime(2026, 11, 15, tzinfo=UTC)),
        ("2026-11", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-11-15T10:30:00Z", datetime(2026, 11, 15, 10, 30, tzinfo=UTC)),
        ("2026-11-15T10:30:00+02:00", datetime(2026, 11, 15, 8, 30, tzinfo=UTC)),
        ("2026-11-15T10:30:00.123Z", datetime(2026, 11, 15, 10, 30, 0, 123000, tzinfo=UTC)),
        # Beyond microseconds the digits are dropped, never the result.
        (
            "2026-11-15T10:30:00.123456789Z",
            datetime(2026, 11, 15, 10, 30, 0, 123456, tzinfo=UTC),
        ),
        ("2026-11-15T10:30:00-05:00", datetime(2026, 11, 15, 15, 30, tzinfo=UTC)),
        ("2026-11-15T10:30:00", datetime(2026, 11, 15, 10, 30, tzinfo=UTC)),  # no zone: UTC
        (" 2026-11-15T10:30Z ", datetime(2026, 11, 15, 10, 30, tzinfo=UTC)),
    ],
)
def test_fhir_dates(text: str, expected: datetime) -> None:
    assert parse_fhir_datetime(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-13-01",
        "2026-02-30",
        "2026-11-15T24:00:00Z",
        "2026-11-15T10:30:00+2:00",
        "20261115T103000Z",
        "15/11/2026",
        None,
        20261115,
    ],
)
def test_bad_dates_are_none(text: Any) -> None:
    assert parse_fhir_datetime(text) is None


def test_effective_period_and_issued_are_used() -> None:
    period = obs(100, "mg/dL", "mg/dL")
    del period["effectiveDateTime"]
    period["effectivePeriod"] = {"start": "2026-11-01", "end": "2026-11-02"}
    issued = obs(200, "mg/dL", "mg/dL", id="o2")
    del issued["effectiveDateTime"]
    issued["issued"] = "2026-11-03T08:00:00Z"
    readings, _ = classify([issued, period], "igm")
    assert [r.normalised for r in readings] == [100, 200]


ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
CODED = frozenset({(ICD10, "C880"), (LOINC, "2472-9")})


@given(
    st.lists(
        st.tuples(
            st.sampled_from([ICD10, LOINC, f" {ICD10}", "urn:other", 7]),
            st.sampled_from(["C88.0", "c880", " C880 ", "C880", "2472-9", " 2472-9", "C88.1"])
            | st.none(),
        ),
        max_size=4,
    )
)
def test_a_coding_matches_as_sent_or_normalised(pairs: list[tuple[Any, Any]]) -> None:
    concept = {"coding": [{"system": s, "code": c} for s, c in pairs]}
    normalised = [
        normalise_code(s, c) for s, c in pairs if isinstance(s, str) and isinstance(c, str)
    ]
    assert concept_matches(concept, CODED) == any(p in CODED for p in normalised)


def test_a_result_is_checked_against_its_codes_however_they_are_written() -> None:
    igm = frozenset({(LOINC, "2472-9")})
    written = obs(4200, code="mg/dL")
    for code in ("2472-9", " 2472-9 "):
        written["code"] = {"coding": [{"system": LOINC, "code": code}]}
        readings, unusable = classify([written], "igm", igm)
        assert [r.normalised for r in readings] == [4200.0] and not unusable
    written["code"] = {"coding": [{"system": LOINC, "code": "2465-3"}]}  # IgG
    readings, unusable = classify([written], "igm", igm)
    assert not readings and [u.reason for u in unusable] == ["not a serum IgM code"]
