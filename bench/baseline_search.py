"""The fastest server settings for the baseline app on this machine, found by measuring them.

A ratio against a baseline is only as honest as the baseline: a bare echo under the service's
own gevent worker is slower than under plain sync workers, so the service's throughput is
compared with the best the bare app reaches here. Each candidate is loaded at every measured
concurrency level on the same body the workloads use; the one with the highest throughput at
its worst saturated level (8 connections or more) wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import run_wrk
from bench.report import SATURATED_CONNECTIONS
from bench.runner import check_baseline
from bench.servers import ServerProcess, baseline_server
from bench.workloads import Workload


@dataclass(frozen=True)
class Candidate:
    server: str  # bench.baseline_app.SERVERS
    workers: int
    threads: int = 1

    @property
    def label(self) -> str:
        if self.server == "gthread":
            return f"gthread {self.workers} workers x {self.threads} threads"
        if self.server == "sync":
            return f"sync, {self.workers} workers"
        return f"the service's own (gevent worker), {self.workers} workers"

    def process(self, workdir: Path) -> ServerProcess:
        """The baseline under these settings, not yet started (`with` starts and stops it)."""
        return baseline_server(workdir, self.workers, self.threads, self.server)


def candidates(workers: int, cores: int) -> tuple[Candidate, ...]:
    """The service's own settings first, then plain sync and gthread workers, one and two per
    core (sync workers cannot overlap a request with reading the next one)."""
    found = [Candidate("flare-cds", workers)]
    for count in sorted({max(1, cores), 2 * max(1, cores), workers}):
        found.append(Candidate("sync", count))
    found.append(Candidate("gthread", workers, 4))
    return tuple(found)


def search(
    options: Sequence[Candidate],
    workdir: Path,
    wrk: str,
    workload: Workload,
    body_file: Path,
    connections: Sequence[int],
    seconds: int,
    close: bool = True,
    progress: Callable[[str], None] = print,
) -> tuple[Candidate, list[dict[str, Any]]]:
    """The fastest candidate, and what each one measured (req/s per concurrency level). Each
    candidate's answer to `workload` is checked before it is loaded."""
    rows = []
    best: tuple[float, Candidate] | None = None
    body = body_file.read_bytes()
    for candidate in options:
        with candidate.process(workdir) as server:
            expect = check_baseline(server.url, workload, body)
            url = f"{server.url}{workload.path}"
            run_wrk(wrk, url, body_file, expect, max(connections), 1, close=close)  # warm-up
            rates = {}
            for level in connections:
                point = run_wrk(wrk, url, body_file, expect, level, seconds, close=close)
                if point.error_total:
                    rates[level] = 0.0  # a setting that drops requests is not a baseline
                else:
                    rates[level] = round(point.throughput_rps, 1)
        # The throughput targets are set where both servers are saturated (8 connections and
        # more), so that is where the fastest is chosen; one connection only if nothing else ran.
        saturated = [rate for level, rate in rates.items() if level >= SATURATED_CONNECTIONS]
        worst = min(saturated or rates.values())
        rows.append({"settings": candidate.label, "throughput_rps": rates, "worst": worst})
        progress(
            f"  baseline under {candidate.label}: "
            + ", ".join(f"{rate:.0f} req/s at {level}" for level, rate in rates.items())
        )
        if best is None or worst > best[0]:
            best = (worst, candidate)
    assert best is not None
    for row in rows:
        row["chosen"] = row["settings"] == best[1].label
    return best[1], rows
