"""The chart from plain series: one mark per result, every layer present, the same SVG twice."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from service.app.chart import ChartInput, Marker, Point, Span, render_svg

SVG = {"svg": "http://www.w3.org/2000/svg"}
START = datetime(2026, 6, 1, tzinfo=UTC)


def _day(n: int) -> datetime:
    return START + timedelta(days=n)


def _chart(**extra) -> ChartInput:  # type: ignore[no-untyped-def]
    return ChartInput(
        igm=tuple(Point(_day(d), v) for d, v in [(0, 3000), (30, 4200), (60, 4800), (100, 3500)]),
        igm_threshold=4000,
        viscosity_threshold=4,
        rise_percent=25,
        **extra,
    )


def _ids(svg: str) -> set[str]:
    return {e.get("id") for e in ET.fromstring(svg).iter() if e.get("id")}


def _uses(svg: str, gid: str) -> int:
    group = ET.fromstring(svg).find(f".//svg:g[@id='{gid}']", SVG)
    return len(group.findall(".//svg:use", SVG))


def test_one_mark_per_result_and_every_layer() -> None:
    chart = _chart(
        igm_unusable=(Marker(_day(45), "unit cannot be converted"),),
        viscosity=(Point(_day(30), 3.1), Point(_day(60), 4.4)),
        doses=tuple(Marker(_day(d), "rituximab") for d in (1, 8, 15, 22)),
        courses=(Span(_day(1), _day(22), "rituximab course"),),
        holds=(Marker(_day(70), "ibrutinib held"),),
        exchanges=(Marker(_day(75), "plasma exchange"), Marker(_day(77), "plasma exchange")),
        flare_window=Span(_day(1), _day(121), "Flare window (120 days)"),
        baseline=3000,
    )
    svg = render_svg(chart, "Serum IgM")
    assert _uses(svg, "igm-usable") == 4
    assert _uses(svg, "igm-unusable") == 1
    assert _uses(svg, "anti-cd20-doses") == 4
    assert _uses(svg, "viscosity-usable") == 2
    ids = _ids(svg)
    for gid in (
        "igm-threshold",
        "igm-baseline",
        "igm-baseline-rise",
        "flare-window",
        "course-0",
        "btk-holds-0",
        "plasma-exchanges-0",
        "plasma-exchanges-1",
        "viscosity-threshold",
    ):
        assert gid in ids, gid
    assert "Baseline +25% (3,750 mg/dL)" in svg  # text stays text
    assert "<script" not in svg


def test_without_treatment_or_baseline_only_the_results_and_threshold() -> None:
    svg = render_svg(_chart(), "Serum IgM")
    assert _uses(svg, "igm-usable") == 4
    ids = _ids(svg)
    assert "igm-threshold" in ids
    assert not {"igm-baseline", "flare-window", "anti-cd20-doses"} & ids
    assert "No serum viscosity on record" in svg


def test_the_same_data_gives_the_same_svg() -> None:
    assert render_svg(_chart(), "t") == render_svg(_chart(), "t")
