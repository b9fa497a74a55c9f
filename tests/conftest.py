"""Shared test fixtures: the app at a fixed "now", real fixtures, contract checks, live servers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from service import create_app
from service.api.contract import Contract
from service.settings import Settings
from tests.fixture_dates import FIXTURE_NOW, as_of_today, shift_dates

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fhir_fixtures" / "hook_requests"
SERVICE_FOR_HOOK = {
    "order-select": "rituximab-flare-order-select",
    "order-sign": "rituximab-flare-order-sign",
    "patient-view": "igm-flare-patient-view",
}

_CONTRACT = Contract()


def load_fixture(name: str) -> dict[str, Any]:
    """A hook request by "<hook>/<scenario>", e.g. "order-sign/wm-igm-4500-rituximab"."""
    return json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))


def all_fixture_names(hook: str | None = None) -> list[str]:
    pattern = f"{hook}/*.json" if hook else "*/*.json"
    return sorted(f"{p.parent.name}/{p.stem}" for p in FIXTURES.glob(pattern))


def assert_conforms(instance: Any, schema: str) -> None:
    problems = _CONTRACT.problems(schema, instance)
    assert not problems, f"{schema} violations: {[p.as_json() for p in problems]}"


def test_settings(tmp_path: Path, **sections: Any) -> Settings:
    settings = Settings().replace(
        storage={
            "database": str(tmp_path / "flare-cds.sqlite3"),
            "spool_directory": str(tmp_path / "issued-spool"),
        }
    )
    return settings.replace(**sections) if sections else settings


test_settings.__test__ = False  # a helper, not a test


__all__ = ["FIXTURE_NOW", "as_of_today", "shift_dates"]


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not swallow loopback calls
    yield session
    session.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return test_settings(tmp_path)


@pytest.fixture
def app(settings: Settings) -> Any:
    return create_app(settings, clock=lambda: FIXTURE_NOW)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def post_hook(client: Any, body: dict[str, Any], service_id: str | None = None) -> Any:
    service_id = service_id or SERVICE_FOR_HOOK[body["hook"]]
    return client.post(f"/cds-services/{service_id}", json=body)


def check_scenario(
    client: Any,
    body: dict[str, Any],
    indicator: str | None,
    finding: str,
    shown: tuple[str, ...],
) -> dict[str, Any] | None:
    """Run a hook request through HTTP and check what a clinician would see; return the card.

    No card expected (indicator None) means exactly `{"cards": []}`. Otherwise one card with
    that indicator and finding, a summary under 140 characters, the rule version, and every
    string of `shown` in its detail: the data it was computed from.
    """
    response = post_hook(client, body)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert_conforms(answer, "CdsResponse")
    if indicator is None:
        assert answer == {"cards": []}
        return None
    [card] = answer["cards"]
    assert card["indicator"] == indicator
    assert card["source"]["topic"]["code"] == finding
    assert len(card["summary"]) < 140
    assert f"Rule `{finding}` v" in card["detail"]
    for text in shown:
        assert text in card["detail"], f"{text!r} not shown on the card"
    return card


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The app on a real loopback HTTP server in a thread (the clock stays injectable)."""

    def __init__(self, app: Any) -> None:
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)


@pytest.fixture
def live_server(app: Any) -> Iterator[LiveServer]:
    with LiveServer(app) as server:
        yield server


class ServeProcess:
    """The real `flare-cds serve` command (gunicorn) on a free loopback port."""

    def __init__(
        self, config_text: str | Callable[[int], str], workdir: Path, workers: int = 2
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.config = workdir / "flare-cds.toml"
        # A callable receives the port: settings such as auth.public_base_url must name it.
        text = config_text(self.port) if callable(config_text) else config_text
        self.config.write_text(text, "utf-8")
        self.log_path = workdir / "serve.log"
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLARE_CDS_")}
        command = [
            sys.executable,
            "-m",
            "service.serving.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--config",
            str(self.config),
        ]
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                # The master listens before its workers are ready: a slow first answer is
                # "not yet", not a failure.
                time.sleep(0.1)
        # No fixture holds a server that never started: stop it here, or it outlives the tests.
        self.stop()
        raise RuntimeError(f"server did not start in 30 s: {self.log()}")

    def worker_pids(self) -> list[int]:
        assert self.process is not None
        return child_pids(self.process.pid)

    def stop(self, sig: int | None = None) -> int:
        """Stop the server; with SIGKILL, its workers die too (as in a power cut), and are gone
        when this returns: an orphaned worker would keep serving on the database and the port."""
        assert self.process is not None
        if sig == signal.SIGKILL and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)  # frozen, the master cannot fork a new worker
            workers = self.worker_pids()
            self.process.kill()
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while any(pid_alive(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.process.poll() is None:
            if sig is None:
                self.process.terminate()
            else:
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace")


def pid_alive(pid: int) -> bool:
    """True while the process runs; a zombie (dead, not yet reaped by its new parent) is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def child_pids(parent: int) -> list[int]:
    """Live children of a process, from /proc (Linux): gunicorn's workers of its master."""
    children = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while scanning
        if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            children.append(int(stat_path.parent.name))
    return children


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(config_text: str | Callable[[int], str] = "", workers: int = 2) -> ServeProcess:
        server = ServeProcess(config_text, tmp_path, workers).start()
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One throwaway PostgreSQL server for the whole run (started on first use)."""
    from tests.postgres_test_server import PostgresServer

    server = PostgresServer().init().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server: Any) -> str:
    """The URL of a new, empty database on the test server."""
    if not postgres_server.running():  # a test that stopped it failed before restarting it
        postgres_server.start()
    return postgres_server.create_database()
