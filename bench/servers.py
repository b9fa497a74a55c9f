"""Starting the servers under test as real gunicorn processes, and reading their workers' memory.

Both are started the same way (a subprocess whose pid is the gunicorn master), on a free loopback
port, with their output in a log file, and counted as ready only when /healthz answers and every
worker has been forked, so the first measured request never races a booting worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import requests

from bench import ROOT

START_TIMEOUT_SECONDS = 60.0


class ServerError(RuntimeError):
    """A server under test did not start or died; the message includes the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (gunicorn workers of a master), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may contain spaces: split after the last ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a process, in kB; {} if it has exited."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0])
    except OSError:
        return {}
    return values


class ServerProcess:
    """One gunicorn master and its workers; `command` must bind to `self.port`."""

    def __init__(
        self,
        name: str,
        command: list[str],
        port: int,
        workdir: Path,
        workers: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.workers = workers
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.worker_pids: list[int] = []
        self._log: IO[bytes] | None = None

    def start(self) -> ServerProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=self.workdir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited at start:\n{self.log_tail()}")
            self.worker_pids = children(self.process.pid)
            if len(self.worker_pids) == self.workers and self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerError(
            f"{self.name} did not start in {START_TIMEOUT_SECONDS:g} s:\n{self.log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise ServerError(f"{self.name} is not running:\n{self.log_tail()}")

    def current_workers(self) -> list[int]:
        assert self.process is not None
        return children(self.process.pid)

    def worker_memory(self) -> list[dict[str, int]]:
        """Per live worker: pid, peak and current RSS in kB (peak since the worker was forked)."""
        rows = []
        for pid in self.current_workers():
            memory = memory_kb(pid)
            if memory:
                rows.append(
                    {
                        "pid": pid,
                        "peak_kb": memory.get("VmHWM", 0),
                        "rss_kb": memory.get("VmRSS", 0),
                    }
                )
        return rows

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # gunicorn: graceful shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _clean_env() -> dict[str, str]:
    # The bench's own configuration file is the only one the service reads.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLARE_CDS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def service_command(port: int, workers: int, threads: int, config: Path) -> list[str]:
    """`flare-cds serve`: the installed console script when there is one, as production runs."""
    script = Path(sys.executable).with_name("flare-cds")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "service.serving.cli"]
    return [*launcher, *serve_arguments(port, workers, threads, config)]


def serve_arguments(port: int, workers: int, threads: int, config: Path) -> list[str]:
    """The `serve` subcommand and its options, as the bench starts the service."""
    return [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--config",
        str(config),
    ]


def service_server(workdir: Path, config: Path, workers: int, threads: int) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        "flare-cds",
        service_command(port, workers, threads, config),
        port,
        workdir,
        workers,
        _clean_env(),
    )


def no_clinical_path_server(
    workdir: Path, config: Path, workers: int, threads: int
) -> ServerProcess:
    """The service as `service_server` starts it, but for its clinical path (bench.no_rules)."""
    port = free_port()
    return ServerProcess(
        "flare-cds-no-clinical-path",
        [sys.executable, "-m", "bench.no_rules", *serve_arguments(port, workers, threads, config)],
        port,
        workdir,
        workers,
        _clean_env(),
    )


def baseline_server(
    workdir: Path, workers: int, threads: int, server: str = "flare-cds"
) -> ServerProcess:
    """The baseline app under `server` settings (bench.baseline_app.SERVERS)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.baseline_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--server",
        server,
    ]
    name = f"baseline-{server}-{workers}w" + (f"x{threads}t" if server == "gthread" else "")
    return ServerProcess(name, command, port, workdir, workers, _clean_env())


def service_config(
    workdir: Path, fhir_base_url: str, deadline_seconds: float, max_body_bytes: int | None = None
) -> Path:
    """The service's settings for the run: a private store, and the loopback FHIR server allowed.

    Authentication stays off (the default): the bench measures the hook work, and a signed JWT
    per request would make wrk's fixed body impossible.
    """
    config = workdir / "flare-cds.toml"
    config.write_text(
        "[storage]\n"
        f'database = "{workdir / "flare-cds.sqlite3"}"\n\n'
        "[fhir]\n"
        f'allowed_servers = ["{fhir_base_url}"]\n'
        # The loopback server adds 50 ms per query; the default 0.45 s deadline would fit too, but
        # queued requests at 32 connections must not turn the measurement into 412s.
        f"deadline_seconds = {deadline_seconds}\n"
        + ("" if max_body_bytes is None else f"\n[http]\nmax_body_bytes = {max_body_bytes}\n"),
        "utf-8",
    )
    return config
