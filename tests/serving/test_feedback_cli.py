"""`flare-cds feedback-report` on feedback the service really stored: the installed command as a
subprocess against a live server's database, and `service.serving.cli.main` in-process for dates the
tests choose. Numbers are checked exactly in all three formats."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import uuid
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.serving.cli import main
from service.settings import CONFIG_ENV
from service.storage.feedback import IssuedCard, SqliteFeedbackStore, patient_hash
from tests.api.test_feedback_http import (
    DATABASE,
    VIEW,
    accepted,
    config_for,
    issue_card,
    overridden,
    send,
)
from tests.conftest import ServeProcess

COMMAND = Path(sys.executable).with_name("flare-cds")
HEADER = [
    "finding",
    "rule_version",
    "cards_issued",
    "accepted",
    "overridden",
    "override_rate",
    "suggestions_accepted",
    "top_override_reasons",
]


def flare_cds(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The console script pip installed, as an operator would run it (no FLARE_CDS_* leaks in)."""
    command = [str(COMMAND)] if COMMAND.exists() else [sys.executable, "-m", "service.serving.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLARE_CDS_")}
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def table_cells(text: str) -> list[list[str]]:
    """Data rows of the aligned table; columns are separated by at least two spaces."""
    header, rule, *rows = text.splitlines()
    assert header.startswith("Finding") and set(rule) <= {"-", " "}
    return [re.split(r" {2,}", row.strip()) for row in rows]


def csv_rows(text: str) -> list[list[str]]:
    header, *rows = csv.reader(io.StringIO(text))
    assert header == HEADER
    return rows


def as_csv(row: dict[str, Any]) -> list[str]:
    """What a JSON row must look like in the CSV: the same numbers, rate to 4 places."""
    rate = row["override_rate"]
    reasons = "; ".join(f"{r['reason']} ({r['count']})" for r in row["top_override_reasons"])
    return [
        row["finding"],
        row["rule_version"],
        str(row["cards_issued"]),
        str(row["accepted"]),
        str(row["overridden"]),
        "" if rate is None else f"{rate:.4f}",
        str(row["suggestions_accepted"]),
        reasons,
    ]


def as_table(row: dict[str, Any]) -> list[str]:
    """...and in the table: a percentage, and "-" for an empty cell."""
    cells = as_csv(row)
    rate = row["override_rate"]
    cells[5] = "" if rate is None else f"{rate:.1%}"
    return [cell or "-" for cell in cells]


def reasons(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"reason": reason, "count": count} for reason, count in pairs]


# ---------------------------------------------------------------------------- through the server


@pytest.fixture
def reported_server(
    serve_process: Any, tmp_path: Path
) -> tuple[ServeProcess, list[dict[str, Any]]]:
    """A server that issued a known set of cards and received known feedback, with the rows
    the report must then show."""
    server = serve_process(config_for(tmp_path / DATABASE), workers=2)
    high = [issue_card(server, "order-sign/wm-igm-4500-rituximab") for _ in range(6)]
    below = [issue_card(server, "order-sign/wm-igm-3999") for _ in range(2)]
    issue_card(server, "order-sign/wm-hyperviscosity-condition")  # no feedback at all
    ghost = str(uuid.uuid4())
    first, second = (s["uuid"] for s in high[1]["suggestions"])
    plasmapheresis, benefit = high[0]["overrideReasons"][0], high[0]["overrideReasons"][3]
    answer = send(
        server,
        accepted(high[0]["uuid"], [high[0]["suggestions"][0]["uuid"]]),
        accepted(high[1]["uuid"], [first, second]),
        overridden(high[2]["uuid"], reason=plasmapheresis),
        overridden(high[3]["uuid"], reason=plasmapheresis, userComment="apheresis on Monday"),
        # Accepted, then changed to overridden: only the later decision counts.
        accepted(high[4]["uuid"], [high[4]["suggestions"][0]["uuid"]]),
        overridden(high[4]["uuid"], "2026-11-21T10:05:00Z", reason=benefit),
        overridden(below[0]["uuid"], userComment="seen by the consultant"),  # no coded reason
        overridden(ghost, reason={"system": "urn:test", "code": "wrong-patient"}),
    )
    assert answer == {"received": 8, "duplicates": 0, "unknownCards": [ghost]}
    # A repeat, and a card posted to the wrong service: neither may change a number.
    assert send(server, overridden(high[2]["uuid"], reason=plasmapheresis))["duplicates"] == 1
    assert send(server, overridden(high[5]["uuid"]), service=VIEW)["unknownCards"]
    version = re.search(r"v(\S+)\._$", high[0]["detail"])
    assert version is not None and version.group(1) == "1.1.0"  # the rule version on the card
    expected = [
        {
            "finding": "hyperviscosity",
            "rule_version": "1.1.0",
            "cards_issued": 1,
            "accepted": 0,
            "overridden": 0,
            "override_rate": None,
            "suggestions_accepted": 0,
            "top_override_reasons": [],
        },
        {
            "finding": "igm-below-threshold",
            "rule_version": "1.0.0",
            "cards_issued": 2,
            "accepted": 0,
            "overridden": 1,
            "override_rate": 1.0,
            "suggestions_accepted": 0,
            "top_override_reasons": [],
        },
        {
            "finding": "igm-high",
            "rule_version": "1.1.0",
            "cards_issued": 6,
            "accepted": 2,
            "overridden": 3,
            "override_rate": 0.6,
            "suggestions_accepted": 3,  # one on the first card, two on the second
            "top_override_reasons": reasons(
                (plasmapheresis["display"], 2), (benefit["display"], 1)
            ),
        },
        {
            "finding": "unknown-card",
            "rule_version": "",
            "cards_issued": 0,
            "accepted": 0,
            # The ghost, and high[5] posted to a service that did not issue it.
            "overridden": 2,
            "override_rate": 1.0,
            "suggestions_accepted": 0,
            "top_override_reasons": reasons(("wrong-patient", 1)),
        },
    ]
    return server, expected


@pytest.mark.server
def test_report_on_a_live_servers_database_in_every_format(
    reported_server: tuple[ServeProcess, list[dict[str, Any]]], tmp_path: Path
) -> None:
    server, expected = reported_server
    config = str(server.config)

    as_json = flare_cds("--config", config, "feedback-report", "--format", "json", cwd=tmp_path)
    assert (as_json.returncode, as_json.stderr) == (0, "")
    assert json.loads(as_json.stdout) == expected

    as_csv_text = flare_cds("feedback-report", "--format", "csv", "--config", config, cwd=tmp_path)
    assert as_csv_text.returncode == 0, as_csv_text.stderr
    assert csv_rows(as_csv_text.stdout) == [as_csv(row) for row in expected]

    table = flare_cds("--config", config, "feedback-report", cwd=tmp_path)  # table by default
    assert table.returncode == 0, table.stderr
    assert table_cells(table.stdout) == [as_table(row) for row in expected]
    assert table_cells(table.stdout)[2][5] == "60.0%"
    assert "apheresis on Monday" not in table.stdout  # comments are not for the report

    # Once the server has stopped (and checkpointed its WAL) the numbers are the same.
    assert server.stop() == 0
    after = flare_cds("--config", config, "feedback-report", "--format", "json", cwd=tmp_path)
    assert json.loads(after.stdout) == expected


@pytest.mark.server
def test_since_filters_by_when_cards_were_issued(
    reported_server: tuple[ServeProcess, list[dict[str, Any]]], tmp_path: Path
) -> None:
    server, expected = reported_server
    config = str(server.config)
    today = datetime.now(UTC).date()

    def report(since: str) -> Any:
        args = ("--config", config, "feedback-report", "--since", since, "--format", "json")
        done = flare_cds(*args, cwd=tmp_path)
        assert (done.returncode, done.stderr) == (0, "")
        return json.loads(done.stdout)

    assert report((today - timedelta(days=1)).isoformat()) == expected
    # Two days ahead, whatever the time of day: nothing was issued or received since then.
    assert report((today + timedelta(days=2)).isoformat()) == []
    assert report(f"{today + timedelta(days=2)}T00:00:00+05:00") == []


@pytest.mark.server
def test_a_bad_since_exits_2_with_a_clear_message(
    reported_server: tuple[ServeProcess, list[dict[str, Any]]], tmp_path: Path
) -> None:
    server, _ = reported_server
    for since in ("last week", "2025-13-01", "0001-01-01T00:00:00+01:00"):
        done = flare_cds(
            "--config", str(server.config), "feedback-report", "--since", since, cwd=tmp_path
        )
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        assert f"--since {since!r} is not an ISO date" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_missing_database_gives_an_empty_report_and_creates_nothing(tmp_path: Path) -> None:
    database = tmp_path / "not-yet" / DATABASE
    config = tmp_path / "site.toml"
    config.write_text(config_for(database), "utf-8")
    done = flare_cds("--config", str(config), "feedback-report", "--format", "json", cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")
    table = flare_cds("--config", str(config), "feedback-report", cwd=tmp_path)
    assert table.stdout.endswith("(no cards issued and no feedback received in this period)\n")
    as_csv_text = flare_cds(
        "--config", str(config), "feedback-report", "--format", "csv", cwd=tmp_path
    )
    assert csv_rows(as_csv_text.stdout) == []
    assert not database.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site.toml"]


# ---------------------------------------------------------------------------- in-process main()

SERVICE = "rituximab-flare-order-sign"
BOUNDARY = datetime(2025, 3, 1, tzinfo=UTC)


def _issued(uuid_: str, finding: str, version: str, at: datetime) -> IssuedCard:
    return IssuedCard(
        uuid=uuid_,
        service_id=SERVICE,
        hook="order-sign",
        hook_instance="4f3c2d1e-0000-4000-8000-00000000000a",
        finding=finding,
        rule_version=version,
        indicator="warning",
        issued_at=at,
        patient_hash=patient_hash(b"k" * 32, "patient-1"),
    )


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A database with cards issued either side of 2025-03-01T00:00Z, in two rule versions."""
    # main() exports --config to the environment for gunicorn's workers: undo that afterwards.
    monkeypatch.setenv(CONFIG_ENV, "")
    database = tmp_path / DATABASE
    before = BOUNDARY - timedelta(microseconds=1)
    with closing(SqliteFeedbackStore(database)) as store:
        store.record_issued(
            [
                _issued("old", "igm-high", "1.0.0", before),
                _issued("edge", "igm-high", "1.0.0", BOUNDARY),
                _issued("new-1", "igm-high", "1.1.0", BOUNDARY + timedelta(days=1)),
                _issued("new-2", "igm-high", "1.1.0", BOUNDARY + timedelta(days=1)),
            ]
        )
        reason = {"reason": {"code": "benefit-outweighs-risk", "display": "Benefit"}}
        store.record_feedback(
            SERVICE,
            [
                {**overridden("old", "2025-03-01T10:00:00Z"), "overrideReason": reason},
                accepted("edge", ["s-1", "s-2"], "2025-03-01T10:00:00Z"),
                {**overridden("new-1", "2025-03-02T10:00:00Z"), "overrideReason": reason},
                accepted("new-2", ["s-1"], "2025-03-02T10:00:00Z"),
            ],
            BOUNDARY + timedelta(days=2),
        )
    config = tmp_path / "flare-cds.toml"
    config.write_text(config_for(database), "utf-8")
    return config


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _row(
    version: str, issued: int, accepted_: int, overridden_: int, suggestions: int
) -> dict[str, Any]:
    decided = accepted_ + overridden_
    return {
        "finding": "igm-high",
        "rule_version": version,
        "cards_issued": issued,
        "accepted": accepted_,
        "overridden": overridden_,
        "override_rate": round(overridden_ / decided, 4) if decided else None,
        "suggestions_accepted": suggestions,
        "top_override_reasons": reasons(("Benefit", overridden_)) if overridden_ else [],
    }


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        pytest.param(None, [_row("1.0.0", 2, 1, 1, 2), _row("1.1.0", 2, 1, 1, 1)], id="all"),
        # A date is midnight UTC, and a card issued exactly then is in.
        pytest.param("2025-03-01", [_row("1.0.0", 1, 1, 0, 2), _row("1.1.0", 2, 1, 1, 1)]),
        pytest.param(
            "2025-03-01T01:00:00+01:00", [_row("1.0.0", 1, 1, 0, 2), _row("1.1.0", 2, 1, 1, 1)]
        ),
        pytest.param("2025-03-01T00:00:00.000001Z", [_row("1.1.0", 2, 1, 1, 1)]),
        pytest.param("2025-03-03", [], id="after-everything"),
    ],
)
def test_main_reports_exact_numbers_per_rule_version(
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    since: str | None,
    expected: list[dict[str, Any]],
) -> None:
    window = [] if since is None else ["--since", since]
    base = ["--config", str(config_file), "feedback-report", *window, "--format"]
    code, out, err = run_main(capsys, *base, "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == expected
    code, out, _ = run_main(capsys, *base, "csv")
    assert code == 0 and csv_rows(out) == [as_csv(row) for row in expected]
    code, out, _ = run_main(capsys, *base, "table")
    assert code == 0
    if expected:
        assert table_cells(out) == [as_table(row) for row in expected]
    else:
        assert out.endswith("(no cards issued and no feedback received in this period)\n")


def test_main_refuses_a_bad_since_and_a_bad_format_with_exit_2(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        capsys, "--config", str(config_file), "feedback-report", "--since", "31/01/2025"
    )
    assert (code, out) == (2, "")
    assert err == (
        "feedback-report: --since '31/01/2025' is not an ISO date (2025-01-31) "
        "or date-time (2025-01-31T08:00:00Z)\n"
    )
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config_file), "feedback-report", "--format", "xlsx"])
    assert exited.value.code == 2
    assert "invalid choice: 'xlsx'" in capsys.readouterr().err


def test_main_on_a_missing_database_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_ENV, "")
    database = tmp_path / "var" / DATABASE
    config = tmp_path / "flare-cds.toml"
    config.write_text(config_for(database), "utf-8")
    assert run_main(capsys, "--config", str(config), "feedback-report", "--format", "json") == (
        0,
        "[]\n",
        "",
    )
    assert not database.parent.exists()
