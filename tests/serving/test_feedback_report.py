"""Report numbers on a known set of cards and feedback, the three renderings, and the command."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service.serving.feedback_report import render_report, run_feedback_report
from service.settings import Settings
from service.storage.feedback import IssuedCard, ReportRow, SqliteFeedbackStore, patient_hash

SERVICE = "igm-flare-order-sign"
ISSUED_AT = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
RECEIVED_AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SINCE = datetime(2025, 1, 1, tzinfo=UTC)
PEX = {
    "system": "https://flare-cds.example/override",
    "code": "pex",
    "display": "Already on plasmapheresis",
}
BENEFIT = {"system": "https://flare-cds.example/override", "code": "benefit-outweighs-risk"}


def card(
    uuid: str,
    finding: str,
    version: str = "1.0.0",
    *,
    service_id: str = SERVICE,
    issued_at: datetime = ISSUED_AT,
) -> IssuedCard:
    return IssuedCard(
        uuid,
        service_id,
        "order-select",
        "hook-1",
        finding,
        version,
        "warning",
        issued_at,
        patient_hash(b"k" * 32, f"Patient/{uuid}"),
    )


def item(
    card_uuid: str,
    outcome: str,
    at: str,
    *,
    reason: dict[str, str] | None = None,
    suggestions: tuple[str, ...] = (),
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "card": card_uuid,
        "outcome": outcome,
        "outcomeTimestamp": f"2025-03-01T{at}:00Z",
    }
    if reason:
        result["overrideReason"] = {"reason": reason, "userComment": "free text"}
    if suggestions:
        result["acceptedSuggestions"] = [{"id": s} for s in suggestions]
    return result


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "flare-cds.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[SqliteFeedbackStore]:
    with closing(SqliteFeedbackStore(db_path)) as opened:
        opened.record_issued(
            [card(f"h{n}", "igm-high") for n in range(1, 6)]
            + [card("v1", "igm-very-high"), card("v2", "igm-very-high")]
            + [card("n1", "igm-high", "1.1.0")]
            + [card("old", "igm-high", issued_at=datetime(2024, 12, 1, tzinfo=UTC))]
            + [card("elsewhere", "btk-hold", service_id="another-service")]
        )
        post = [
            # igm-high 1.0.0: 2 overridden with reasons, 1 accepted with a suggestion, h4/h5 silent.
            item("h1", "overridden", "09:40", reason=PEX),
            item("h2", "overridden", "09:40", reason=BENEFIT),
            item("h3", "accepted", "09:40", suggestions=("s-hold-rituximab",)),
            item("h1", "overridden", "09:50", reason=PEX),  # the same card reported again
            # igm-very-high: v1's later decision arrives first and must still win.
            item("v1", "accepted", "10:00", suggestions=("s-a", "s-b")),
            item("v1", "overridden", "09:00", reason=PEX),
            item("v2", "overridden", "09:40"),  # no reason given
            item("old", "overridden", "09:40", reason=PEX),
            item(
                "ghost", "overridden", "09:40", reason={"code": "nmp", "display": "Not my patient"}
            ),
            item("elsewhere", "overridden", "09:40"),  # issued by another service
        ]
        opened.record_feedback(SERVICE, post, RECEIVED_AT)
        opened.record_feedback(SERVICE, post[2:3], RECEIVED_AT)  # an exact duplicate of h3's
        opened.record_feedback(
            SERVICE, [item("stale-ghost", "accepted", "09:40")], datetime(2024, 12, 15, tzinfo=UTC)
        )
        yield opened


EXPECTED_SINCE = [
    ReportRow("btk-hold", "1.0.0", 1, 0, 0, None, [], 0),  # its feedback went to another service
    ReportRow(
        "igm-high",
        "1.0.0",
        5,
        1,
        2,
        2 / 3,
        [("Already on plasmapheresis", 1), ("benefit-outweighs-risk", 1)],
        1,
    ),
    ReportRow("igm-high", "1.1.0", 1, 0, 0, None, [], 0),
    ReportRow("igm-very-high", "1.0.0", 2, 1, 1, 0.5, [], 2),
    ReportRow("unknown-card", "", 0, 0, 2, 1.0, [("Not my patient", 1)], 0),
]


def test_report_counts_each_card_once_with_its_latest_outcome(
    store: SqliteFeedbackStore,
) -> None:
    assert store.report(SINCE) == EXPECTED_SINCE


def test_report_without_since_includes_older_cards_and_feedback(
    store: SqliteFeedbackStore,
) -> None:
    _, high, _, _, unknown = store.report()
    assert high == ReportRow(
        "igm-high",
        "1.0.0",
        6,
        1,
        3,
        0.75,
        [("Already on plasmapheresis", 2), ("benefit-outweighs-risk", 1)],
        1,
    )
    assert (unknown.accepted, unknown.overridden) == (1, 2)


def test_top_override_reasons_are_the_three_most_frequent(tmp_path: Path) -> None:
    reasons = ["b-reason"] * 2 + ["a-reason"] * 2 + ["c-reason"] * 3 + ["d-reason"]
    with closing(SqliteFeedbackStore(tmp_path / "f.sqlite3")) as opened:
        opened.record_issued([card(f"c{n}", "igm-high") for n in range(len(reasons))])
        opened.record_feedback(
            SERVICE,
            [
                item(f"c{n}", "overridden", "09:40", reason={"code": code})
                for n, code in enumerate(reasons)
            ],
            RECEIVED_AT,
        )
        [row] = opened.report()
    assert row.top_override_reasons == [("c-reason", 3), ("a-reason", 2), ("b-reason", 2)]


def test_table_is_aligned_for_a_reader() -> None:
    text = render_report(EXPECTED_SINCE[1:3] + EXPECTED_SINCE[4:], "table")
    assert text == (
        "Finding       Rule version  Cards issued  Accepted  Overridden  Override rate"
        "  Suggestions accepted  Top override reasons\n"
        "------------  ------------  ------------  --------  ----------  -------------"
        "  --------------------  " + "-" * 57 + "\n"
        "igm-high      1.0.0                    5         1           2          66.7%"
        "                     1  Already on plasmapheresis (1); benefit-outweighs-risk (1)\n"
        "igm-high      1.1.0                    1         0           0              -"
        "                     0  -\n"
        "unknown-card  -                        0         0           2         100.0%"
        "                     0  Not my patient (1)\n"
    )


def test_empty_table_says_so() -> None:
    lines = render_report([], "table").splitlines()
    assert lines[0].startswith("Finding")
    assert lines[-1] == "(no cards issued and no feedback received in this period)"


def test_csv_has_a_header_and_one_line_per_row() -> None:
    parsed = list(csv.reader(io.StringIO(render_report(EXPECTED_SINCE, "csv"))))
    assert parsed[0] == [
        "finding",
        "rule_version",
        "cards_issued",
        "accepted",
        "overridden",
        "override_rate",
        "suggestions_accepted",
        "top_override_reasons",
    ]
    assert parsed[2] == [
        "igm-high",
        "1.0.0",
        "5",
        "1",
        "2",
        "0.6667",
        "1",
        "Already on plasmapheresis (1); benefit-outweighs-risk (1)",
    ]
    assert parsed[1][5] == ""  # no feedback: no rate, rather than 0
    assert len(parsed) == 1 + len(EXPECTED_SINCE)
    assert render_report([], "csv").splitlines() == [",".join(parsed[0])]


def test_json_is_a_list_of_objects() -> None:
    parsed = json.loads(render_report(EXPECTED_SINCE, "json"))
    assert parsed[1] == {
        "finding": "igm-high",
        "rule_version": "1.0.0",
        "cards_issued": 5,
        "accepted": 1,
        "overridden": 2,
        "override_rate": 0.6667,
        "suggestions_accepted": 1,
        "top_override_reasons": [
            {"reason": "Already on plasmapheresis", "count": 1},
            {"reason": "benefit-outweighs-risk", "count": 1},
        ],
    }
    assert parsed[0]["override_rate"] is None
    assert json.loads(render_report([], "json")) == []


def test_client_text_cannot_inject_into_terminal_or_spreadsheet() -> None:
    row = ReportRow("igm-high", "1.0.0", 1, 0, 1, 1.0, [("=HYPERLINK(1)\x1b[2J\nx", 1)], 0)
    table = render_report([row], "table")
    assert "\x1b" not in table and "?[2J x (1)" in table
    assert list(csv.reader(io.StringIO(render_report([row], "csv"))))[1][-1].startswith("'=")
    with pytest.raises(ValueError, match="unknown report format"):
        render_report([row], "xml")


def run(settings: Settings, since: str | None, fmt: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_feedback_report(settings, since, fmt, out, err)
    return code, out.getvalue(), err.getvalue()


def test_command_reports_since_a_date(store: SqliteFeedbackStore, db_path: Path) -> None:
    settings = Settings().replace(storage={"database": str(db_path)})
    code, out, err = run(settings, "2025-01-01", "json")
    assert (code, err) == (0, "")
    assert json.loads(out) == json.loads(render_report(EXPECTED_SINCE, "json"))
    code, out, _ = run(settings, "2025-03-01T09:30:00.000001+00:00", "csv")
    assert code == 0
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == ["unknown-card"]


def test_command_on_a_missing_database_prints_an_empty_report_and_creates_nothing(
    tmp_path: Path,
) -> None:
    database = tmp_path / "var" / "flare-cds.sqlite3"
    settings = Settings().replace(storage={"database": str(database)})
    assert run(settings, None, "json") == (0, "[]\n", "")
    assert run(settings, None, "table")[1].endswith("in this period)\n")
    assert not database.parent.exists()


def test_command_on_an_empty_or_unreadable_file(tmp_path: Path) -> None:
    database = tmp_path / "flare-cds.sqlite3"
    settings = Settings().replace(storage={"database": str(database)})
    database.touch()
    assert run(settings, None, "csv")[:2] == (0, render_report([], "csv"))
    database.write_bytes(b"this is not a database" * 100)
    code, out, err = run(settings, None, "csv")
    assert (code, out) == (1, "")
    assert "cannot read" in err


@pytest.mark.parametrize(
    ("since", "fmt", "message"),
    [
        ("last tuesday", "table", "--since 'last tuesday' is not an ISO date"),
        ("2025-13-01", "table", "is not an ISO date"),
        (None, "xlsx", "--format must be one of table, csv, json"),
    ],
)
def test_command_refuses_bad_arguments_with_exit_code_2(
    tmp_path: Path, since: str | None, fmt: str, message: str
) -> None:
    settings = Settings().replace(storage={"database": str(tmp_path / "db.sqlite3")})
    code, out, err = run(settings, since, fmt)
    assert (code, out) == (2, "")
    assert message in err
