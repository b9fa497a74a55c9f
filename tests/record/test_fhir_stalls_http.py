"""FHIR servers that stall or misbehave must cost only their own calls, and only until the deadline.

Real loopback FHIR servers throughout: one that answers 200 and then trickles its body a byte at a
time, beside a healthy one on another origin.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer, assert_conforms, load_fixture, post_hook
from tests.fhir_test_server import FhirTestServer
from tests.record.test_fallback_faults_http import (
    MARGIN,
    ORDER,
    ORDER_KEYS,
    assert_412,
    warm_app,
)
from tests.record.test_fallback_http import fetching, loaded_fhir_server

DEADLINE = 0.45
ORDER_SERVICE = "rituximab-flare-order-sign"


@pytest.fixture
def trickling() -> Iterator[FhirTestServer]:
    server = loaded_fhir_server()
    server.trickle_seconds = 0.2  # 200 OK at once, then a byte every 0.2 s: no read ever times out
    yield server
    server.stop()


@pytest.fixture
def healthy() -> Iterator[FhirTestServer]:
    server = loaded_fhir_server(host="127.0.0.2")
    yield server
    server.stop()


def _post(url: str, body: dict[str, Any]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.post(f"{url}/cds-services/{ORDER_SERVICE}", json=body, timeout=10)
    return response, time.monotonic() - started


def test_trickling_server_is_cut_off_and_does_not_starve_other_servers(
    tmp_path: Path, trickling: FhirTestServer, healthy: FhirTestServer
) -> None:
    # Two fetchers per origin: any fetch of the trickling server still running after its call
    # would leave the next calls to that server queued behind it.
    app = warm_app(tmp_path, deadline_seconds=DEADLINE, read_timeout_seconds=0.4, pool_size=2)
    stalled = fetching(load_fixture(ORDER), trickling.base_url)
    wanted = fetching(load_fixture(ORDER), healthy.base_url)
    with LiveServer(app) as live, ThreadPoolExecutor(max_workers=8) as clients:
        stalls = [clients.submit(_post, live.url, stalled) for _ in range(8)]
        time.sleep(0.05)  # the stalled calls are in flight
        healthy_calls = [_post(live.url, wanted) for _ in range(3)]
        stalled_calls = [future.result() for future in stalls]

        for response, elapsed in healthy_calls:
            assert response.status_code == 200, response.text
            [card] = response.json()["cards"]
            assert card["indicator"] == "warning"
            assert elapsed < DEADLINE  # not queued behind the stalled server's fetches
        for response, elapsed in stalled_calls:
            assert response.status_code == 412
            assert_conforms(response.json(), "Error")
            assert all(m["reason"].startswith("timed out") for m in response.json()["missing"])
            assert elapsed < DEADLINE + 1.0  # every call answered near its deadline

        # The trickling server recovers: its fetchers were freed when their calls ended, so a
        # call right after gets its cards instead of queueing behind abandoned fetches.
        trickling.trickle_seconds = 0.0
        response, _ = _post(live.url, stalled)
        assert response.status_code == 200, response.text
        assert response.json()["cards"][0]["indicator"] == "warning"


def test_a_trickled_answer_is_cut_at_the_deadline_not_per_read(
    tmp_path: Path, trickling: FhirTestServer
) -> None:
    app = warm_app(tmp_path, deadline_seconds=DEADLINE, read_timeout_seconds=0.4)
    body = fetching(load_fixture(ORDER), trickling.base_url)
    started = time.monotonic()
    response = post_hook(app.test_client(), body)
    elapsed = time.monotonic() - started
    assert_412(app, response, body, dict.fromkeys(ORDER_KEYS, "timed out"))
    assert DEADLINE - 0.1 < elapsed < DEADLINE + MARGIN


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_fhir_answer_with_nan_or_infinity_is_not_json(
    tmp_path: Path, healthy: FhirTestServer, constant: bytes
) -> None:
    # A NaN IgM would compare as neither high nor low: it must never reach the rules.
    app = warm_app(tmp_path)
    healthy.raw_body = (
        b'{"resourceType":"Bundle","type":"searchset","entry":[{"resource":'
        b'{"resourceType":"Observation","valueQuantity":{"value":' + constant + b"}}}]}"
    )
    body = fetching(load_fixture(ORDER), healthy.base_url)
    response = post_hook(app.test_client(), body)
    assert_412(app, response, body, dict.fromkeys(ORDER_KEYS, "not JSON"))


def test_next_link_with_user_credentials_is_not_followed(
    tmp_path: Path, healthy: FhirTestServer
) -> None:
    app = warm_app(tmp_path)
    healthy.max_page_size = 1
    # Same origin, but requests would send u:p as Basic credentials.
    healthy.next_link_origin = f"http://u:p@{healthy.host}:{healthy.port}"
    body = fetching(load_fixture(ORDER), healthy.base_url)
    response = post_hook(app.test_client(), body)
    assert_412(app, response, body, {"igm": "next link with user credentials not followed"})
    assert all(
        r.authorization is None or r.authorization.startswith("Bearer") for r in healthy.requests
    )
