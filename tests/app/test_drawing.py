"""The timeline chart is drawn off the event loop under gevent: on one native thread of its own
for every chart of the process, with the same SVG as drawn directly; without gevent, as it is.

The real `flare-cds serve` draws through this path in tests/app/test_workers.py."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.app import chart, drawing
from service.app.chart_data import ChartInput, Point

START = datetime(2026, 6, 1, tzinfo=UTC)


def _chart() -> ChartInput:
    days = [(0, 3000), (30, 4200), (60, 4800), (100, 3500)]
    return ChartInput(
        igm=tuple(Point(START + timedelta(days=d), v) for d, v in days),
        igm_threshold=4000,
        viscosity_threshold=4,
        rise_percent=25,
    )


@pytest.fixture
def drawn_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The threads render_svg ran on; the process's painter is fresh for each test."""
    threads: list[int] = []
    real = chart.render_svg

    def recording(chart_input: ChartInput, title: str) -> str:
        threads.append(threading.get_ident())
        return real(chart_input, title)

    monkeypatch.setattr(chart, "render_svg", recording)
    monkeypatch.setattr(drawing, "_painter", None)
    return threads


def test_under_gevent_every_chart_is_drawn_on_one_native_thread(drawn_on: list[int]) -> None:
    painter: Any = drawing.painter(active=lambda: True)
    assert drawing.painter() is painter  # one per process, whoever asks
    svgs = [drawing.draw_svg(_chart(), "t") for _ in range(2)]
    assert svgs[0] == svgs[1] == chart.render_svg(_chart(), "t")
    assert len(drawn_on) == 3
    native = {drawn_on[0], drawn_on[1]}
    assert len(native) == 1 and threading.get_ident() not in native
    assert drawn_on[2] == threading.get_ident()  # the direct call above


def test_without_gevent_the_chart_is_drawn_by_the_caller(drawn_on: list[int]) -> None:
    svg = drawing.draw_svg(_chart(), "t")
    assert svg.startswith("<?xml") and "<svg" in svg
    assert drawn_on == [threading.get_ident()]
