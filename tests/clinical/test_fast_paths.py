"""The quicker readings of the hot paths give what the plain ones give, for any input."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.clinical.conditions import (
    ConditionFact,
    ConditionList,
    _status_code,
    concept_fact,
    is_current,
    recorded_time,
)
from service.clinical.name_screen import (
    _SCREEN_MEMO_CHARS,
    folded_for_screen,
    names_in,
    no_name_in_folded,
    plain_names,
    search_names,
)
from service.clinical.observations import (
    Reading,
    _parse_any_form,
    _resolve_unit,
    classify,
    parse_fhir_datetime,
)
from service.clinical.record import references_patient
from service.clinical.terminology import (
    _MATCH_MEMO_SIZE,
    ConditionSet,
    _match_drug,
    _screen,
    build_terminology,
    match_drug,
)
from service.record.gathering import InvalidPrefetch, _check_value
from service.settings import TerminologySettings

# The FHIR date grammar as one pattern, read as parse_fhir_datetime read it before it was split.
_ONE_PATTERN = re.compile(
    r"^(?P<year>\d{4})(-(?P<month>\d{2})(-(?P<day>\d{2})"
    r"(T(?P<time>\d{2}:\d{2}(:\d{2}(\.\d+)?)?)(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def _one_pattern_reading(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    match = _ONE_PATTERN.match(text)
    if not match:
        return None
    try:
        if match["time"] is None:
            day = int(match["day"] or 1)
            return datetime(int(match["year"]), int(match["month"] or 1), day, tzinfo=UTC)
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


_DATE_PIECES = st.lists(
    st.sampled_from([*"0123456789", "\u0662", "-", "T", ":", ".", "Z", "+", " ", "\n", "W"]),
    max_size=32,
).map("".join)
_DATE_TIMES = st.builds(
    lambda y, mo, d, h, mi, s, z: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}{s}{z}",
    st.integers(0, 9999),
    st.integers(0, 13),
    st.integers(0, 32),
    st.integers(0, 25),
    st.integers(0, 61),
    st.sampled_from(["", ":00", ":59", ":60", ":00.1", ":00.123456789"]),
    st.sampled_from(["", "Z", "+14:00", "-12:00", "+2:00", "+99:99"]),
)


@given(st.one_of(_DATE_PIECES, _DATE_TIMES, st.text(max_size=24)))
def test_dates_read_as_with_one_pattern(text: str) -> None:
    for candidate in (text, text[:4], text[:7], text[:10], f" {text}\n"):
        assert parse_fhir_datetime(candidate) == _one_pattern_reading(candidate)


def _same_reading(text: str) -> bool:
    quick, plain = parse_fhir_datetime(text), _parse_any_form(text)
    return quick == plain and (quick is None or quick.tzinfo is plain.tzinfo)


# The two shapes parse_fhir_datetime reads without its patterns.
_SHAPES = ("2023-10-11T09:10:00Z", "1999-12-31T23:59:59Z", "2025-05-15", "2024-02-29")


def test_the_common_shapes_read_as_every_form_is_read_for_any_one_character() -> None:
    characters = [chr(c) for c in range(0x800)] + ["\u0662", "\uff11", "\u3000", "\U0001d7d8"]
    for shape in _SHAPES:
        for at in range(len(shape)):
            for character in characters:
                assert _same_reading(shape[:at] + character + shape[at + 1 :])


@given(
    st.sampled_from(_SHAPES),
    st.lists(
        st.tuples(st.integers(0, 19), st.sampled_from([*"0159 +-:.TZ_\n", "\u0662"])),
        max_size=4,
    ),
)
def test_the_common_shapes_read_as_every_form_is_read_when_altered(
    shape: str, changes: list[tuple[int, str]]
) -> None:
    text = list(shape)
    for at, character in changes:
        text[at % len(text)] = character
    assert _same_reading("".join(text))


@given(st.one_of(_DATE_PIECES, _DATE_TIMES, st.text(max_size=24)))
def test_any_text_reads_as_every_form_is_read(text: str) -> None:
    assert _same_reading(text)


def test_a_reading_made_quickly_is_the_reading() -> None:
    values = ("o1", datetime(2026, 11, 15, tzinfo=UTC), 4.5, "g/L", ">", "final", 450.0, [], "igm")
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "effectiveDateTime": "2026-11-15",
        "valueQuantity": {"value": 4.5, "comparator": ">", "unit": "g/L"},
        "referenceRange": [],
    }
    (quick,), _ = classify([observation], "igm")
    plain = Reading(*values)
    # Every field, those left out of == too, holds what the constructor puts there.
    assert quick == plain
    for field in dataclasses.fields(Reading):
        assert getattr(quick, field.name) == getattr(plain, field.name), field.name
    assert quick.reference_high == plain.reference_high
    assert hash(quick) == hash(plain)


_TERMINOLOGY = build_terminology(TerminologySettings(anti_cd20_names=("Foo drug",)))
_NAMES = ("rituximab", "RITUXAN", "Rituximab-abbs", "ibrutinib", "apixaban", "foo drug")
# Characters that fold to ASCII letters, separators, a final sigma, a name that is not ASCII.
_ODD = ("\u0130", "\u017f", "\u212a", "\n", " ", "-", "x", "\u03a3", "Waldenstr\u00f6m")
_WORDS = st.sampled_from(_NAMES) | st.sampled_from(_ODD)


@given(st.lists(st.lists(_WORDS, max_size=4).map(" ".join), max_size=3))
def test_one_screen_of_joined_texts_never_rules_out_a_name(texts: list[str]) -> None:
    screens = [
        _screen(groups)[1] for groups in (_TERMINOLOGY.anti_cd20, _TERMINOLOGY.btk_inhibitors)
    ]
    assert all(plain_names(pattern) is not None for pattern in screens)
    for pattern in (*screens, _TERMINOLOGY.wm_conditions.name_pattern):
        if no_name_in_folded(pattern, folded_for_screen(texts)):
            assert not any(search_names(pattern, text) for text in texts)


@given(st.lists(_WORDS, max_size=6).map(" ".join), st.integers(0, 2 * _SCREEN_MEMO_CHARS))
def test_a_remembered_screen_answers_as_the_screen(text: str, padding: int) -> None:
    # Texts past the memo's length are screened directly; both ways, a second call (perhaps
    # remembered) answers as the first and as a test of every name.
    folded = ("x" * padding + " " + text).lower()
    names = _screen(_TERMINOLOGY.drug_groups)[2]
    assert names is not None
    expected = any(name in folded for name in names)
    assert names_in(names, folded) == names_in(names, folded) == expected


# Site-configured names and codes too, one not ASCII (no plain screen for its class).
_SITE_TERMINOLOGY = build_terminology(
    TerminologySettings(
        anti_cd20_names=("Foo drug",),
        btk_inhibitor_names=("Br\u00fcckenmab",),
        btk_inhibitor_codes=("urn:site|B1",),
    )
)
_DRUG_CODING = st.fixed_dictionaries(
    {},
    optional={
        "system": st.sampled_from(["http://www.nlm.nih.gov/research/umls/rxnorm", "urn:site"]),
        "code": st.sampled_from(["121191", "1442981", "1364430", "B1"]) | st.integers(),
        "display": st.lists(_WORDS | st.just("Br\u00fcckenmab"), max_size=3).map(" ".join),
    },
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "coding": st.lists(_DRUG_CODING | st.integers(), max_size=2),
            "text": st.lists(_WORDS | st.just("BR\u00dcCKENMAB"), max_size=3).map(" ".join),
        },
    )
)
def test_a_drug_of_either_class_is_found_by_the_screen_for_both(concept: dict[str, Any]) -> None:
    for terminology in (_TERMINOLOGY, _SITE_TERMINOLOGY):
        either = match_drug(concept, terminology.drug_groups) is not None
        by_class = [
            match_drug(concept, terminology.anti_cd20),
            match_drug(concept, terminology.btk_inhibitors),
        ]
        assert either == any(found is not None for found in by_class)


_CONCEPT = st.fixed_dictionaries(
    {},
    optional={
        "coding": st.lists(_DRUG_CODING | st.integers(), max_size=2) | st.just({"code": "121191"}),
        "text": st.lists(_WORDS | st.just("rituximab"), max_size=3).map(" ".join)
        | st.integers()
        | st.just(["rituximab"]),
    },
)


@given(st.lists(_CONCEPT, min_size=1, max_size=6))
def test_a_remembered_drug_match_answers_as_matching_anew(concepts: list[dict[str, Any]]) -> None:
    # Concepts that read alike share an answer, those that do not never do, whatever came
    # before; twice over, the second time from the memo.
    for terminology in (_TERMINOLOGY, _SITE_TERMINOLOGY):
        for groups in (terminology.anti_cd20, terminology.btk_inhibitors, terminology.drug_groups):
            for _ in range(2):
                for concept in concepts:
                    assert match_drug(concept, groups) == _match_drug(concept, groups)


def test_the_drug_memo_keeps_no_long_text_and_stays_bounded() -> None:
    groups = _TERMINOLOGY.anti_cd20
    memo = _screen(groups)[3]
    long_text = "rituximab " + "x" * 100_000
    before = len(memo)
    assert match_drug({"text": long_text}, groups) == _match_drug({"text": long_text}, groups)
    assert len(memo) == before  # answered, not remembered
    for n in range(_MATCH_MEMO_SIZE + 10):
        match_drug({"text": f"drug {n}"}, groups)
        assert len(memo) <= _MATCH_MEMO_SIZE
    assert match_drug({"text": "rituximab"}, groups) is not None


def _matching_one_by_one(
    conditions: list[Any], wanted: ConditionSet, now: datetime, in_remission: bool, since: Any
) -> tuple[ConditionFact, ...]:
    """matching_conditions as the composition of is_current, recorded_time and concept_fact."""
    facts = []
    for condition in conditions:
        if not is_current(condition, now, in_remission):
            continue
        recorded = recorded_time(condition)
        if since is not None and (recorded is None or recorded < since):
            continue
        fact = concept_fact(condition.get("code"), wanted, str(condition.get("id") or "(no id)"))
        if fact is not None:
            status = _status_code(condition.get("clinicalStatus"))
            facts.append(
                ConditionFact(fact.condition_id, fact.code, fact.display, status, recorded)
            )
    return tuple(facts)


_STATUS = st.sampled_from(["active", "remission", "resolved", "refuted", "entered-in-error"])
_STATUS_FIELD = st.one_of(
    _STATUS,
    st.none(),
    st.integers(),
    st.fixed_dictionaries({"coding": st.lists(st.fixed_dictionaries({"code": _STATUS}))}),
)
_DATE = st.sampled_from(["2026-11-19", "2026-12-01", "2020-01-01T00:00:00Z", "not a date"])
# Names of the value sets, with letters that fold to ASCII ones and text around them.
_CONDITION_WORDS = st.sampled_from(
    ["HYPERV\u0130SCOSITY", "Hyperviscosity", "Waldenstr\u00d6m macroglobulinemia", "IgM MGUS"]
) | st.sampled_from(_ODD)
_CODING = st.fixed_dictionaries(
    {},
    optional={
        "system": st.sampled_from(["http://hl7.org/fhir/sid/icd-10-cm", " urn:x"]) | st.none(),
        "code": st.sampled_from(["C88.0", "c880", "D47.2", "E11.9"]) | st.integers(),
        "display": st.sampled_from(["Waldenstr\u00f6m macroglobulinemia", "x", ""])
        | st.lists(_CONDITION_WORDS, max_size=3).map(" ".join)
        | st.none(),
    },
)
_CONDITION = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["a", ""]) | st.none(),
        "clinicalStatus": _STATUS_FIELD,
        "verificationStatus": _STATUS_FIELD,
        "abatementDateTime": _DATE,
        "onsetDateTime": _DATE,
        "recordedDate": _DATE,
        "code": st.fixed_dictionaries(
            {},
            optional={
                "coding": st.lists(_CODING | st.integers(), max_size=2) | st.integers(),
                "text": st.sampled_from(["hyperviscosity syndrome", "lymphoplasmacytic lymphoma"])
                | st.lists(_CONDITION_WORDS, max_size=3).map(" ".join)
                | st.none(),
            },
        )
        | st.integers(),
    },
)


@given(
    st.lists(_CONDITION, max_size=4),
    st.booleans(),
    st.sampled_from([None, datetime(2026, 11, 1, tzinfo=UTC)]),
)
def test_conditions_read_once_match_as_read_one_by_one(
    conditions: list[dict[str, Any]], in_remission: bool, since: datetime | None
) -> None:
    now = datetime(2026, 11, 20, tzinfo=UTC)
    read = ConditionList(conditions)
    for wanted in (
        _TERMINOLOGY.wm_conditions,
        _TERMINOLOGY.hyperviscosity_conditions,
        _TERMINOLOGY.mgus_conditions,
    ):
        expected = _matching_one_by_one(conditions, wanted, now, in_remission, since)
        assert read.matching(wanted, now, in_remission=in_remission, since=since) == expected


_REFERENCE = st.sampled_from(
    [
        *("Patient/p1", "Patient/p2", "Patient/", "Patient/p1/", "Patient/p/1", "p1"),
        *("urn:uuid:1", "Group/p1", "https://ehr.example/fhir/Patient/p1/_history/2"),
    ]
)


@given(
    st.fixed_dictionaries(
        {"resourceType": st.sampled_from(["Observation", "Condition"])},
        optional={
            "subject": st.fixed_dictionaries({"reference": _REFERENCE | st.integers()}),
            "patient": st.fixed_dictionaries({"reference": _REFERENCE}),
        },
    ),
    st.sampled_from(["p1", "p2", "", "p/1"]),
)
def test_a_bundle_is_refused_exactly_when_a_result_is_about_another_patient(
    resource: dict[str, Any], patient_id: str
) -> None:
    bundle = {"resourceType": "Bundle", "entry": [{"resource": resource}]}
    about_another = resource["resourceType"] == "Observation" and not references_patient(
        resource, patient_id
    )
    try:
        _check_value("igm", bundle, patient_id, "prefetch.igm")
    except InvalidPrefetch as refused:
        assert about_another and "is about another patient" in refused.problem
    else:
        assert not about_another


_UNITS = st.sampled_from(["mg/dL", "MG/DL", " mg/dl ", "g/L", "mg/L", "cP", "mPa.s", "{relative}"])


@given(_UNITS | st.just("") | st.text(max_size=6), _UNITS | st.just("") | st.text(max_size=6))
def test_a_remembered_unit_resolves_as_the_unit(code: str, unit: str) -> None:
    for kind in ("igm", "viscosity"):
        expected = _resolve_unit.__wrapped__(code, unit, kind)
        assert _resolve_unit(code, unit, kind) == _resolve_unit(code, unit, kind) == expected
