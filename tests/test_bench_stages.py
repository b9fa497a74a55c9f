"""The CPU-by-stage figures: every stage the request path has is timed, none twice."""

from __future__ import annotations

from bench.stages import STAGE_FUNCTIONS, STAGES, StageClock, run_stages
from bench.workloads import build_workloads


def test_every_stage_function_exists_on_the_request_path() -> None:
    # A renamed function would silently fall into "framework"; the wrapper must find each one.
    import importlib

    for stage, module, attribute in STAGE_FUNCTIONS:
        assert stage in STAGES
        assert callable(getattr(importlib.import_module(module), attribute)), (module, attribute)


def test_the_clock_counts_a_nested_stage_once_and_restores_the_code() -> None:
    import service.api.hooks as hooks

    original = hooks.check_request
    clock = StageClock()
    with clock.installed():
        assert hooks.check_request is not original
    assert hooks.check_request is original

    def inner() -> int:
        return sum(range(20_000))

    def outer() -> int:
        return timed_inner() + sum(range(20_000))

    timed_inner = clock.wrap("assess", inner)
    clock.wrap("parse", outer)()
    assert clock.totals["parse"] > 0 and clock.totals["assess"] == 0


def test_stages_of_an_order_sign_call_add_up_to_its_cpu() -> None:
    workloads = build_workloads("http://127.0.0.1:9/fhir", ["order-sign-high"])
    (row,) = run_stages(workloads, 20)
    stages = row["stages_ms"]
    assert set(stages) == set(STAGES)
    for name in ("parse", "contract", "orders", "gather", "assess", "render", "record"):
        assert stages[name] > 0, name
    assert sum(stages.values()) == __import__("pytest").approx(row["total_ms"], abs=0.01)


def test_the_first_sight_of_a_draft_order_is_reported_beside_the_re_sent_one() -> None:
    # Every call in the bench repeats one body, so the orders stage is a re-sent order's; the
    # report must say what an order seen for the first time costs as well.
    from bench.stages import stages_markdown

    workloads = build_workloads(
        "http://127.0.0.1:9/fhir", ["order-sign-high", "patient-view-flare"]
    )
    order_sign, patient_view = run_stages(workloads, 20)
    assert order_sign["orders_first_sight_ms"] > order_sign["orders_re_sent_ms"] > 0
    assert "orders_first_sight_ms" not in patient_view  # no draft orders to read
    text = "\n".join(stages_markdown([order_sign, patient_view]))
    assert "order-sign-high" in text and "seen for the first time" in text and "re-sent" in text
