"""The benchmark (`make bench`) in its quick mode, end to end: real gunicorn servers, real wrk.

It proves the harness still runs and writes what it promises; the numbers themselves are not
judged here (a busy CI machine may miss a latency target), only their presence and that no
request failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.loadgen import WrkMissing, find_wrk, parse_result
from bench.servers import no_clinical_path_server, service_config
from bench.workloads import build_workloads, record_sizes

ROOT = Path(__file__).resolve().parent.parent
QUICK_WORKLOADS = ["order-sign-high", "order-sign-no-prefetch"]
JSON = {"Content-Type": "application/json"}


def test_workloads_are_a_long_record_dated_today() -> None:
    workloads = {w.name: w for w in build_workloads("http://127.0.0.1:9/fhir")}
    for name in ("order-sign-high", "order-sign-low", "patient-view-flare"):
        sizes = record_sizes(workloads[name].body)
        assert (sizes["igm"], sizes["conditions"], sizes["medicationRequests"]) == (60, 10, 30)
    igm = workloads["order-sign-high"].body["prefetch"]["igm"]["entry"]
    newest = max(
        datetime.fromisoformat(e["resource"]["effectiveDateTime"].replace("Z", "+00:00"))
        for e in igm
    )
    # The fixture's 4500 mg/dL result is 5 days 3.5 hours before the fixtures' "now"; dates move
    # by whole days, so today it is between 5 and 6 days 3.5 hours old, by the time of day.
    assert timedelta(days=5) < datetime.now(UTC) - newest < timedelta(days=6, hours=4)
    no_prefetch = workloads["order-sign-no-prefetch"].body
    assert "prefetch" not in no_prefetch and no_prefetch["fhirServer"] == "http://127.0.0.1:9/fhir"


def test_wrk_result_line_is_parsed() -> None:
    line = (
        'BENCH_RESULT {"requests":500,"duration_us":2000000,"bytes":1,'
        '"latency_us":{"p50":1500,"p90":2500,"p99":9000,"max":12000,"mean":1700.0,'
        '"stdev":300.0},"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":0,'
        '"unexpected_body":3}}'
    )
    point = parse_result(f"Running 2s test\n{line}\n", connections=8)
    assert point.throughput_rps == 250.0
    assert point.latency_ms["p99"] == 9.0
    assert point.errors["non_2xx"] == 2 and point.error_total == 6


@pytest.mark.server
def test_quick_bench_writes_results(tmp_path: Path) -> None:
    try:
        find_wrk(install=True)
    except WrkMissing as exc:
        pytest.skip(f"wrk is not installed and could not be installed: {exc}")
    out = tmp_path / "results"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--retries",
        "0",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
    ]
    run = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    # 1 means a target was missed (timing on a shared machine); 2 would be a harness failure.
    assert run.returncode in (0, 1), run.stdout + run.stderr

    document = json.loads((out / "results.json").read_text("utf-8"))
    assert {"cpu_model", "cores", "memory_gb", "python", "date"} <= set(document["machine"])
    assert document["settings"]["quick"] is True
    assert [w["name"] for w in document["workloads"]] == QUICK_WORKLOADS
    for workload in document["workloads"]:
        assert workload["check"]["status"] == 200
        assert workload["check"]["indicator"] == "warning"
        assert workload["memory"]["peak_rss_mb"] > 0
        assert len(workload["memory"]["workers"]) == 2
        assert workload["worker_restarts"] == 0
        (point,) = workload["points"]
        assert point["connections"] == 8 and point["throughput_ratio"] > 0
        for side in ("service", "baseline"):
            measured = point[side]
            assert measured["requests"] > 0 and measured["throughput_rps"] > 0
            assert 0 < measured["latency_ms"]["p50"] <= measured["latency_ms"]["p99"]
            assert measured["errors"]["total"] == 0, measured["errors"]
            assert measured["cpu"]["ms_per_request"] > 0
    # The baseline is the fastest of the settings tried, each measured without an error.
    search = document["baseline"]["search"]
    assert len(search) >= 3 and sum(row["chosen"] for row in search) == 1
    chosen = next(row for row in search if row["chosen"])
    assert chosen["settings"] == document["baseline"]["settings"]
    assert chosen["worst"] == max(row["worst"] for row in search) > 0
    if document["baseline"]["settings"] != document["baseline"]["own_settings"]:
        for workload in document["workloads"]:
            (point,) = workload["points"]
            assert point["baseline_own"]["throughput_rps"] > 0
            assert point["throughput_ratio_own"] > 0
    # CPU by stage, for the workload that needs no FHIR server.
    (stages,) = document["stages"]
    assert stages["name"] == "order-sign-high"
    assert all(value >= 0 for value in stages["stages_ms"].values())
    assert stages["stages_ms"]["parse"] > 0 and stages["stages_ms"]["assess"] > 0
    assert sum(stages["stages_ms"].values()) == pytest.approx(stages["total_ms"], abs=0.01)
    targets = document["targets"]
    assert {t["workload"] for t in targets} == set(QUICK_WORKLOADS)
    assert all(t["passed"] in (True, False, None) for t in targets)
    # The 1-connection split: the full-prefetch workload on all three servers, without error.
    (split,) = document["latency_split"]
    assert split["name"] == "order-sign-high"
    for side in ("service", "no_clinical_path", "baseline"):
        assert split[side]["p50_ms"] > 0 and split[side]["cpu_ms"] > 0
        assert split[side]["errors"] == 0
    assert split["clinical_path_p50_ms"] == pytest.approx(
        split["service"]["p50_ms"] - split["no_clinical_path"]["p50_ms"], abs=0.01
    )
    markdown = (out / "results.md").read_text("utf-8")
    assert "## Targets" in markdown and "## CPU per call by stage" in markdown
    assert "## Latency at 1 connection: the clinical path and the rest" in markdown
    assert "## Baseline server settings" in markdown


def _measured(service_rps: float, baseline_rps: float, errors: int = 0) -> dict[str, Any]:
    def side(rps: float, errors: int) -> dict[str, Any]:
        return {
            "throughput_rps": rps,
            "cpu": {"ms_per_request": 1000 / rps},
            "errors": {"total": errors},
        }

    return {"baseline": side(baseline_rps, 0), "service": side(service_rps, errors)}


def test_a_level_measured_in_rounds_shows_its_median_round_and_counts_every_rounds_errors() -> None:
    from bench.report import _errors
    from bench.runner import _median_round, _round_summary

    rounds = [_measured(400, 1000), _measured(520, 1000, errors=2), _measured(480, 1000)]
    # A burst of load on one round (0.40x here) does not decide the point, nor does a lucky one.
    assert _median_round(rounds) is rounds[2]
    # Of an even number of rounds, the lower middle one.
    assert _median_round(rounds[:2]) is rounds[0]
    point = {
        "connections": 8,
        "service": rounds[2]["service"],
        "baseline": rounds[2]["baseline"],
        "rounds": [_round_summary(r) for r in rounds],
    }
    assert [r["throughput_ratio"] for r in point["rounds"]] == [0.4, 0.52, 0.48]
    # The errors of the rounds not shown still fail the bench.
    assert _errors({"points": [point], "worker_restarts": 0}) == (
        2.0,
        "all points, service + baseline",
    )


def test_growth_compares_the_median_cpu_of_each_sizes_rounds() -> None:
    from bench.growth import growth_rows, growth_targets
    from bench.runner import _round_summary

    def result(igm: int, resources: int, cpu_by_round: list[float], shown: int) -> dict[str, Any]:
        rounds = [_measured(1000 / cpu, 100) for cpu in cpu_by_round]
        return {
            "name": f"growth-igm-{igm}",
            "record": {"igm": resources},
            "body_bytes": 1024,
            "memory": {"peak_rss_mb": 70.0},
            "points": [
                {
                    "connections": 1,
                    "service": {**rounds[shown]["service"], "latency_ms": {"p50": 1.0}},
                    "baseline": rounds[shown]["baseline"],
                    "rounds": [_round_summary(r) for r in rounds],
                }
            ],
        }

    # Each size's figure is the median of its rounds, whichever round is shown.
    rows = growth_rows(
        [result(60, 100, [4.0, 3.8, 3.6], 1), result(6000, 6000, [210, 235, 212], 1)]
    )
    assert [row["cpu_ms"] for row in rows] == pytest.approx([3.8, 212])
    # The sizes are measured in turn in each round, so the growth is the median of the rounds'
    # ratios (52.5, 61.8, 58.9): the host's speed in one round moves both sides of its ratio.
    linear, memory = growth_targets(rows)
    assert linear["value"] == pytest.approx(212 / 3.6, abs=1e-3) and linear["passed"]
    assert "median of the rounds' ratios" in linear["where"]
    assert memory["target"].startswith("peak RSS") and memory["passed"]
    # A host that slowed in the first round and sped up in the second: the ratio of the
    # medians (230 / 4.0 = 57.5x) would fail what no round's own ratio exceeds (at most 55x).
    drifted = growth_rows(
        [result(60, 100, [4.4, 3.6, 4.0], 0), result(6000, 6000, [230, 190, 210], 0)]
    )
    linear, _ = growth_targets(drifted)
    assert linear["value"] == pytest.approx(210 / 4.0, abs=1e-3) and linear["passed"]
    # A point measured once has no rounds: its own figure.
    once = result(60, 100, [4.0], 0)
    once["points"][0].pop("rounds")
    assert growth_rows([once])[0]["cpu_ms"] == pytest.approx(4.0)
    # Without rounds on both sides, the sizes' own figures are compared.
    big = result(6000, 6000, [200.0], 0)
    big["points"][0].pop("rounds")
    linear, _ = growth_targets(growth_rows([once, big]))
    assert linear["value"] == pytest.approx(50.0) and linear["where"] == "vs growth-igm-60"


@pytest.mark.server
def test_service_without_clinical_path_still_checks_the_contract(tmp_path: Path) -> None:
    """The bench's instrument answers a valid call with no cards, but is otherwise the service:
    a request that breaks the contract is still refused, so its time includes that check."""
    workload = next(
        w for w in build_workloads("http://127.0.0.1:9/fhir") if w.name == QUICK_WORKLOADS[0]
    )
    config = service_config(tmp_path, "http://127.0.0.1:9/fhir", 1.0)
    with no_clinical_path_server(tmp_path, config, 1, 1) as server:
        url = f"{server.url}{workload.path}"
        answer = requests.post(url, data=workload.body_bytes(), headers=JSON, timeout=30)
        assert answer.status_code == 200 and answer.json() == {"cards": []}
        broken = {k: v for k, v in workload.body.items() if k != "context"}
        refused = requests.post(url, json=broken, timeout=30)
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_request"
        assert "context" in refused.text
