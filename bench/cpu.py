"""Where the CPU went during one measured point: server workers, wrk, the bench, everything else.

Two reasons to count it. CPU milliseconds per request is the cost of a request whatever the
scheduling luck, so it stays comparable when throughput is not. And on a shared 2-core machine
another process (a test suite, a build) steals cores mid-run: "other" CPU says how much, so a
disturbed point can be measured again instead of being reported as the service's own slowness.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (stat fields 14, 15)


def _machine_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / _TICKS, total / _TICKS


def _own_s() -> tuple[float, float]:
    """CPU seconds of this process (with the loopback FHIR server's threads) and of its
    waited-for children (each finished wrk run)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Snapshot:
    workers: dict[int, float]
    machine_busy: float
    machine_total: float
    bench: float
    children: float


def snapshot(worker_pids: list[int]) -> Snapshot:
    busy, total = _machine_s()
    bench, children = _own_s()
    return Snapshot({pid: process_cpu_s(pid) for pid in worker_pids}, busy, total, bench, children)


def usage(before: Snapshot, after: Snapshot, requests: int, wall_s: float) -> dict[str, object]:
    """The CPU of one point; `other_cores` is what neither the servers nor the bench used."""
    workers = {pid: after.workers.get(pid, 0.0) - before.workers[pid] for pid in before.workers}
    worker_s = sum(workers.values())
    wrk_s = after.children - before.children
    bench_s = after.bench - before.bench
    busy_s = after.machine_busy - before.machine_busy
    # Other servers' idle workers cost next to nothing; this is load from outside the bench.
    other_s = max(0.0, busy_s - worker_s - wrk_s - bench_s)
    elapsed = wall_s or 1.0
    return {
        "ms_per_request": round(worker_s * 1000 / requests, 3) if requests else None,
        "worker_s": [round(workers[pid], 2) for pid in sorted(workers)],
        "wrk_s": round(wrk_s, 2),
        "bench_s": round(bench_s, 2),
        "other_cores": round(other_s / elapsed, 2),
        "idle_cores": round(
            max(0.0, (after.machine_total - before.machine_total) - busy_s) / elapsed, 2
        ),
    }
