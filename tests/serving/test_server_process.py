"""The real `flare-cds serve` (gunicorn) on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import requests

from tests.conftest import as_of_today, assert_conforms, load_fixture

pytestmark = pytest.mark.server


def test_serves_discovery_and_a_hook_call_then_stops_on_sigterm(serve_process: Any) -> None:
    server = serve_process('[storage]\ndatabase = "data/flare.sqlite3"\n')
    discovery = requests.get(f"{server.url}/cds-services", timeout=5)
    assert discovery.status_code == 200
    assert_conforms(discovery.json(), "ServiceDiscoveryResponse")

    body = as_of_today(load_fixture("order-sign/wm-igm-4500-rituximab"))
    response = requests.post(
        f"{server.url}/cds-services/rituximab-flare-order-sign", json=body, timeout=10
    )
    assert response.status_code == 200
    assert_conforms(response.json(), "CdsResponse")
    [card] = response.json()["cards"]
    assert card["indicator"] == "warning" and "4,500 mg/dL" in card["summary"]

    none = as_of_today(load_fixture("order-sign/wm-no-anti-cd20-ordered"))
    answer = requests.post(
        f"{server.url}/cds-services/rituximab-flare-order-sign", json=none, timeout=10
    )
    assert answer.json() == {"cards": []}

    bad = requests.post(
        f"{server.url}/cds-services/rituximab-flare-order-sign",
        data="{",
        headers={"Content-Type": "application/json"},
        timeout=5,
    )
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_json"

    assert server.stop(signal.SIGTERM) == 0
    assert "Shutting down" in server.log()


def test_sigint_stops_cleanly(serve_process: Any) -> None:
    server = serve_process("", workers=1)
    assert requests.get(f"{server.url}/healthz", timeout=5).json()["status"] == "ok"
    assert server.stop(signal.SIGINT) == 0


def test_refuses_to_start_with_a_bad_config(tmp_path: Any) -> None:
    import subprocess
    import sys

    config = tmp_path / "bad.toml"
    config.write_text("[rules]\nnot_a_rule = 1\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.serving.cli",
            "serve",
            "--port",
            "1",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "not_a_rule" in result.stderr
