"""A re-sent draft order is answered from the worker's memo of model checks, with the same
version, deviations and errors as a first check, and nothing of the order kept."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from service.clinical import order_model
from service.clinical.checked_orders import CheckMemo, CheckOutcome
from service.clinical.orders import DraftOrderError, find_drug_orders
from service.clinical.terminology import build_terminology
from service.settings import TerminologySettings
from tests.clinical.test_orders import bundle, med_request

GROUPS = build_terminology(TerminologySettings()).anti_cd20
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def order(rid: str = "rtx", **extra: Any) -> dict[str, Any]:
    medication = {
        "coding": [{"system": RXNORM, "code": "121191"}],
        "text": "rituximab 375 mg/m2 for Waldenström",
    }
    return med_request({"medicationCodeableConcept": medication}, rid, **extra)


@pytest.fixture
def model_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A fresh memo, and the versions the FHIR models were asked to check, in order."""
    monkeypatch.setattr(order_model, "CHECKED", CheckMemo(size=3))
    asked: list[str] = []
    real = order_model._problems

    def counting(resource: Any, version: str) -> Any:
        asked.append(version)
        return real(resource, version)

    monkeypatch.setattr(order_model, "_problems", counting)
    yield asked


def test_a_re_sent_order_is_not_checked_again_and_reads_the_same(model_checks: list[str]) -> None:
    # An R4 order (doseAndRate is no STU3) with a deviation in a field no rule reads: STU3's
    # single category, as the public sandbox sends it.
    dose = [{"doseAndRate": [{"doseQuantity": {"value": 1, "code": "{pill}"}}]}]
    sent = order(category={"coding": [{"code": "community"}]}, dosageInstruction=dose)
    [first] = find_drug_orders(bundle(sent), GROUPS)
    checks = len(model_checks)
    assert checks >= 1 and first.deviations
    # order-select again, now with another order before it: same order, another entry.
    [again] = find_drug_orders(bundle(order("benda", medicationCodeableConcept={}), sent), GROUPS)
    assert len(model_checks) == checks  # answered from the memo
    assert again.fhir_version == first.fhir_version == "R4"
    assert [d.problem for d in again.deviations] == [d.problem for d in first.deviations]
    assert [d.location for d in again.deviations] == [
        d.location.replace("entry[0]", "entry[1]") for d in first.deviations
    ]


def test_an_order_read_as_stu3_is_read_as_stu3_again(model_checks: list[str]) -> None:
    stu3 = order(dosageInstruction=[{"doseQuantity": {"value": 375, "unit": "mg/m2"}}])
    assert find_drug_orders(bundle(stu3), GROUPS)[0].fhir_version == "STU3"
    assert model_checks == ["R4", "STU3"]
    assert find_drug_orders(bundle(stu3), GROUPS)[0].fhir_version == "STU3"
    assert model_checks == ["R4", "STU3"]


def test_an_unreadable_order_is_refused_each_time_with_its_own_entry(
    model_checks: list[str],
) -> None:
    broken = order(status=["draft"])
    with pytest.raises(DraftOrderError) as first:
        find_drug_orders(bundle(broken), GROUPS)
    with pytest.raises(DraftOrderError) as second:
        find_drug_orders(bundle(order("ok", medicationCodeableConcept={}), broken), GROUPS)
    assert first.value.location == "context.draftOrders.entry[0]"
    assert second.value.location == "context.draftOrders.entry[1]"
    assert first.value.problem == second.value.problem and "status" in first.value.problem
    assert model_checks.count("R4") == 1


def test_any_change_to_the_order_is_checked_anew(model_checks: list[str]) -> None:
    sent = order()
    find_drug_orders(bundle(sent), GROUPS)
    changed = copy.deepcopy(sent)
    changed["status"] = 7  # now unreadable: a memo keyed on anything less would miss this
    with pytest.raises(DraftOrderError):
        find_drug_orders(bundle(changed), GROUPS)
    # The same fields in another order are another text: checked, not guessed equal.
    reordered = dict(reversed(list(sent.items())))
    find_drug_orders(bundle(reordered), GROUPS)
    assert model_checks == ["R4", "R4", "STU3", "R4"]  # the broken one was tried as STU3 too


def test_an_order_that_cannot_be_serialised_again_is_still_checked(
    model_checks: list[str],
) -> None:
    huge = order(dosageInstruction=[{"sequence": 2**70}])  # beyond 64 bits: no digest
    for _ in range(2):
        [found] = find_drug_orders(bundle(huge), GROUPS)
        assert found.deviations  # sequence is out of range for FHIR's integer
    assert model_checks == ["R4", "STU3", "R4", "STU3"]
    assert len(order_model.CHECKED) == 0


def test_the_memo_is_bounded_and_keeps_the_most_recently_used(model_checks: list[str]) -> None:
    orders = [order(f"rtx-{n}") for n in range(4)]
    for sent in orders[:3]:
        find_drug_orders(bundle(sent), GROUPS)
    find_drug_orders(bundle(orders[0]), GROUPS)  # used again: now the newest
    find_drug_orders(bundle(orders[3]), GROUPS)  # evicts rtx-1, the least recently used
    assert len(order_model.CHECKED) == 3
    before = len(model_checks)
    find_drug_orders(bundle(orders[0]), GROUPS)
    assert len(model_checks) == before
    find_drug_orders(bundle(orders[1]), GROUPS)
    assert len(model_checks) == before + 1


def test_the_memo_keeps_no_value_from_the_order(model_checks: list[str]) -> None:
    sent = order(note="free text where R4 wants Annotations", category={"text": "community"})
    find_drug_orders(bundle(sent), GROUPS)
    kept = repr(order_model.CHECKED.outcomes()) + repr(list(order_model.CHECKED._outcomes))
    for value in ("Patient/p1", "rituximab", "Waldenström", "free text", "community", "rtx"):
        assert value not in kept
    assert all(isinstance(o, CheckOutcome) for o in order_model.CHECKED.outcomes())


def test_digests_differ_between_workers_for_the_same_order() -> None:
    # Keyed with a secret made per process: a digest says nothing to anyone without it.
    assert CheckMemo().key(order(), "R4") != CheckMemo().key(order(), "R4")
