"""The `flare-cds` command: serve, evaluate a hook request file, report on feedback, migrate."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from service.serving.server import DEFAULT_THREADS, DEFAULT_WORKERS
from service.settings import (
    CONFIG_ENV,
    DATA_DIR_ENV,
    Settings,
    SettingsError,
    load_settings,
    storage_base,
)

HOOK_SERVICES = {
    "order-select": "rituximab-flare-order-select",
    "order-sign": "rituximab-flare-order-sign",
    "patient-view": "igm-flare-patient-view",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config:
        # Workers load settings themselves; the environment carries the path to them.
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"flare-cds: configuration error: {exc}", file=sys.stderr)
        return 2
    return int(args.handler(args, settings) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flare-cds", description=__doc__)
    parser.add_argument("--config", help=f"TOML settings file (or set {CONFIG_ENV})")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the CDS Hooks API with gunicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    serve.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="accepted for older command lines; gevent workers need no threads",
    )
    serve.set_defaults(handler=_serve)

    evaluate = commands.add_parser(
        "evaluate", help="run a hook request file through the service and print the cards"
    )
    evaluate.add_argument("file", help="a CDS Hooks request (JSON)")
    evaluate.add_argument("--service", help="service id (default: chosen from the hook)")
    evaluate.add_argument("--now", help="evaluate as of this ISO date-time (default: now)")
    evaluate.add_argument("--json", action="store_true", help="print the response as JSON")
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser("feedback-report", help="what clinicians did with the cards")
    report.add_argument("--since", help="only cards issued on or after this ISO date")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.set_defaults(handler=_feedback_report)
    migrate = commands.add_parser("migrate", help="bring the store's schema up to date")
    migrate.set_defaults(handler=_migrate)
    for command in (serve, evaluate, report, migrate):
        # Also accepted after the subcommand: `flare-cds serve --config site.toml`.
        command.add_argument("--config", default=argparse.SUPPRESS, help="TOML settings file")
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from service.serving.server import serve

    if args.workers < 1 or args.threads < 1 or not 0 < args.port < 65536:
        print("flare-cds: --workers and --threads must be >= 1 and --port 1-65535", file=sys.stderr)
        return 2
    # Workers load settings themselves: the base this process resolved paths against is handed
    # to them as it is, so every worker uses the very same files.
    os.environ.setdefault(DATA_DIR_ENV, str(storage_base(None)))
    return serve(args.host, args.port, args.workers, args.threads, settings)


class _DiscardIssued:
    """`evaluate` shows cards to a reviewer; they were not issued to anyone, so none is stored."""

    def record_issued(self, cards: Any) -> None:
        return None


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from service import create_app

    try:
        body = json.loads(Path(args.file).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        print(f"flare-cds: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    service_id = args.service or HOOK_SERVICES.get(
        str(body.get("hook")) if isinstance(body, dict) else ""
    )
    if not service_id:
        print("flare-cds: the file has no known hook; pass --service", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    if args.now:
        try:
            now = datetime.fromisoformat(args.now.replace("Z", "+00:00"))
        except ValueError:
            print(f"flare-cds: --now {args.now!r} is not an ISO date-time", file=sys.stderr)
            return 2
        now = now if now.tzinfo else now.replace(tzinfo=UTC)
    # Development settings: the file is reviewed locally, not sent by an EHR.
    settings = settings.replace(auth={"required": False})
    app = create_app(settings, clock=lambda: now, store=_DiscardIssued())
    response = app.test_client().post(f"/cds-services/{service_id}", json=body)
    answer = response.get_json(silent=True) or {}
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    elif response.status_code == 200:
        print_cards(answer.get("cards", []), sys.stdout)
    else:
        print(f"HTTP {response.status_code}: {answer.get('message')}")
        for item in answer.get("details", []) + answer.get("missing", []):
            print(f"  - {json.dumps(item, ensure_ascii=False)}")
    return 0 if response.status_code == 200 else 1


def print_cards(cards: list[dict[str, Any]], out: TextIO) -> None:
    if not cards:
        print("No cards (no advice for this request).", file=out)
    for number, card in enumerate(cards, start=1):
        print(f"=== Card {number}: {card['indicator'].upper()} ===", file=out)
        print(f"Summary: {card['summary']}", file=out)
        print("", file=out)
        print(card.get("detail", ""), file=out)
        print("", file=out)
        suggestions = card.get("suggestions", [])
        if suggestions:
            print(f"Suggestions ({card.get('selectionBehavior')}):", file=out)
        for suggestion in suggestions:
            mark = " [recommended]" if suggestion.get("isRecommended") else ""
            print(f"  - {suggestion['label']}{mark}", file=out)
            for action in suggestion.get("actions", []):
                target = action.get("resourceId") or _resource_text(action.get("resource"))
                print(f"      {action['type']}: {target}", file=out)
        reasons = [r["display"] for r in card.get("overrideReasons", [])]
        if reasons:
            print("Override reasons: " + "; ".join(reasons), file=out)
        print("", file=out)


def _resource_text(resource: Any) -> str:
    if not isinstance(resource, dict):
        return ""
    code = resource.get("code") or {}
    return f"{resource.get('resourceType')} {code.get('text', '')}".strip()


def _feedback_report(args: argparse.Namespace, settings: Settings) -> int:
    from service.serving.feedback_report import run_feedback_report

    return run_feedback_report(settings, args.since, args.format, sys.stdout)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from service.serving.store_setup import run_migrate

    return run_migrate(settings, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
