"""The load generator: wrk, driven by bench/post.lua, its results read back as JSON.

wrk is a small C program on epoll: one thread keeps 32 connections busy with a few percent of
one core, where a Python load generator would take a whole core from the two gunicorn workers on a
2-core machine and measure itself. It is never skipped silently: if it is missing the bench says
how to install it, and installs it itself only when it runs as root with apt-get available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import BENCH_DIR

LUA_SCRIPT = BENCH_DIR / "post.lua"
INSTALL_HINT = (
    "wrk (the HTTP load generator) is not installed. Install the Debian/Ubuntu package:\n"
    "    sudo apt-get update && sudo apt-get install -y wrk\n"
    "(other systems: https://github.com/wg/wrk/blob/master/INSTALL), then run `make bench` again."
)
MARKER = "BENCH_RESULT "


class WrkMissing(RuntimeError):
    """wrk is not installed and could not be installed; the message says how to install it."""


class WrkFailed(RuntimeError):
    """wrk ran but gave no result (bad URL, crash); the message holds its output."""


def find_wrk(install: bool = True) -> str:
    """The path of wrk, installing it with apt-get when allowed (root, apt-get present)."""
    path = shutil.which("wrk")
    if path:
        return path
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: wrk is missing; installing it: apt-get install -y wrk", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        attempts = (
            ["apt-get", "install", "-y", "wrk"],
            # A fresh container has no package lists yet: fetch them, then try again.
            ["apt-get", "update"],
            ["apt-get", "install", "-y", "wrk"],
        )
        for command in attempts:
            result = subprocess.run(
                command, env=env, capture_output=True, text=True, check=False, timeout=600
            )
            if command[1] == "install" and result.returncode == 0:
                break
        path = shutil.which("wrk")
        if path:
            return path
        raise WrkMissing(f"apt-get could not install wrk.\n{INSTALL_HINT}")
    raise WrkMissing(INSTALL_HINT)


def wrk_version(wrk: str) -> str:
    # wrk has no --version; its usage text starts with the version line.
    result = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).splitlines()
    return lines[0].split(" Copyright")[0].strip() if lines else "unknown"


@dataclass(frozen=True)
class Point:
    """One wrk run: throughput, latency percentiles in ms, and every kind of error."""

    connections: int
    requests: int
    duration_s: float
    throughput_rps: float
    latency_ms: dict[str, float]
    errors: dict[str, int]

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "requests": self.requests,
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": round(self.throughput_rps, 1),
            "latency_ms": self.latency_ms,
            "errors": {**self.errors, "total": self.error_total},
        }


def parse_result(stdout: str, connections: int) -> Point:
    """The JSON line post.lua's done() printed, as a Point."""
    line = next((x for x in stdout.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise WrkFailed(f"wrk printed no result:\n{stdout[-2000:]}")
    raw = json.loads(line[len(MARKER) :])
    duration_s = raw["duration_us"] / 1e6
    errors = dict(raw["errors"])
    # wrk's "status" counts answers outside 2xx/3xx; the report calls them non_2xx.
    errors["non_2xx"] = errors.pop("status")
    return Point(
        connections=connections,
        requests=raw["requests"],
        duration_s=duration_s,
        throughput_rps=raw["requests"] / duration_s if duration_s else 0.0,
        latency_ms={k: round(v / 1000, 3) for k, v in raw["latency_us"].items()},
        errors=errors,
    )


def run_wrk(
    wrk: str,
    url: str,
    body_file: Path,
    expect: str,
    connections: int,
    seconds: int,
    threads: int = 1,
    log: Path | None = None,
    close: bool = True,
) -> Point:
    """Load `url` with POSTs of `body_file` for `seconds` over `connections` connections.

    `close` sends `Connection: close`, one TCP connection per request, as gunicorn sees traffic
    behind a default nginx. With keep-alive, gthread keeps each connection on the worker that
    accepted it, and all 8 of wrk's connections often land on one worker: the run then measures
    one worker of two, by chance.
    """
    threads = max(1, min(threads, connections))  # wrk needs connections >= threads
    command = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]
    if close:
        command[1:1] = ["-H", "Connection: close"]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_EXPECT": expect}
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, timeout=seconds + 60
    )
    if log is not None:
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        raise WrkFailed(f"wrk exited with {result.returncode}:\n{result.stderr[-2000:]}")
    return parse_result(result.stdout, connections)
