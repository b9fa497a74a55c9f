"""`python -m bench` (`make bench`): flare-cds under `flare-cds serve` against a baseline Flask app.

Exit status: 0 when every measured target passes, 1 when one fails, 2 when the bench itself could
not run (wrk missing, a server that does not start, a workload whose answer is wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import BENCH_DIR, ROOT

if str(ROOT) not in sys.path:  # tests.fhir_test_server lives beside the service, not in it
    sys.path.insert(0, str(ROOT))

from bench.baseline_search import Candidate, candidates, search
from bench.growth import (
    MAX_BODY_BYTES,
    build_growth_workloads,
    growth_rows,
    growth_targets,
    measure_growth,
    plot_growth,
)
from bench.latency_split import measure_split, split_targets
from bench.loadgen import WrkFailed, WrkMissing, find_wrk, wrk_version
from bench.report import evaluate_targets, machine_info, render_markdown, write_json
from bench.runner import LoadSettings, WorkloadBroken, run_workload
from bench.servers import (
    ServerError,
    no_clinical_path_server,
    service_config,
    service_server,
)
from bench.stages import format_rows, run_stages
from bench.workloads import build_workloads, fhir_server_resources
from service.serving.server import DEFAULT_THREADS, DEFAULT_WORKERS
from tests.fhir_test_server import FhirTestServer

QUICK_WORKLOADS = ["order-sign-high", "order-sign-no-prefetch"]


def _connections(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("connection counts must be >= 1")
    return levels


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="seconds measured per point")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds before each point")
    parser.add_argument(
        "--connections",
        type=_connections,
        default=(1, 8, 32),
        help="concurrency levels, e.g. 1,8,32",
    )
    parser.add_argument("--workloads", help="comma-separated subset of the workloads")
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help="gunicorn workers (both servers)"
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="threads per worker (both)"
    )
    parser.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk threads (1 leaves the most CPU to the servers)",
    )
    parser.add_argument(
        "--fhir-delay-ms",
        type=float,
        default=50.0,
        help="delay the loopback FHIR server adds to every query",
    )
    parser.add_argument(
        "--fhir-deadline", type=float, default=1.0, help="the service's [fhir] deadline_seconds"
    )
    parser.add_argument(
        "--keepalive",
        action="store_true",
        help="keep connections open (default: Connection: close per request)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measurements per level, baseline and service in turn; the median round is kept",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-measure a point disturbed by other processes up to N times",
    )
    parser.add_argument(
        "--max-other-cores",
        type=float,
        default=0.25,
        help="CPU (in cores) other processes may use before a point is redone",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: 1 s per point, 8 connections, 2 workloads"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR,
        help="where results.json and results.md go (default: bench/)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=BENCH_DIR / "out",
        help="scratch files: configs, bodies, logs, the SQLite store",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never try to install wrk, only say how"
    )
    parser.add_argument(
        "--no-baseline-search",
        action="store_true",
        help="measure the baseline under the service's own settings only",
    )
    parser.add_argument(
        "--stage-calls",
        type=int,
        default=300,
        help="in-process calls per workload for the CPU-by-stage table (0: skip it)",
    )
    parser.add_argument(
        "--no-split",
        action="store_true",
        help="skip the 1-connection table of the service with and without its clinical path",
    )
    parser.add_argument(
        "--no-growth",
        action="store_true",
        help="skip the growth series (60, 600 and 6,000 IgM results at 1 connection)",
    )
    return parser


def _fresh_workdir(workdir: Path) -> None:
    """Start from an empty store and empty logs; only files this bench writes are removed."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = ["flare-cds.log", "wrk.log", "flare-cds.toml"]
    names += [f"flare-cds.sqlite3{suffix}" for suffix in ("", "-wal", "-shm", ".key")]
    for name in names:
        (workdir / name).unlink(missing_ok=True)
    for log in workdir.glob("baseline*.log"):
        log.unlink()
    shutil.rmtree(workdir / "no-clinical-path", ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.duration, args.warmup, args.connections, args.rounds = 1, 1, (8,), 1
        args.workloads = args.workloads or ",".join(QUICK_WORKLOADS)
        args.no_growth = True
        args.stage_calls = min(args.stage_calls, 30)
    try:
        wrk = find_wrk(install=not args.no_install)
    except WrkMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    workdir: Path = args.workdir.resolve()
    _fresh_workdir(workdir)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = LoadSettings(
        wrk,
        args.connections,
        args.duration,
        args.warmup,
        args.wrk_threads,
        workdir / "wrk.log",
        close=not args.keepalive,
        max_other_cores=args.max_other_cores,
        retries=args.retries,
        rounds=args.rounds,
    )
    names = [n.strip() for n in args.workloads.split(",")] if args.workloads else None
    results: list[dict[str, Any]] = []
    with FhirTestServer(keep_alive=True) as fhir:
        fhir.add_resources(fhir_server_resources())
        fhir.delay_seconds = args.fhir_delay_ms / 1000
        fhir.cache_answers = True  # its own CPU must not be what limits the no-prefetch workload
        workloads = build_workloads(fhir.base_url, names)
        config = service_config(workdir, fhir.base_url, args.fhir_deadline, MAX_BODY_BYTES)
        # Its own store and spool, so that it never shares either with the service.
        bare_dir = workdir / "no-clinical-path"
        bare_dir.mkdir(exist_ok=True)
        bare_config = service_config(bare_dir, fhir.base_url, args.fhir_deadline, MAX_BODY_BYTES)
        print(
            f"bench: {len(workloads)} workloads x {len(args.connections)} concurrency levels, "
            f"{args.warmup}+{args.duration} s per point, service and baseline",
            flush=True,
        )
        own = Candidate("flare-cds", args.workers, args.threads)
        chosen, searched = own, []
        if not args.no_baseline_search:
            print("bench: finding the fastest server settings for the baseline", flush=True)
            chosen, searched = _search_baseline(args, settings, workloads, workdir)
        with contextlib.ExitStack() as servers:
            baseline = servers.enter_context(chosen.process(workdir))
            same = None if chosen == own else servers.enter_context(own.process(workdir))
            for workload in workloads:
                results.append(
                    run_workload(
                        settings,
                        workload,
                        lambda: service_server(workdir, config, args.workers, args.threads),
                        baseline,
                        workdir,
                        progress=lambda line: print(line, flush=True),
                        after_point=fhir.clear_requests,  # it records every request; keep it small
                        own_baseline=same,
                    )
                )
            split: list[dict[str, Any]] = []
            if not args.no_split:
                split = measure_split(
                    settings,
                    workloads,
                    lambda: service_server(workdir, config, args.workers, args.threads),
                    lambda: no_clinical_path_server(
                        bare_dir, bare_config, args.workers, args.threads
                    ),
                    baseline,
                    workdir,
                    progress=lambda line: print(line, flush=True),
                )
            growth: list[dict[str, Any]] = []
            if not args.no_growth:
                growth = measure_growth(
                    settings,
                    build_growth_workloads(),
                    lambda: service_server(workdir, config, args.workers, args.threads),
                    workdir,
                    progress=lambda line: print(line, flush=True),
                )
            baseline_memory = baseline.worker_memory()
    staged = workloads + ([] if args.no_growth else build_growth_workloads())
    stages = run_stages(staged, args.stage_calls) if args.stage_calls > 0 else []
    document = _document(args, wrk, results, baseline_memory)
    document["baseline"]["settings"] = chosen.label
    document["baseline"]["own_settings"] = own.label
    document["baseline"]["search"] = searched
    document["stages"] = stages
    document["latency_split"] = split
    document["targets"] += split_targets(split)
    if stages:
        print(format_rows(stages))
    rows = growth_rows(growth)
    plot = plot_growth(rows, args.out / "growth.png")
    document["growth"] = {
        "rows": rows,
        "plot": plot.name if plot else None,
        "workloads": growth,
    }
    document["targets"] += growth_targets(rows)
    document["passed"] = all(t["passed"] is not False for t in document["targets"])
    write_json(document, args.out / "results.json")
    (args.out / "results.md").write_text(render_markdown(document), "utf-8")
    _print_targets(document)
    print(f"bench: wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0 if document["passed"] else 1


def _search_baseline(
    args: argparse.Namespace, settings: LoadSettings, workloads: list[Any], workdir: Path
) -> tuple[Candidate, list[dict[str, Any]]]:
    """Measure the baseline app under each candidate setting on the first full-prefetch body."""
    workload = next((w for w in workloads if not w.uses_fhir_server), workloads[0])
    body_file = workdir / f"{workload.name}.json"
    body_file.write_bytes(workload.body_bytes())
    return search(
        candidates(args.workers, os.cpu_count() or 1),
        workdir,
        settings.wrk,
        workload,
        body_file,
        settings.connections,
        args.duration,
        settings.close,
        progress=lambda line: print(line, flush=True),
    )


def _document(
    args: argparse.Namespace,
    wrk: str,
    results: list[dict[str, Any]],
    baseline_memory: list[dict[str, int]],
) -> dict[str, Any]:
    targets = evaluate_targets(results)
    return {
        "schema": 1,
        "machine": machine_info(wrk_version(wrk)),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": list(args.connections),
            "workers": args.workers,
            "threads": args.threads,
            "wrk_threads": args.wrk_threads,
            "quick": args.quick,
            "fhir_delay_ms": args.fhir_delay_ms,
            "fhir_deadline_s": args.fhir_deadline,
            "connection": "keep-alive" if args.keepalive else "close",
            "max_other_cores": args.max_other_cores,
            "retries": args.retries,
            "rounds": args.rounds,
            "server": "flare-cds: `flare-cds serve` (gunicorn, gevent worker); baseline: the "
            "fastest settings found (see baseline.search), and the service's own",
        },
        "baseline": {
            "app": 'bench/baseline_app.py: json.loads(body) -> {"cards": []}',
            "workers": baseline_memory,
            "peak_rss_mb": round(max((m["peak_kb"] for m in baseline_memory), default=0) / 1024, 1),
        },
        "workloads": results,
        "targets": targets,
        "passed": all(t["passed"] is not False for t in targets),
        "notes": [
            "order-sign does not ask for medicationRequests; the 30 are sent anyway (one "
            "prefetch profile per patient) and ignored after parsing.",
            "Authentication is off (the default): JWT verification is not part of these numbers.",
            "Peak RSS is VmHWM of each gunicorn worker, read after the workload's last point; "
            "the service is restarted for every workload.",
            "CPU ms/req is the gunicorn workers' CPU time divided by the requests served: the "
            "cost of a request whatever the scheduling. 'Other load' is CPU used by processes "
            "outside the bench during the point (a shared machine); points above "
            f"{args.max_other_cores} cores were measured again, the least disturbed kept.",
            "wrk, the servers and the loopback FHIR server share the same cores, as they would "
            "not in production.",
        ],
    }


def _print_targets(document: dict[str, Any]) -> None:
    for row in document["targets"]:
        word = {True: "PASS", False: "FAIL", None: "n/a "}[row["passed"]]
        value = "-" if row["value"] is None else f"{row['value']:.3g}"
        print(
            f"  [{word}] {row['workload']}: {row['target']} ({row['where']}) = {value} "
            f"(limit {row['limit']})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (ServerError, WorkloadBroken, WrkFailed, ValueError) as exc:
        print(f"bench: cannot run: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
