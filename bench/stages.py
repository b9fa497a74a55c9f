"""Where one hook call's CPU goes, stage by stage, measured in-process on the real code.

    python -m bench.stages [--calls 300] [--workloads order-sign-high,...]

Each stage is a function the request path already calls (the middleware's pre-scan, the JSON
parser, the contract check, ...). They are wrapped, for the length of the run only, by a timer
that adds the calling thread's CPU time to the stage's total; the code under test is otherwise
untouched. Calls go through Flask's test client, one at a time on one thread and without gevent,
so the issued-card append is timed on the thread that asks for it; the collector is set as in a
served worker (service.serving.memory). "framework" is what is left: routing, middleware,
logging, metrics, the response, and freeing the parsed body.

The figures are CPU per call, which stays comparable on a busy machine where wall time does not.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.growth import MAX_BODY_BYTES
from bench.servers import service_config
from bench.workloads import Workload, build_workloads

# (stage, module, attribute): the attribute is looked up through the module at call time, so
# replacing it there times every call the request path makes.
STAGE_FUNCTIONS: tuple[tuple[str, str, str], ...] = (
    ("parse", "service.api.middleware", "_check_json_body"),
    ("parse", "service.api.routes", "read_json_body"),
    ("contract", "service.api.hooks", "check_request"),
    ("orders", "service.api.hooks", "find_drug_orders"),
    ("gather", "service.api.hooks", "gather_record"),
    ("assess", "service.api.hooks", "drafted_exchanges"),
    ("assess", "service.api.hooks", "assess_orders"),
    ("assess", "service.api.hooks", "assess_followup"),
    ("render", "service.api.hooks", "render_order_card"),
    ("render", "service.api.hooks", "render_followup_card"),
    ("render", "service.cards.links", "with_timeline_link"),
    ("render", "service.api.routes", "jsonify"),
    ("record", "service.api.routes", "_record_issued"),
)
STAGES = ("parse", "contract", "orders", "gather", "assess", "render", "record", "framework")


class StageClock:
    """Thread CPU nanoseconds per stage; a stage called from inside another is not counted
    twice (the outer one holds the time)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._depth = 0

    def wrap(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            started = time.thread_time_ns()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[stage] += time.thread_time_ns() - started
                self._depth -= 1

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = []
        try:
            for stage, module_name, attribute in STAGE_FUNCTIONS:
                module = importlib.import_module(module_name)
                original = getattr(module, attribute)
                saved.append((module, attribute, original))
                setattr(module, attribute, self.wrap(stage, original))
            yield
        finally:
            for module, attribute, original in reversed(saved):
                setattr(module, attribute, original)


def _client(workdir: Path) -> Any:
    """The app as the bench serves it (bench.servers.service_config), as a test client."""
    from service import create_app
    from service.settings import load_settings

    config = service_config(workdir, "http://127.0.0.1:9/fhir", 1.0, MAX_BODY_BYTES)
    return create_app(load_settings(config, environ={})).test_client()


@contextlib.contextmanager
def served_collector() -> Iterator[None]:
    """The garbage collector as a served worker sets it, for the length of the block: at
    CPython's default it scans the bodies of the calls about three times per call, which no
    served call pays."""
    from service.serving.memory import configure_collector

    threshold = gc.get_threshold()
    configure_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def measure(client: Any, workload: Workload, calls: int) -> dict[str, Any]:
    """CPU per call by stage (ms), over `calls` calls after a warm-up of a tenth as many."""
    body = workload.body_bytes()
    headers = {"Content-Type": "application/json"}
    for _ in range(max(3, calls // 10)):
        client.post(workload.path, data=body, headers=headers)
    clock = StageClock()
    with clock.installed():
        started = time.thread_time_ns()
        for _ in range(calls):
            response = client.post(workload.path, data=body, headers=headers)
            if response.status_code != 200:
                raise RuntimeError(f"{workload.name}: HTTP {response.status_code}")
        total = time.thread_time_ns() - started
    clock.totals["framework"] = total - sum(clock.totals.values())
    per_call = {stage: round(ns / calls / 1e6, 3) for stage, ns in clock.totals.items()}
    row: dict[str, Any] = {
        "name": workload.name,
        "calls": calls,
        "total_ms": round(total / calls / 1e6, 3),
        "stages_ms": per_call,
    }
    checks = order_check_ms(client, body, calls)
    if checks is not None:
        row["orders_first_sight_ms"], row["orders_re_sent_ms"] = checks
    return row


def order_check_ms(client: Any, body: bytes, calls: int) -> tuple[float, float] | None:
    """The orders stage for draft orders seen for the first time and re-sent, in ms per call.

    A worker remembers the FHIR model check of the orders it has seen
    (service.clinical.checked_orders), so every call above but the first reads a re-sent order;
    this says what the first sight of one costs.
    """
    import orjson

    from service.clinical.order_model import CHECKED
    from service.clinical.orders import find_drug_orders

    context = orjson.loads(body).get("context", {})
    if "draftOrders" not in context:
        return None
    groups = client.application.extensions["flare_cds"].terminology.anti_cd20

    def per_call(forget: bool) -> float:
        spent = 0
        for _ in range(calls):
            if forget:
                CHECKED.clear()
            started = time.thread_time_ns()
            find_drug_orders(context["draftOrders"], groups, None, context.get("patientId"))
            spent += time.thread_time_ns() - started
        return round(spent / calls / 1e6, 3)

    return per_call(forget=True), per_call(forget=False)


# Calls are scaled down for larger bodies so each workload takes about as long.
REFERENCE_BODY_BYTES = 125_000


def run_stages(workloads: Sequence[Workload], calls: int) -> list[dict[str, Any]]:
    """Stage figures for each workload that needs no FHIR server (prefetch complete)."""
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="flare-cds-stages-") as folder,
        open(os.devnull, "w") as sink,
        contextlib.ExitStack() as stack,
    ):
        client = _client(Path(folder))
        stack.enter_context(served_collector())
        # Each call still formats and writes its log line, as in production, but not onto the
        # bench's own output.
        quieted = [
            handler
            for handler in logging.getLogger().handlers
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
        ]
        for handler in quieted:
            handler.setStream(sink)
        try:
            for workload in workloads:
                if workload.uses_fhir_server:
                    continue
                size = len(workload.body_bytes())
                calls_here = max(10, calls * REFERENCE_BODY_BYTES // size)
                rows.append(measure(client, workload, calls_here))
        finally:
            for handler in quieted:
                handler.setStream(sys.stderr)
            _settle(client)
    return rows


def _settle(client: Any) -> None:
    """Write the issued-card records still spooled and close the store, so that the spool's
    background writer is not at work in the folder as it is removed."""
    runtime = client.application.extensions["flare_cds"]
    runtime.issued_recorder().drain()
    runtime.store().close()


def stages_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "## CPU per call by stage (in-process, one thread)",
        "",
        "| Workload | " + " | ".join(STAGES) + " | total ms |",
        "|---|" + "---:|" * (len(STAGES) + 1),
    ]
    for row in rows:
        cells = [f"{row['stages_ms'][s]:.2f}" for s in STAGES]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {row['total_ms']:.2f} |")
    lines += [
        "",
        "Each stage is the thread CPU of the functions the request path calls for it "
        "(bench/stages.py); framework is the rest: routing, middleware, logging, metrics, "
        "freeing the parsed body.",
    ]
    checked = [row for row in rows if "orders_first_sight_ms" in row]
    if checked:
        figures = "; ".join(
            f"{row['name']} {row['orders_first_sight_ms']:.2f} ms seen for the first time, "
            f"{row['orders_re_sent_ms']:.2f} ms re-sent"
            for row in checked
        )
        lines += [
            "",
            "A worker remembers the FHIR model check of each draft order it has seen (order-select "
            "re-sends every draft order on each selection, and order-sign once more), and the "
            "bench repeats one body, so the orders figures above, like every figure here, are "
            f"for a re-sent order. The orders stage alone: {figures}.",
        ]
    return lines


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    header = f"{'workload':<24}" + "".join(f"{s:>10}" for s in STAGES) + f"{'total':>10}"
    lines = [header]
    for row in rows:
        cells = "".join(f"{row['stages_ms'][s]:>10.3f}" for s in STAGES)
        lines.append(f"{row['name']:<24}{cells}{row['total_ms']:>10.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--workloads", help="comma-separated subset")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",")] if args.workloads else None
    workloads = build_workloads("http://127.0.0.1:9/fhir", names)
    print(format_rows(run_stages(workloads, args.calls)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
