"""What a run found: the machine, the targets from the issue, results.json and results.md.

Targets are data (TARGETS) evaluated against the results dict, so the JSON and the Markdown table
cannot disagree. A target whose concurrency level was not measured (e.g. `--quick`) is reported as
"not measured", never as passed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.growth import growth_markdown
from bench.latency_split import split_markdown
from bench.stages import stages_markdown

Result = dict[str, Any]
FULL_PREFETCH = ("order-sign-high", "order-sign-low", "patient-view-flare")
ALL = (*FULL_PREFETCH, "order-sign-no-prefetch")
SATURATED_CONNECTIONS = 8  # from here on both servers are CPU-bound


def machine_info(wrk_version: str) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = next(int(x.split()[1]) for x in meminfo if x.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "wrk": wrk_version,
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "commit": _commit(),
    }


def _commit() -> str:
    """The commit measured, marked when the work tree differs from it."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "service", "bench")
    return f"{head} (with uncommitted changes)" if changed else head


def _point(result: Result, connections: int) -> Result | None:
    return next((p for p in result["points"] if p["connections"] == connections), None)


def _p50_at_1(result: Result) -> tuple[float | None, str]:
    point = _point(result, 1)
    return (point["service"]["latency_ms"]["p50"], "1 conn") if point else (None, "1 conn")


def _p99_at_8(result: Result) -> tuple[float | None, str]:
    point = _point(result, 8)
    return (point["service"]["latency_ms"]["p99"], "8 conn") if point else (None, "8 conn")


def _p99_at_32(result: Result) -> tuple[float | None, str]:
    point = _point(result, 32)
    return (point["service"]["latency_ms"]["p99"], "32 conn") if point else (None, "32 conn")


def _ratio_saturated(result: Result) -> tuple[float | None, str]:
    """The worst throughput ratio where both servers are saturated (>= 8 connections)."""
    points = [p for p in result["points"] if p["connections"] >= SATURATED_CONNECTIONS]
    if not points:
        return None, f">= {SATURATED_CONNECTIONS} conn"
    worst = min(points, key=lambda p: p["throughput_ratio"])
    return worst["throughput_ratio"], f"{worst['connections']} conn (worst of >= 8)"


def _cpu_ratio(result: Result) -> tuple[float | None, str]:
    """Service CPU per call over the baseline's, at the saturated points (the worst of them)."""
    ratios = []
    for point in result["points"]:
        own, base = point["service"]["cpu"], point["baseline"]["cpu"]
        if point["connections"] >= SATURATED_CONNECTIONS and base["ms_per_request"]:
            ratios.append((own["ms_per_request"] / base["ms_per_request"], point["connections"]))
    if not ratios:
        return None, f">= {SATURATED_CONNECTIONS} conn"
    worst, connections = max(ratios)
    return round(worst, 3), f"{connections} conn (worst of >= 8)"


def _peak_rss(result: Result) -> tuple[float | None, str]:
    return result["memory"]["peak_rss_mb"], "max over workers"


def _point_errors(point: Result) -> int:
    """Errors of every round measured at this point, not only the round shown."""
    if "rounds" in point:
        return sum(r["errors"] for r in point["rounds"])
    return int(point["service"]["errors"]["total"] + point["baseline"]["errors"]["total"])


def _errors(result: Result) -> tuple[float | None, str]:
    total = sum(_point_errors(p) for p in result["points"])
    return float(total + result["worker_restarts"]), "all points, service + baseline"


@dataclass(frozen=True)
class Target:
    name: str
    workloads: tuple[str, ...]
    measure: Callable[[Result], tuple[float | None, str]]
    op: str  # "<", "<=" or ">="
    limit: float
    unit: str
    aim: float | None = None  # a stretch goal, reported but not required

    def check(self, value: float) -> bool:
        if self.op == "<":
            return value < self.limit
        if self.op == "<=":
            return value <= self.limit
        return value >= self.limit


TARGETS = (
    # Against the bare app under the fastest server settings found on the machine.
    Target("throughput vs baseline", FULL_PREFETCH, _ratio_saturated, ">=", 0.5, "x"),
    Target("CPU per call vs baseline", FULL_PREFETCH, _cpu_ratio, "<=", 2.0, "x"),
    Target("p50 latency at 1 connection", FULL_PREFETCH, _p50_at_1, "<", 3.0, "ms"),
    Target("p99 latency at 8 connections", FULL_PREFETCH, _p99_at_8, "<", 25.0, "ms"),
    # 50 ms of injected FHIR delay plus at most 15 ms of the service's own work.
    Target("p50 latency at 1 connection", ("order-sign-no-prefetch",), _p50_at_1, "<=", 65.0, "ms"),
    # Calls waiting on the FHIR server must not queue for a thread: 32 of them at once, each
    # needing three 50 ms queries, still answer in well under the ~500 ms a client waits.
    Target(
        "p99 latency at 32 connections", ("order-sign-no-prefetch",), _p99_at_32, "<", 500.0, "ms"
    ),
    Target("peak RSS per worker", ALL, _peak_rss, "<", 100.0, "MB"),
    Target("errors (non-2xx, socket, wrong body, worker restarts)", ALL, _errors, "<=", 0.0, ""),
)


def evaluate_targets(results: list[Result]) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in results}
    rows = []
    for target in TARGETS:
        for name in target.workloads:
            if name not in by_name:
                continue
            value, where = target.measure(by_name[name])
            row: dict[str, Any] = {
                "target": target.name,
                "workload": name,
                "where": where,
                "limit": f"{target.op} {target.limit:g}{target.unit}",
                "value": value,
                "passed": None if value is None else target.check(value),
            }
            if target.aim is not None and value is not None:
                row["aim"] = f">= {target.aim:g}{target.unit}"
                row["aim_met"] = value >= target.aim
            rows.append(row)
    return rows


def _search_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    levels = list(rows[0]["throughput_rps"])
    lines = [
        "",
        "## Baseline server settings",
        "",
        "The bare app under each candidate, on the first full-prefetch body; the one with the "
        "highest throughput at its worst level of 8 connections or more is the baseline above.",
        "",
        "| Settings | " + " | ".join(f"req/s at {c} conn" for c in levels) + " | Chosen |",
        "|---|" + "---:|" * len(levels) + "---|",
    ]
    for row in rows:
        rates = " | ".join(_fmt(row["throughput_rps"][c]) for c in levels)
        lines.append(f"| {row['settings']} | {rates} | {'yes' if row['chosen'] else ''} |")
    return [*lines, ""]


def write_json(document: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n", "utf-8")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _result_word(passed: bool | None) -> str:
    return {True: "PASS", False: "**FAIL**", None: "not measured"}[passed]


def render_markdown(document: dict[str, Any]) -> str:
    machine, settings = document["machine"], document["settings"]
    lines = [
        "# flare-cds benchmark",
        "",
        f"- Date: {machine['date']}",
        f"- Machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_gb']} GB RAM, {machine['os']}",
        f"- Python {machine['python']}; load generator: {machine['wrk']}",
        f"- Commit measured: {machine.get('commit', 'unknown')}",
        f"- Service: `flare-cds serve`, gunicorn with its gevent worker, {settings['workers']} "
        "workers",
        f"- Baseline (bench/baseline_app.py, a bare Flask app): under "
        f"{document['baseline'].get('settings', 'the service settings')}, the fastest found "
        "(table below); also measured under the service's own settings",
        f"- Each point: {settings['warmup_s']} s warm-up, then {settings['duration_s']} s "
        f"measured with `wrk -t{settings['wrk_threads']} -c<conn> --latency`, "
        f"connections: {settings['connection']}" + (" (quick mode)" if settings["quick"] else ""),
        *(
            [
                f"- Each level measured {settings['rounds']} times, baseline and service in turn; "
                "shown is the round with the median throughput ratio (all rounds: "
                "`rounds` in results.json), errors counted over all rounds"
            ]
            if settings.get("rounds", 1) > 1
            else []
        ),
        f"- No-prefetch workload: loopback FHIR server adding {settings['fhir_delay_ms']:g} ms "
        "per query and keeping HTTP/1.1 connections open, as production FHIR servers do; "
        f"`[fhir] deadline_seconds = {settings['fhir_deadline_s']:g}`",
        "",
        "## Throughput and latency",
        "",
        "| Workload | Conn | req/s | Baseline req/s | Ratio | Ratio, own settings | p50 ms "
        "| p90 ms | p99 ms | Baseline p50 ms | CPU ms/req | Baseline CPU ms/req | Errors "
        "| Other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in document["workloads"]:
        for point in result["points"]:
            service, baseline = point["service"], point["baseline"]
            latency = service["latency_ms"]
            errors = service["errors"]["total"] + baseline["errors"]["total"]
            other = max(service["cpu"]["other_cores"], baseline["cpu"]["other_cores"])
            own = point.get("throughput_ratio_own")
            own_text = "-" if own is None else f"{own:.2f}x"
            lines.append(
                f"| {result['name']} | {point['connections']} | "
                f"{_fmt(service['throughput_rps'])} | {_fmt(baseline['throughput_rps'])} | "
                f"{point['throughput_ratio']:.2f}x | {own_text} | {_fmt(latency['p50'], 2)} | "
                f"{_fmt(latency['p90'], 2)} | {_fmt(latency['p99'], 2)} | "
                f"{_fmt(baseline['latency_ms']['p50'], 2)} | "
                f"{_fmt(service['cpu']['ms_per_request'], 2)} | "
                f"{_fmt(baseline['cpu']['ms_per_request'], 2)} | {errors} | {other:.2f} |"
            )
    lines += [
        "",
        "## Per workload",
        "",
        "| Workload | Request | Body KB | Card checked | First request ms "
        "| Peak RSS/worker MB | Worker restarts |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for result in document["workloads"]:
        record = ", ".join(f"{k} {v}" for k, v in result["record"].items()) or "no prefetch"
        lines.append(
            f"| {result['name']} | {result['title']}; {record} | "
            f"{result['body_bytes'] / 1024:,.0f} | {result['check']['indicator']} "
            f"{result['check']['finding']} | {_fmt(result['check']['first_request_ms'])} | "
            f"{_fmt(result['memory']['peak_rss_mb'])} | {result['worker_restarts']} |"
        )
    baseline_rss = document.get("baseline", {}).get("peak_rss_mb")
    lines += [
        "",
        f"Baseline app peak RSS per worker: {_fmt(baseline_rss)} MB.",
        *_search_markdown(document.get("baseline", {}).get("search") or []),
        *(stages_markdown(document["stages"]) if document.get("stages") else []),
        *(
            ["", *split_markdown(document["latency_split"], settings.get("rounds", 1))]
            if document.get("latency_split")
            else []
        ),
        "",
        "## Targets",
        "",
        "| Target | Workload | Measured at | Value | Limit | Result |",
        "|---|---|---|---:|---|---|",
    ]
    for row in document["targets"]:
        aim = ""
        if "aim" in row:
            aim = f" (aim {row['aim']}: {'met' if row['aim_met'] else 'not met'})"
        # Three decimals for ratios, so 0.298 is not shown as a failing "0.30".
        value = _fmt(row["value"], 3 if row["limit"].endswith("x") else 2)
        lines.append(
            f"| {row['target']} | {row['workload']} | {row['where']} | {value} | "
            f"{row['limit']} | {_result_word(row['passed'])}{aim} |"
        )
    growth = document.get("growth") or {}
    if growth.get("rows"):
        lines += ["", *growth_markdown(growth["rows"], growth.get("plot"))]
    passed = document["passed"]
    lines += ["", f"**Overall: {'all measured targets pass' if passed else 'a target FAILED'}.**"]
    if document.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in document["notes"]]
    return "\n".join(lines) + "\n"
