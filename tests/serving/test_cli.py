"""The flare-cds command: evaluate a request file for review; refuse bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.serving.cli import main
from tests.conftest import FIXTURES

NOW = "2026-11-20T12:00:00Z"


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_prints_cards_readably(capsys: Any) -> None:
    path = FIXTURES / "order-sign" / "wm-igm-5600-very-high.json"
    code, out, _ = run(capsys, "evaluate", str(path), "--now", NOW)
    assert code == 0
    assert "=== Card 1: WARNING ===" in out
    assert "Summary: IgM flare risk: rituximab with serum IgM 5,600 mg/dL" in out
    assert "Suggestions (at-most-one):" in out
    assert "delete: MedicationRequest/" in out
    assert "create: ServiceRequest Plasmapheresis" in out
    assert "Override reasons:" in out


def test_evaluate_json_is_the_http_response(capsys: Any) -> None:
    path = FIXTURES / "patient-view" / "flare-after-rituximab.json"
    code, out, _ = run(capsys, "evaluate", str(path), "--now", NOW, "--json")
    assert code == 0
    cards = json.loads(out)["cards"]
    assert cards[0]["indicator"] == "info"


def test_evaluate_no_card(capsys: Any) -> None:
    path = FIXTURES / "order-sign" / "ra-rituximab-normal-igm.json"
    code, out, _ = run(capsys, "evaluate", str(path), "--now", NOW)
    assert code == 0 and "No cards" in out


def test_evaluate_reports_a_bad_request(tmp_path: Path, capsys: Any) -> None:
    body = json.loads((FIXTURES / "order-sign" / "wm-no-igm.json").read_text())
    del body["context"]["patientId"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    code, out, _ = run(capsys, "evaluate", str(path))
    assert code == 1 and "HTTP 400" in out and "patientId" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "/nonexistent.json"], "cannot read"),
        (
            ["evaluate", str(FIXTURES / "order-sign" / "wm-no-igm.json"), "--now", "soon"],
            "not an ISO date-time",
        ),
    ],
)
def test_evaluate_usage_errors(capsys: Any, args: list[str], message: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2 and message in err


def test_bad_config_exits_2_with_reason(tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[rules]\nigm_high_mg_dl = 0\n")
    code, _, err = run(capsys, "--config", str(config), "evaluate", "x.json")
    assert code == 2 and "igm_high_mg_dl" in err


def test_console_script_is_installed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.serving.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    for command in ("serve", "evaluate", "feedback-report"):
        assert command in result.stdout
