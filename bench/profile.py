"""Profile the service's workers under a benchmark workload with py-spy, and print the hot spots.

    python -m bench.profile --workload order-sign-high --connections 8 --seconds 10

py-spy samples the real gunicorn workers from outside, so what it shows includes gunicorn, the GIL
and the SQLite lock, which an in-process profiler of one request would not. It is a developer
tool, not a project dependency: `.venv/bin/pip install py-spy`. With --gil only samples holding
the GIL count (where the CPU goes); without it, waiting threads count too (where the time goes).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import BENCH_DIR
from bench.loadgen import find_wrk, run_wrk
from bench.servers import service_config, service_server
from bench.workloads import build_workloads, fhir_server_resources
from tests.fhir_test_server import FhirTestServer

_SITE = re.compile(r" \((?:/.*?/)?(?:site-packages/)?")  # shorten "(/…/site-packages/x.py:1)"


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def summarise(files: list[Path], top: int) -> str:
    """Self and inclusive sample shares per function, from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for file in files:
        for line in file.read_text("utf-8").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = [_SITE.sub(" (", frame) for frame in stack.split(";")]
            total += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive (service code):"]
    service = [(k, n) for k, n in inclusive.most_common() if "(service/" in k][:top]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in service]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--workload", default="order-sign-high")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / "out" / "profile")
    args = parser.parse_args(argv)
    py_spy = find_py_spy()
    if py_spy is None:
        print(
            "bench.profile: py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr
        )
        return 2
    wrk = find_wrk()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with FhirTestServer(keep_alive=True) as fhir:
        fhir.add_resources(fhir_server_resources())
        fhir.delay_seconds = 0.05
        (workload,) = build_workloads(fhir.base_url, [args.workload])
        body = workdir / f"{workload.name}.json"
        body.write_bytes(workload.body_bytes())
        config = service_config(workdir, fhir.base_url, 1.0)
        with service_server(workdir, config, 2, 4) as server:
            url = f"{server.url}{workload.path}"
            run_wrk(wrk, url, body, "", args.connections, 2)  # warm-up, not profiled
            outputs = [workdir / f"{workload.name}-{pid}.txt" for pid in server.worker_pids]
            spies = [
                subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(args.seconds),
                        "-r",
                        str(args.rate),
                        "--format",
                        "raw",
                        "-o",
                        str(out),
                    ]
                    + (["--gil"] if args.gil else []),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for pid, out in zip(server.worker_pids, outputs, strict=True)
            ]
            point = run_wrk(wrk, url, body, "", args.connections, args.seconds)
            for spy in spies:
                spy.wait(timeout=args.seconds + 30)
    print(
        f"{workload.name}, {args.connections} connections: {point.throughput_rps:.1f} req/s, "
        f"p50 {point.latency_ms['p50']} ms, p99 {point.latency_ms['p99']} ms"
    )
    print(summarise([f for f in outputs if f.exists()], args.top))
    print(f"raw stacks: {', '.join(str(f) for f in outputs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
