"""Latency at one connection, with and without the clinical path, measured side by side.

At one connection a call's latency is about its CPU, so the p50 target is a question of where
that CPU goes. For each full-prefetch workload three servers answer the same body at one
connection in turn, `rounds` times: the service, the service without its clinical path
(bench.no_rules: finding the orders, gathering the record, the rules, the card and its record
left out) and the baseline. The medians split the service's p50 into the clinical path and
everything a call pays around it (server, framework, middleware, decoding, contract).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.runner import LoadSettings, check_baseline, check_service, load_point, write_body
from bench.servers import ServerProcess
from bench.workloads import Workload

SIDES = ("service", "no_clinical_path", "baseline")
SIDE_TITLES = {
    "service": "Service",
    "no_clinical_path": "Service without its clinical path",
    "baseline": "Baseline",
}


def measure_split(
    settings: LoadSettings,
    workloads: Sequence[Workload],
    new_service: Callable[[], ServerProcess],
    new_no_clinical_path: Callable[[], ServerProcess],
    baseline: ServerProcess,
    workdir: Path,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per full-prefetch workload: each side's median p50 and CPU per call at one
    connection over the rounds, and the errors of every round."""
    one = dataclasses.replace(settings, connections=(1,))
    rows = []
    for workload in workloads:
        if workload.uses_fhir_server:
            continue  # its time is the FHIR server's delay, not the service's CPU
        body, body_file = write_body(workdir, workload)
        baseline_expect = check_baseline(baseline.url, workload, body)
        with new_service() as service, new_no_clinical_path() as bare:
            sides = (
                ("service", service, check_service(service.url, workload, body)["expect"]),
                # Its answer is the baseline's: a 200 with no cards, so the contract passed.
                ("no_clinical_path", bare, check_baseline(bare.url, workload, body)),
                ("baseline", baseline, baseline_expect),
            )
            points: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
            for _ in range(max(1, settings.rounds)):
                for side, server, expect in sides:
                    points[side].append(
                        load_point(one, server, workload, body_file, expect, 1, progress)
                    )
        row: dict[str, Any] = {"name": workload.name}
        for side in SIDES:
            row[side] = _medians(points[side])
        row["clinical_path_p50_ms"] = round(
            row["service"]["p50_ms"] - row["no_clinical_path"]["p50_ms"], 2
        )
        rows.append(row)
        progress(
            f"{workload.name} at 1 conn: p50 {row['service']['p50_ms']:.2f} ms, without the "
            f"clinical path {row['no_clinical_path']['p50_ms']:.2f} ms, baseline "
            f"{row['baseline']['p50_ms']:.2f} ms"
        )
    return rows


def _medians(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "p50_ms": round(statistics.median(p["latency_ms"]["p50"] for p in points), 2),
        "cpu_ms": round(statistics.median(p["cpu"]["ms_per_request"] for p in points), 2),
        "p50_rounds_ms": [p["latency_ms"]["p50"] for p in points],
        "errors": sum(p["errors"]["total"] for p in points),
    }


def split_targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """No error on any side of any round: an error would make a side look faster than it is."""
    targets = []
    for row in rows:
        errors = sum(row[side]["errors"] for side in SIDES)
        targets.append(
            {
                "target": "errors (non-2xx, socket, wrong body)",
                "workload": row["name"],
                "where": "1 conn, service / without clinical path / baseline",
                "value": errors,
                "limit": "<= 0",
                "passed": errors == 0,
            }
        )
    return targets


def split_markdown(rows: Sequence[dict[str, Any]], rounds: int) -> list[str]:
    lines = [
        "## Latency at 1 connection: the clinical path and the rest",
        "",
        "| Workload | "
        + " | ".join(f"{SIDE_TITLES[s]} p50 ms | CPU ms/req" for s in SIDES)
        + " | Clinical path, p50 ms | Errors |",
        "|---|" + "---:|" * (2 * len(SIDES) + 2),
    ]
    for row in rows:
        cells = " | ".join(f"{row[s]['p50_ms']:.2f} | {row[s]['cpu_ms']:.2f}" for s in SIDES)
        errors = sum(row[s]["errors"] for s in SIDES)
        lines.append(f"| {row['name']} | {cells} | {row['clinical_path_p50_ms']:.2f} | {errors} |")
    lines += [
        "",
        f"Medians over {rounds} round{'s' if rounds != 1 else ''}, the three servers in turn "
        "in each (bench/latency_split.py). "
        "The service without its clinical path (bench/no_rules.py) is the same server, "
        "middleware, decoding and contract check, answering no cards: the difference is what "
        "finding the orders, gathering the record, the rules, the card and its record cost.",
    ]
    return lines
