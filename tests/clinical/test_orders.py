"""Recognising anti-CD20 orders in every shape a client may send."""

from __future__ import annotations

from typing import Any

import pytest

from service.clinical.name_screen import search_names
from service.clinical.orders import DraftOrderError, find_drug_orders
from service.clinical.terminology import (
    _name_pattern,
    _shipped,
    build_terminology,
    match_drug,
)
from service.settings import TerminologySettings

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
GROUPS = build_terminology(TerminologySettings()).anti_cd20


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


def med_request(med: dict[str, Any], rid: str = "mr1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        **med,
        **extra,
    }


R4_DOSE = {
    "dosageInstruction": [{"doseAndRate": [{"doseQuantity": {"value": 1, "code": "{pill}"}}]}]
}


def coded(code: str, system: str = RXNORM) -> dict[str, Any]:
    return {"medicationCodeableConcept": {"coding": [{"system": system, "code": code}]}}


@pytest.mark.parametrize(
    ("code", "drug"),
    [
        ("121191", "rituximab"),
        ("226754", "rituximab"),
        ("1657864", "rituximab"),
        ("2105824", "rituximab-abbs (Truxima)"),
        ("2105835", "rituximab-abbs (Truxima)"),
        ("2273510", "rituximab-pvvr (Ruxience)"),
        ("2472325", "rituximab-arrx (Riabni)"),
        ("2472336", "rituximab-arrx (Riabni)"),
        ("1927884", "rituximab/hyaluronidase SC (Rituxan Hycela)"),
        ("974779", "obinutuzumab"),
        ("712566", "ofatumumab"),
    ],
)
def test_rxnorm_codes(code: str, drug: str) -> None:
    [order] = find_drug_orders(bundle(med_request(coded(code))), GROUPS)
    assert order.drug == drug and order.reference == "MedicationRequest/mr1"


def test_atc_code() -> None:
    [order] = find_drug_orders(
        bundle(med_request(coded("L01FA01", "http://www.whocc.no/atc"))), GROUPS
    )
    # CLINICAL.md lists the ATC codes without marking them verified.
    assert order.drug == "rituximab" and order.matched_by == "ATC L01FA01 (code not verified)"


@pytest.mark.parametrize(
    ("code", "system", "label"),
    [
        ("712566", RXNORM, "RxNorm 712566 (code not verified)"),
        ("L01FA02", "http://www.whocc.no/atc", "ATC L01FA02 (code not verified)"),
        ("121191", RXNORM, "RxNorm 121191"),
        ("2472325", RXNORM, "RxNorm 2472325"),
    ],
)
def test_matched_by_says_when_the_code_is_not_verified(code: str, system: str, label: str) -> None:
    [order] = find_drug_orders(bundle(med_request(coded(code, system))), GROUPS)
    assert order.matched_by == label


def test_a_verified_code_is_named_before_an_unverified_one_of_the_same_drug() -> None:
    concept = {
        "coding": [
            {"system": "http://www.whocc.no/atc", "code": "L01FA01"},
            {"system": RXNORM, "code": "121191"},
        ]
    }
    [order] = find_drug_orders(bundle(med_request({"medicationCodeableConcept": concept})), GROUPS)
    assert order.matched_by == "RxNorm 121191"


def test_unverified_codes_come_from_the_value_set_flags() -> None:
    terminology = build_terminology(TerminologySettings())
    groups = {g.name: g for g in terminology.anti_cd20 + terminology.btk_inhibitors}
    assert groups["ofatumumab"].unverified == {
        (RXNORM, "712566"),
        ("http://www.whocc.no/atc", "L01FA02"),
    }
    assert groups["acalabrutinib"].unverified == {(RXNORM, "1986808")}
    assert groups["rituximab-abbs (Truxima)"].unverified == frozenset()
    with pytest.raises(AttributeError):
        groups["rituximab"].unverified = frozenset()  # type: ignore[misc]


def test_value_set_verified_flags_follow_the_clinical_brief() -> None:
    data = _shipped()
    verified = {
        (e["system"], e["code"])
        for key in ("igm", "viscosity", "wm_conditions", "hyperviscosity_conditions")
        for e in data[key]
        if e["verified"]
    }
    assert verified == {
        ("http://loinc.org", "2472-9"),
        ("http://hl7.org/fhir/sid/icd-10-cm", "C88.0"),
    }
    drug_codes = [
        c for key in ("anti_cd20", "btk_inhibitors") for g in data[key] for c in g["codes"]
    ]
    assert not any(c["verified"] for c in drug_codes if c["system"] == "http://www.whocc.no/atc")
    unverified_rxnorm = {
        c["code"] for c in drug_codes if c["system"] == RXNORM and not c["verified"]
    }
    assert unverified_rxnorm == {"712566", "1986808"}


@pytest.mark.parametrize(
    ("text", "drug"),
    [
        ("Rituximab 375 mg/m2 IV", "rituximab"),
        ("RITUXIMAB-ABBS infusion", "rituximab-abbs (Truxima)"),
        ("Truxima 500 mg", "rituximab-abbs (Truxima)"),
        ("Gazyva 1000 mg", "obinutuzumab"),
        ("rituximab-hyaluronidase 1400 mg SC", "rituximab/hyaluronidase SC (Rituxan Hycela)"),
        (
            "Rituximab and Hyaluronidase Human 1400 mg",
            "rituximab/hyaluronidase SC (Rituxan Hycela)",
        ),
        ("rituximab-xyzz 500 mg", "rituximab"),
        ("RITUXIMAB-XYZZ", "rituximab"),
        ("rituximab-pvvr 500 mg", "rituximab-pvvr (Ruxience)"),
        ("rituximab-arrx", "rituximab-arrx (Riabni)"),
    ],
)
def test_names_in_text(text: str, drug: str) -> None:
    [order] = find_drug_orders(
        bundle(med_request({"medicationCodeableConcept": {"text": text}})), GROUPS
    )
    assert order.drug == drug


@pytest.mark.parametrize(
    "text",
    [
        "Bendamustine 90 mg/m2",
        "rituximabfoo",
        "anti-rituximab antibody test",
        "anti-rituximab-xyzz antibody",
        "rituximab-xyz",
        "rituximab-xyzzy",
        "rituximab-xy1z",
    ],
)
def test_other_drugs_and_partial_words_do_not_match(text: str) -> None:
    orders = find_drug_orders(
        bundle(med_request({"medicationCodeableConcept": {"text": text}})), GROUPS
    )
    assert orders == []


# Characters a case-insensitive pattern matches to an ASCII letter without being one: the name
# screen in front of the patterns must let them through.
FOLDED_LOOKALIKES = {"i": ("\u0130", "\u0131"), "s": ("\u017f",), "k": ("\u212a",)}


def _lookalike_spellings(name: str) -> list[str]:
    spellings = [name.upper(), name.title(), name.swapcase()]
    for letter, lookalikes in FOLDED_LOOKALIKES.items():
        spellings += [name.replace(letter, other) for other in lookalikes if letter in name]
    return spellings


@pytest.mark.parametrize("drug", sorted({n for e in _shipped()["anti_cd20"] for n in e["names"]}))
def test_a_name_is_recognised_in_any_case_the_pattern_accepts(drug: str) -> None:
    # The whole-word pattern is the definition; the cheaper screen before it must never hide a
    # name the pattern would find, whatever the case or the Unicode look-alike letters.
    for spelling in _lookalike_spellings(drug):
        concept = {"text": f"{spelling} 375 mg/m2 IV"}
        by_pattern = [g.name for g in GROUPS if g.name_pattern.search(concept["text"])]
        found = match_drug(concept, GROUPS)
        assert by_pattern, spelling
        assert found is not None and found[0].name == by_pattern[0], spelling


def test_names_given_once_through_are_all_screened() -> None:
    # The pattern and the plain names read the same names: a one-pass iterable must serve both.
    pattern = _name_pattern((n for n in ["Gazyva", "obinutuzumab"]), iter(["rituximab"]))
    for text in ("GAZYVA 1000 mg", "Obinutuzumab", "rituximab-xyzz 500 mg"):
        assert search_names(pattern, text) is not None, text
    assert search_names(pattern, "bendamustine") is None


def test_a_site_name_outside_ascii_is_still_recognised() -> None:
    groups = build_terminology(TerminologySettings(anti_cd20_names=("Ritüximab-Ω",))).anti_cd20
    [order] = find_drug_orders(
        bundle(med_request({"medicationCodeableConcept": {"text": "RITÜXIMAB-Ω 500 mg"}})), groups
    )
    assert order.drug == "Ritüximab-Ω"


def test_bendamustine_is_not_anti_cd20() -> None:
    assert find_drug_orders(bundle(med_request(coded("134547"))), GROUPS) == []


def test_contained_medication() -> None:
    request = med_request(
        {"medicationReference": {"reference": "#m1"}},
        contained=[
            {
                "resourceType": "Medication",
                "id": "m1",
                "code": {"coding": [{"system": RXNORM, "code": "226754"}]},
            }
        ],
    )
    [order] = find_drug_orders(bundle(request), GROUPS)
    assert order.drug == "rituximab"


def test_medication_elsewhere_in_the_bundle_by_full_url() -> None:
    medication = {
        "resourceType": "Medication",
        "id": "m9",
        "code": {"coding": [{"system": RXNORM, "code": "2273510"}]},
    }
    request = med_request({"medicationReference": {"reference": "http://ehr/fhir/Medication/m9"}})
    [order] = find_drug_orders(bundle(request, medication), GROUPS)
    assert order.drug == "rituximab-pvvr (Ruxience)"


def test_r5_codeable_reference() -> None:
    request = med_request(
        {"medication": {"concept": {"coding": [{"system": RXNORM, "code": "121191"}]}}}
    )
    [order] = find_drug_orders(bundle(request), GROUPS)
    assert order.fhir_version == "R5"


def test_stu3_and_dstu2_shapes() -> None:
    stu3 = med_request(coded("121191"), requester={"agent": {"reference": "Practitioner/1"}})
    [order] = find_drug_orders(bundle(stu3), GROUPS)
    assert order.fhir_version == "STU3"
    dstu2 = {"resourceType": "MedicationOrder", "id": "mo1", "status": "draft", **coded("121191")}
    [order] = find_drug_orders(bundle(dstu2), GROUPS)
    assert order.fhir_version == "DSTU2" and order.reference == "MedicationOrder/mo1"


def test_an_unmarked_stu3_order_is_read_as_stu3() -> None:
    # The public sandbox's STU3 drafts carry no context, definition or requester.agent; R4 has
    # no dosageInstruction[].doseQuantity (it moved into doseAndRate), STU3 has.
    stu3 = med_request(
        coded("121191"),
        dosageInstruction=[
            {
                "text": "375 mg/m2 IV",
                "doseQuantity": {"value": 375, "unit": "mg/m2", "system": UCUM, "code": "mg/m2"},
            }
        ],
    )
    [order] = find_drug_orders(bundle(stu3), GROUPS)
    assert order.fhir_version == "STU3" and order.drug == "rituximab"


def test_an_order_valid_in_neither_r4_nor_stu3_reports_the_r4_problems() -> None:
    broken = med_request(
        coded("121191"),
        dosageInstruction=[{"doseQuantity": {"value": 375, "unit": "mg/m2"}}],
        status=7,
    )
    with pytest.raises(DraftOrderError) as caught:
        find_drug_orders(bundle(broken), GROUPS)
    assert caught.value.location == "context.draftOrders.entry[0]"
    # Only the field the rules read is named: the STU3-shaped dose alone would be tolerated.
    assert "FHIR R4" in caught.value.problem and "status" in caught.value.problem
    assert "doseQuantity" not in caught.value.problem


def test_selections_limit_the_orders() -> None:
    drafts = bundle(med_request(coded("121191"), "rtx"), med_request(coded("134547"), "benda"))
    assert find_drug_orders(drafts, GROUPS, ["MedicationRequest/benda"]) == []
    assert len(find_drug_orders(drafts, GROUPS, ["MedicationRequest/rtx"])) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("subject", "Patient/p1"), ("status", ["draft"]), ("intent", 3), ("id", "bad id!")],
)
def test_an_unreadable_field_the_rules_read_names_its_entry(field: str, value: Any) -> None:
    broken = med_request(coded("121191"), **{field: value})
    with pytest.raises(DraftOrderError) as caught:
        find_drug_orders(bundle(med_request(coded("134547"), "ok"), broken), GROUPS)
    assert caught.value.location == "context.draftOrders.entry[1]"
    assert "FHIR R4" in caught.value.problem and field in caught.value.problem


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        # The public sandbox's R4 drafts: STU3's single category (and reason) inside an order
        # whose R4-only doseAndRate makes it no valid STU3 either.
        ({"category": {"coding": [{"code": "community"}]}, **R4_DOSE}, "category"),
        ({"reasonCode": {"text": "Waldenström"}, **R4_DOSE}, "reasonCode"),
        ({"dosageInstruction": {"text": "not a list"}}, "dosageInstruction"),
        ({"extension": [{"url": "urn:x", "valueFoo": 1}]}, "extension[0].valueFoo"),
        ({"note": "free text where R4 wants Annotations"}, "note"),
        ({"statusReason": {"coding": [{"system": "urn:unknown", "code": 1}]}}, "statusReason"),
    ],
)
def test_a_deviation_in_a_field_not_read_is_tolerated_and_reported(
    extra: dict[str, Any], path: str
) -> None:
    [order] = find_drug_orders(bundle(med_request(coded("121191"), "rtx", **extra)), GROUPS)
    assert order.reference == "MedicationRequest/rtx"
    assert order.fhir_version == "R4"
    locations = [d.location for d in order.deviations]
    assert any(loc.startswith(f"context.draftOrders.entry[0].resource.{path}") for loc in locations)
    for deviation in order.deviations:
        assert deviation.problem  # says what is wrong...
        assert "Waldenström" not in deviation.problem and "free text" not in deviation.problem


def test_a_valid_order_has_no_deviations() -> None:
    [order] = find_drug_orders(bundle(med_request(coded("121191"))), GROUPS)
    assert order.deviations == ()


def test_a_missing_required_field_the_rules_can_do_without_is_a_deviation() -> None:
    request = med_request(coded("121191"), "rtx")
    del request["intent"]
    [order] = find_drug_orders(bundle(request), GROUPS)
    assert [d.location for d in order.deviations] == [
        "context.draftOrders.entry[0].resource.intent"
    ]


def test_an_order_for_another_patient_is_refused() -> None:
    request = med_request(coded("121191"), "rtx", subject={"reference": "Patient/someone-else"})
    with pytest.raises(DraftOrderError, match="another patient"):
        find_drug_orders(bundle(request), GROUPS, patient_id="p1")
    same = med_request(coded("121191"), "rtx", subject={"reference": "Patient/p1"})
    assert len(find_drug_orders(bundle(same), GROUPS, patient_id="p1")) == 1


@pytest.mark.parametrize(
    ("contained", "detail"),
    [
        ({"resourceType": "NoSuchResource", "id": "m1"}, "'NoSuchResource' is not a FHIR R4"),
        ({"resourceType": "", "id": "m1"}, "contained.0.resourceType"),
        ({"resourceType": 5, "id": "m1"}, "contained.0.resourceType: must be a string"),
        ({"resourceType": None, "id": "m1"}, "contained.0.resourceType: must be a string"),
        ({"resourceType": ["Medication"], "id": "m1"}, "must be a string"),
        ({"resourceType": {"a": 1}, "id": "m1"}, "must be a string"),
    ],
)
def test_a_contained_resource_of_unknown_type_is_a_tolerated_deviation(
    contained: dict[str, Any], detail: str
) -> None:
    odd = med_request(coded("121191"), "rtx", contained=[contained])
    [order] = find_drug_orders(bundle(med_request(coded("134547"), "benda"), odd), GROUPS)
    [deviation] = order.deviations
    assert deviation.location == "context.draftOrders.entry[1].resource.contained"
    assert detail in deviation.problem


@pytest.mark.parametrize(
    "draft",
    [
        {"resourceType": "MedicationOrder", "id": "x"},
        # What the public sandbox sends as soon as its order screen opens.
        {
            "resourceType": "MedicationRequest",
            "id": "request-123",
            "status": "draft",
            "subject": {"reference": "Patient/p1"},
            "authoredOn": "2026-11-20",
        },
        {"resourceType": "MedicationRequest", "id": "r", "medicationCodeableConcept": {}},
        {"resourceType": "MedicationRequest", "id": "r", "medicationReference": {}},
    ],
)
def test_an_order_with_no_medication_yet_is_no_drug_order(draft: dict[str, Any]) -> None:
    assert find_drug_orders(bundle(draft), GROUPS) == []


def test_site_configured_codes_are_recognised() -> None:
    groups = build_terminology(
        TerminologySettings(anti_cd20_codes=("urn:local:drugs|RTX1",))
    ).anti_cd20
    [order] = find_drug_orders(bundle(med_request(coded("RTX1", "urn:local:drugs"))), groups)
    assert "site-configured" in order.drug


def test_a_flaw_in_an_unrelated_order_does_not_block_the_warning() -> None:
    unrelated = med_request(coded("134547"), "benda", dosageInstruction={"text": "not a list"})
    [order] = find_drug_orders(bundle(unrelated, med_request(coded("121191"), "rtx")), GROUPS)
    assert order.reference == "MedicationRequest/rtx"


def test_an_unreadable_medication_is_a_400_not_no_risk() -> None:
    broken = med_request({"medicationCodeableConcept": "rituximab"})
    with pytest.raises(DraftOrderError, match="medicationCodeableConcept must be an object"):
        find_drug_orders(bundle(broken), GROUPS)


def test_the_indication_is_read_from_reason_code_reference_and_contained_condition() -> None:
    groups = build_terminology(TerminologySettings()).anti_cd20
    icd = "http://hl7.org/fhir/sid/icd-10-cm"
    draft = {
        "resourceType": "MedicationRequest",
        "id": "rtx",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"text": "rituximab 375 mg/m2"},
        "contained": [
            {
                "resourceType": "Condition",
                "id": "dx",
                "code": {"coding": [{"system": icd, "code": "C88.0"}]},
                "subject": {"reference": "Patient/p1"},
            }
        ],
        "reasonCode": [{"text": "Waldenström macroglobulinemia"}],
        "reasonReference": [
            {"reference": "#dx"},
            {"reference": "Condition/wm-1", "display": "WM"},
        ],
    }
    [order] = find_drug_orders({"entry": [{"resource": draft}]}, groups)
    assert order.status == "draft"
    assert {"text": "Waldenström macroglobulinemia"} in order.reasons
    assert {"coding": [{"system": icd, "code": "C88.0"}]} in order.reasons
    assert order.reason_references == ("Condition/wm-1",)


@pytest.mark.parametrize("field", ["status", "intent", "subject", "id"])
@pytest.mark.parametrize("other_deviation", [{}, {"category": {"coding": [{"code": "x"}]}}])
def test_a_null_read_field_is_read_as_absent_whatever_else_deviates(
    field: str, other_deviation: dict[str, Any]
) -> None:
    # Left out, these fields are tolerated; written as null they must be too, and the answer
    # must not depend on an unrelated deviation (which once turned the null into a 400).
    request = med_request(coded("121191"), "rtx", **R4_DOSE, **other_deviation)
    request[field] = None
    [order] = find_drug_orders(bundle(request), GROUPS)
    assert order.drug == "rituximab" and order.status in ("draft", "")


def test_a_null_medication_concept_beside_a_reference_still_names_the_drug() -> None:
    request = med_request(
        {"medicationCodeableConcept": None, "medicationReference": {"reference": "#m"}},
        "rtx",
        contained=[
            {
                "resourceType": "Medication",
                "id": "m",
                "code": coded("121191")["medicationCodeableConcept"],
            }
        ],
    )
    [order] = find_drug_orders(bundle(request), GROUPS)
    assert order.drug == "rituximab" and order.reference == "MedicationRequest/rtx"


def test_a_medication_that_is_neither_an_object_nor_null_is_still_refused() -> None:
    with pytest.raises(DraftOrderError, match="medicationCodeableConcept must be an object"):
        find_drug_orders(bundle(med_request({"medicationCodeableConcept": "rituximab"})), GROUPS)
