"""Running one workload: check its answer, then load the service and the baseline in turn.

The two servers are measured alternately at each concurrency level (baseline, then service), so
a slow drift of the machine (another VM, thermal limits) shifts both sides of each ratio alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench import cpu
from bench.loadgen import Point, run_wrk
from bench.servers import ServerProcess
from bench.workloads import Workload, record_sizes


class WorkloadBroken(RuntimeError):
    """A workload's answer is not the expected card: measuring it would measure a failure."""


@dataclass(frozen=True)
class LoadSettings:
    wrk: str
    connections: tuple[int, ...]
    duration_s: int
    warmup_s: int
    wrk_threads: int
    log: Path
    close: bool = True  # Connection: close (see loadgen.run_wrk)
    # A point during which other processes used more than this many cores is measured again,
    # up to `retries` times; the least disturbed attempt is kept.
    max_other_cores: float = 0.25
    retries: int = 2
    # Each level is measured this many times, baseline and service in turn, and the round with
    # the median throughput ratio is the point: on a shared machine a burst of load from another
    # VM moves one round, not the median. Every round's errors count.
    rounds: int = 1


def _expect_marker(text: str, key: str, value: str) -> str:
    """The exact bytes the answer uses for `"key": "value"`, for post.lua's substring check."""
    for marker in (f'"{key}":"{value}"', f'"{key}": "{value}"'):
        if marker in text:
            return marker
    raise WorkloadBroken(f"answer does not contain {key} {value!r} as plain JSON text")


def check_service(url: str, workload: Workload, body: bytes) -> dict[str, Any]:
    """POST once, time it, and require a 200 with the workload's card (no 412, no empty list)."""
    started = time.perf_counter()
    response = requests.post(
        f"{url}{workload.path}", data=body, timeout=30, headers={"Content-Type": "application/json"}
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise WorkloadBroken(f"{workload.name}: HTTP {response.status_code}: {response.text[:500]}")
    cards = response.json().get("cards") or []
    found = [(c.get("indicator"), c.get("source", {}).get("topic", {}).get("code")) for c in cards]
    if (workload.indicator, workload.finding) not in found:
        raise WorkloadBroken(
            f"{workload.name}: expected a {workload.indicator} "
            f"{workload.finding} card, got {found or 'no card'}"
        )
    return {
        "status": response.status_code,
        "indicator": workload.indicator,
        "finding": workload.finding,
        "first_request_ms": round(elapsed_ms, 1),
        "expect": _expect_marker(response.text, "indicator", workload.indicator),
    }


def check_baseline(url: str, workload: Workload, body: bytes) -> str:
    response = requests.post(
        f"{url}{workload.path}", data=body, timeout=30, headers={"Content-Type": "application/json"}
    )
    if response.status_code != 200 or response.json() != {"cards": []}:
        raise WorkloadBroken(f"baseline: HTTP {response.status_code}: {response.text[:200]}")
    return '"cards":[]' if '"cards":[]' in response.text else '"cards": []'


def load_point(
    settings: LoadSettings,
    server: ServerProcess,
    workload: Workload,
    body_file: Path,
    expect: str,
    connections: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """One point on `server`: a warm-up, then a measured run, redone (up to `retries` times) if
    other processes took more than `max_other_cores`; the least disturbed run is kept."""
    url = f"{server.url}{workload.path}"

    def wrk(seconds: int) -> Point:
        return run_wrk(
            settings.wrk,
            url,
            body_file,
            expect,
            connections,
            seconds,
            settings.wrk_threads,
            settings.log,
            settings.close,
        )

    if settings.warmup_s > 0:
        # Same concurrency as the measurement: every worker thread is in use, caches are
        # filled and first-request costs are paid before the clock runs.
        wrk(settings.warmup_s)
    best: dict[str, Any] | None = None
    for attempt in range(1, settings.retries + 2):
        before = cpu.snapshot(server.current_workers())
        started = time.monotonic()
        point = wrk(settings.duration_s)
        used = cpu.usage(
            before, cpu.snapshot(list(before.workers)), point.requests, time.monotonic() - started
        )
        server.check_alive()
        measured = {**point.as_json(), "cpu": used, "attempt": attempt}
        if best is None or used["other_cores"] < best["cpu"]["other_cores"]:
            best = measured
        if used["other_cores"] <= settings.max_other_cores or attempt > settings.retries:
            break
        progress(
            f"    {server.name}: other processes used {used['other_cores']} cores "
            "during the run; measuring again"
        )
    assert best is not None
    return best


def write_body(workdir: Path, workload: Workload) -> tuple[bytes, Path]:
    """The workload's request body, and the file in `workdir` that wrk sends it from."""
    body = workload.body_bytes()
    body_file = workdir / f"{workload.name}.json"
    body_file.write_bytes(body)
    return body, body_file


def answer_checked(workload: Workload, check: dict[str, Any]) -> str:
    """The progress line for a service's answer checked by check_service."""
    return (
        f"{workload.name}: answer checked ({workload.indicator} {workload.finding}), "
        f"first request {check['first_request_ms']} ms"
    )


def memory_and_restarts(
    server: ServerProcess, started_workers: list[int]
) -> tuple[dict[str, Any], int]:
    """Each live worker's memory with the peak over them, and how many workers gunicorn started
    since `started_workers` (a restart after a timeout or crash mid-load)."""
    memory = server.worker_memory()
    summary = {
        "workers": memory,
        "peak_rss_mb": round(max((m["peak_kb"] for m in memory), default=0) / 1024, 1),
    }
    return summary, len(set(server.current_workers()) - set(started_workers))


def run_workload(
    settings: LoadSettings,
    workload: Workload,
    new_service: Callable[[], ServerProcess],
    baseline: ServerProcess,
    workdir: Path,
    progress: Callable[[str], None] = print,
    after_point: Callable[[], None] = lambda: None,
    own_baseline: ServerProcess | None = None,
) -> dict[str, Any]:
    """All concurrency levels of one workload, on a freshly started service (so peak RSS and
    the first request are this workload's own). `baseline` is the bare app under the fastest
    settings found; `own_baseline`, if given, the same app under the service's own settings,
    measured too so both ratios are reported."""
    body, body_file = write_body(workdir, workload)
    result: dict[str, Any] = {
        "name": workload.name,
        "title": workload.title,
        "service_id": workload.service_id,
        "body_bytes": len(body),
        "record": record_sizes(workload.body),
        "uses_fhir_server": workload.uses_fhir_server,
    }
    baseline_expect = check_baseline(baseline.url, workload, body)
    if own_baseline is not None:
        check_baseline(own_baseline.url, workload, body)
    with new_service() as service:  # starts it
        started_workers = service.worker_pids
        result["check"] = check_service(service.url, workload, body)
        progress(answer_checked(workload, result["check"]))
        points = []
        for connections in settings.connections:
            rounds = []
            for _ in range(max(1, settings.rounds)):
                measured: dict[str, dict[str, Any]] = {}
                for side, server, expect in (
                    ("baseline", baseline, baseline_expect),
                    ("service", service, result["check"]["expect"]),
                    ("baseline_own", own_baseline, baseline_expect),
                ):
                    if server is not None:
                        measured[side] = load_point(
                            settings, server, workload, body_file, expect, connections, progress
                        )
                        after_point()
                rounds.append(measured)
            chosen = _median_round(rounds)
            own, base = chosen["service"], chosen["baseline"]
            rps, base_rps = own["throughput_rps"], base["throughput_rps"]
            ratio = rps / base_rps if base_rps else 0.0
            point: dict[str, Any] = {
                "connections": connections,
                "service": own,
                "baseline": base,
                "throughput_ratio": round(ratio, 3),
            }
            if len(rounds) > 1:
                point["rounds"] = [_round_summary(measured) for measured in rounds]
            if own_baseline is not None:
                same = chosen["baseline_own"]
                same_rps = same["throughput_rps"]
                point["baseline_own"] = same
                point["throughput_ratio_own"] = round(rps / same_rps if same_rps else 0.0, 3)
            points.append(point)
            latency = own["latency_ms"]
            if "throughput_ratio_own" in point:
                progress(
                    f"  {connections:>3} conn: baseline under the service's own settings "
                    f"{point['baseline_own']['throughput_rps']:8.1f} req/s, "
                    f"{point['throughput_ratio_own']:.2f}x"
                )
            if len(rounds) > 1:
                ratios = ", ".join(f"{r['throughput_ratio']:.2f}x" for r in point["rounds"])
                progress(f"  {connections:>3} conn: rounds {ratios}; the median one follows")
            progress(
                f"  {connections:>3} conn: {rps:8.1f} req/s (baseline {base_rps:8.1f}, "
                f"{ratio:.2f}x)  p50 {latency['p50']:.2f} p90 {latency['p90']:.2f} "
                f"p99 {latency['p99']:.2f} ms  CPU {own['cpu']['ms_per_request']} ms/req "
                f"(baseline {base['cpu']['ms_per_request']})  "
                f"errors {own['errors']['total']}"
            )
        result["memory"], result["worker_restarts"] = memory_and_restarts(service, started_workers)
    result["points"] = points
    return result


def _ratio(measured: dict[str, Any]) -> float:
    base = measured["baseline"]["throughput_rps"]
    return measured["service"]["throughput_rps"] / base if base else 0.0


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput ratio (of an even number, the lower middle one)."""
    return sorted(rounds, key=_ratio)[(len(rounds) - 1) // 2]


def _round_summary(measured: dict[str, Any]) -> dict[str, Any]:
    own, base = measured["service"], measured["baseline"]
    base_cpu = base["cpu"]["ms_per_request"]
    return {
        "throughput_ratio": round(_ratio(measured), 3),
        "cpu_ratio": round(own["cpu"]["ms_per_request"] / base_cpu, 3) if base_cpu else None,
        "service_cpu_ms": own["cpu"]["ms_per_request"],
        "errors": sum(side["errors"]["total"] for side in measured.values()),
    }
