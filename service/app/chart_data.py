"""What the timeline chart draws, as plain series and spans (no drawing library here).

`service.app.series` builds a `ChartInput` from what the clinical core found, the page's text
alternative reads it, and only `service.app.chart` draws it: importing this module does not load
matplotlib, so a worker that never draws a chart never pays for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Point:
    when: datetime
    value: float


@dataclass(frozen=True)
class Marker:
    when: datetime
    label: str


@dataclass(frozen=True)
class Span:
    start: datetime
    end: datetime
    label: str


@dataclass(frozen=True)
class ChartInput:
    igm: tuple[Point, ...]
    igm_threshold: float
    viscosity_threshold: float
    rise_percent: float
    igm_unusable: tuple[Marker, ...] = ()
    viscosity: tuple[Point, ...] = ()
    doses: tuple[Marker, ...] = ()
    courses: tuple[Span, ...] = ()
    holds: tuple[Marker, ...] = ()
    exchanges: tuple[Marker, ...] = ()
    flare_window: Span | None = None
    baseline: float | None = None

    def dates(self) -> list[datetime]:
        found = [p.when for p in (*self.igm, *self.viscosity)]
        found += [m.when for m in (*self.igm_unusable, *self.doses, *self.holds, *self.exchanges)]
        for span in (*self.courses, *([self.flare_window] if self.flare_window else [])):
            found += [span.start, span.end]
        return found
