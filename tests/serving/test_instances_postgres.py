"""Several `flare-cds serve` instances on one PostgreSQL, as a health system runs them.

Real gunicorn processes on loopback ports, a real PostgreSQL server; what is shared is shared
through the database only: the replay cache, feedback, issued cards and the patient-hash key.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service.settings import StorageSettings
from service.storage.feedback import IssuedCard, open_store, patient_hash
from tests.auth.test_tokens import EC_A, write_jwks
from tests.conftest import ServeProcess, as_of_today, load_fixture

pytestmark = pytest.mark.server

BASE = "https://cds.example.org"  # the load balancer's name: every instance is called by it
ISS = "https://ehr.example.org/"
ORDER_SIGN = "rituximab-flare-order-sign"
HOOK = f"/cds-services/{ORDER_SIGN}"


def _toml(value: str) -> str:
    return json.dumps(value)


def instance_config(url: str, extra: str = "") -> str:
    # No spool path: "var/issued-spool" beside each instance's own config, as on its own host.
    return f"[storage]\nurl = {_toml(url)}\n{extra}"


def auth_config(jwks_file: str) -> str:
    return f"""[auth]
required = true
public_base_url = {_toml(BASE)}
[[auth.issuers]]
iss = {_toml(ISS)}
jwks_file = {_toml(jwks_file)}
"""


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(config: str, name: str, workers: int = 2) -> ServeProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        server = ServeProcess(config, folder, workers).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.stop()


def session() -> requests.Session:
    http = requests.Session()
    http.trust_env = False
    return http


def warning_body(patient_id: str | None = None) -> dict[str, Any]:
    body = as_of_today(load_fixture("order-sign/wm-igm-4500-rituximab"))
    if patient_id:
        text = json.dumps(body).replace(body["context"]["patientId"], patient_id)
        body = json.loads(text)
    return body


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_the_same_jwt_to_two_instances_50_times_at_once_is_accepted_once(
    tmp_path: Path, postgres_url: str, instances: Callable[..., ServeProcess]
) -> None:
    from tests.api.test_security_http import client_jwt

    config = instance_config(postgres_url, auth_config(write_jwks(tmp_path, EC_A)))
    servers = [instances(config, "a"), instances(config, "b")]
    token = client_jwt(BASE + HOOK)
    body = warning_body()
    http = session()

    def send(index: int) -> requests.Response:
        server = servers[index % 2]
        headers = {"Authorization": f"Bearer {token}"}
        return http.post(server.url + HOOK, json=body, headers=headers, timeout=30)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(send, range(50)))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] + [401] * 49
    refused = [a.json()["message"] for a in answers if a.status_code == 401]
    assert set(refused) == {"token replayed"}
    [accepted] = [a for a in answers if a.status_code == 200]
    assert accepted.json()["cards"][0]["indicator"] == "warning"


def _issue_cards(url: str, count: int) -> list[str]:
    uuids = [str(uuid.uuid4()) for _ in range(count)]
    now = datetime.now(UTC)
    with closing(open_store(StorageSettings(url=url))) as store:
        store.record_issued(
            [
                IssuedCard(
                    u,
                    ORDER_SIGN,
                    "order-sign",
                    "hook-1",
                    "wm-igm-high",
                    "1.0.0",
                    "warning",
                    now,
                    patient_hash(b"k" * 32, "pt-1"),
                )
                for u in uuids
            ]
        )
    return uuids


def test_1000_feedback_posts_over_two_instances_survive_a_sigkill(
    tmp_path: Path, postgres_url: str, instances: Callable[..., ServeProcess]
) -> None:
    config = instance_config(postgres_url)
    servers = [instances(config, "a"), instances(config, "b")]
    cards = _issue_cards(postgres_url, 1000)
    http = session()
    stamp = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def post(index: int, server: ServeProcess) -> dict[str, Any] | None:
        """The answer, or None when the instance could not be reached (killed, restarting)."""
        item: dict[str, Any] = {"card": cards[index], "outcomeTimestamp": stamp}
        if index % 3:
            item.update(outcome="accepted", acceptedSuggestions=[{"id": "defer-order"}])
        else:
            item.update(outcome="overridden")
        try:
            answer = http.post(
                f"{server.url}{HOOK}/feedback", json={"feedback": [item]}, timeout=15
            )
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ):
            # A request caught by the kill may be refused, left unanswered or answered only in
            # part; a balancer gives up on it and retries elsewhere, and a retry of an item that
            # was stored is counted as a duplicate, which the assertions below allow for.
            return None
        assert answer.status_code == 200, answer.text
        return answer.json()

    answered: dict[int, dict[str, Any]] = {}
    answered_by: dict[int, int] = {}

    def deliver(index: int) -> None:
        # As a balancer does: try one instance, then the other while the first is down.
        for attempt in range(100):
            choice = (index + attempt) % 2
            result = post(index, servers[choice])
            if result is not None:
                answered[index], answered_by[index] = result, choice
                return
            time.sleep(0.05)

    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(deliver, index) for index in range(700)]
        while len(answered) < 300:
            time.sleep(0.01)
        servers[0].stop(signal.SIGKILL)  # posts in flight: no graceful shutdown, workers die too
        for future in running:
            future.result()
        servers[0].start()
        list(pool.map(deliver, range(700, 1000)))
    assert len(answered) == 1000
    # The restarted instance took its share of the last posts.
    assert any(answered_by[index] == 0 for index in range(700, 1000))
    # Every 2xx was stored once: new the first time; a retry of a stored one is a duplicate.
    assert all(a["received"] + a["duplicates"] == 1 for a in answered.values())
    with psycopg.connect(postgres_url) as connection:
        stored = connection.execute("SELECT count(*), count(DISTINCT card_uuid) FROM feedback")
        assert stored.fetchone() == (1000, 1000)

    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.serving.cli",
            "feedback-report",
            "--format",
            "json",
            "--config",
            str(servers[1].config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [row] = json.loads(report.stdout)
    assert (row["cards_issued"], row["accepted"] + row["overridden"]) == (1000, 1000)
    assert row["overridden"] == len(range(0, 1000, 3))


def test_metrics_sum_every_worker_and_carry_no_patient_id(
    tmp_path: Path, postgres_url: str, instances: Callable[..., ServeProcess]
) -> None:
    server = instances(instance_config(postgres_url), "a", workers=2)
    patient_id = f"pt{uuid.uuid4().hex[:12]}"
    body = warning_body(patient_id)
    http = session()

    def call(_: int) -> int:
        with session() as fresh:  # a new connection each time: both workers take calls
            return fresh.post(server.url + HOOK, json=body, timeout=15).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(call, range(30))) == {200}
        # A worker that dies keeps its counts in the sum; its replacement adds to them.
        worker = server.worker_pids()[0]
        subprocess.run(["kill", "-KILL", str(worker)], check=True)
        assert set(pool.map(call, range(20))) == {200}
    bad = http.post(server.url + "/cds-services/no-such-service", json=body, timeout=5)
    assert bad.status_code == 404

    text = http.get(server.url + "/metrics", timeout=5).text
    calls = metric_samples(text, "flare_cds_calls_total")
    key = (("route", "hook"), ("service", ORDER_SIGN), ("status", "200"))
    assert calls[key] == 50
    assert calls[(("route", "hook"), ("service", ""), ("status", "404"))] == 1
    latency = metric_samples(text, "flare_cds_call_duration_seconds_count")
    assert latency[(("route", "hook"), ("service", ORDER_SIGN))] == 50
    cards = metric_samples(text, "flare_cds_cards_total")
    assert sum(cards.values()) == 50
    assert all(dict(labels)["indicator"] == "warning" for labels in cards)
    # Every record reaches the store: the killed worker's from its spool file, which the
    # other worker adopts ("recovered"). The writers work a moment after the answers.
    deadline = time.monotonic() + 20
    while True:
        records = metric_samples(text, "flare_cds_issued_card_records_total")
        written = records.get((("result", "stored"),), 0) + records.get(
            (("result", "recovered"),), 0
        )
        if written >= 50 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
        text = http.get(server.url + "/metrics", timeout=5).text
    assert written == 50 and (("result", "lost"),) not in records
    assert patient_id not in text and "no-such-service" not in text
    # Where the store is, said once at start-up, without a password.
    assert "store: postgresql://flare@127.0.0.1" in server.log()


def test_readyz_follows_postgresql_while_cards_keep_coming(
    tmp_path: Path, postgres_server: Any, postgres_url: str,
    instances: Callable[..., ServeProcess],
) -> None:  # fmt: skip
    server = instances(instance_config(postgres_url), "a", workers=1)
    http = session()
    assert http.get(server.url + "/readyz", timeout=5).json() == {"status": "ready"}
    assert http.post(server.url + HOOK, json=warning_body(), timeout=15).status_code == 200
    deadline = time.monotonic() + 10  # its record is written a moment after the answer
    while not metric_samples(
        http.get(server.url + "/metrics", timeout=5).text, "flare_cds_issued_card_records_total"
    ).get((("result", "stored"),)):
        assert time.monotonic() < deadline, "the first card's record never reached the store"
        time.sleep(0.05)

    postgres_server.stop()
    try:
        started = time.monotonic()
        while http.get(server.url + "/readyz", timeout=10).status_code != 503:
            assert time.monotonic() - started < 5, "readyz still 200 with PostgreSQL stopped"
            time.sleep(0.2)
        down = http.get(server.url + "/readyz", timeout=10)
        assert down.json() == {"status": "unavailable", "reasons": ["store unreachable"]}
        # A warning is never withheld because the store is down.
        uuids = []
        for _ in range(5):
            answer = http.post(server.url + HOOK, json=warning_body(), timeout=15)
            assert answer.status_code == 200
            [card] = answer.json()["cards"]
            assert card["indicator"] == "warning"
            uuids.append(card["uuid"])
        # The writer tries a moment after the answers, and the store refuses: kept on disk.
        deadline = time.monotonic() + 20
        while True:
            text = http.get(server.url + "/metrics", timeout=5).text
            spooled = metric_samples(text, "flare_cds_issued_card_records_total")
            if spooled.get((("result", "spooled"),)) == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert spooled[(("result", "spooled"),)] == 5
    finally:
        postgres_server.start()
    started = time.monotonic()
    while http.get(server.url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() - started < 10, "readyz not 200 after PostgreSQL came back"
        time.sleep(0.2)
    # The spooled records reach the store once it is back.
    deadline = time.monotonic() + 20
    while True:
        with psycopg.connect(postgres_url) as connection:
            rows = connection.execute(
                "SELECT count(*) FROM issued_cards WHERE uuid = ANY(%s)", (uuids,)
            ).fetchone()[0]
        if rows == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert rows == 5
    text = http.get(server.url + "/metrics", timeout=5).text
    records = metric_samples(text, "flare_cds_issued_card_records_total")
    assert records[(("result", "recovered"),)] == 5
    assert (("result", "lost"),) not in records
    assert not list((server.workdir / "var" / "issued-spool").glob("issued-*.jsonl"))
