"""The service without its clinical path: how much of a call's time the rest of it takes.

    python -m bench.no_rules serve --host 127.0.0.1 --port 8091 --config bench/out/flare-cds.toml

This is `flare-cds serve` (the same gunicorn and gevent worker, middleware, body check, JSON
decoding and contract check) except that a hook call whose request passes the contract is
answered {"cards": []}: no orders found, no record gathered, no rules applied, no card written
or recorded. The bench serves it beside the service and the baseline at one connection
(bench.latency_split), so the clinical path's share of a call's latency is measured, not
inferred. It exists only here: nothing in the service can turn its rules off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.api import routes
from service.api.hooks import HookResult, check_request
from service.serving.cli import main as service_main


def contract_only(runtime: Any, definition: Any, body: Any) -> HookResult:
    """run_hook up to and including the contract check, then an answer with no cards."""
    check_request(runtime, definition, body)
    return HookResult([], body["context"]["patientId"], str(body.get("hookInstance", "")))


def main(argv: Sequence[str] | None = None) -> int:
    # Replaced in this process before gunicorn forks its workers, which inherit the module.
    routes.run_hook = contract_only
    return service_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
