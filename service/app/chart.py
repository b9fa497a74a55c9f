"""The timeline chart: plain series and spans in, an SVG document out (matplotlib, svg backend).

The chart knows nothing of FHIR or of the rules: `service.app.series` turns what the clinical
core found into a `ChartInput` (`service.app.chart_data`), so treatment history from any source
can be drawn by adding an adapter there. Matplotlib is loaded with this module, which only the
timeline page imports, when it first draws a chart.

Every group a test or a screen reader may want carries an SVG id (`gid`): `igm-usable` holds one
marker per usable IgM result, `igm-unusable` one per unusable result.
"""

from __future__ import annotations

import io
import threading
from datetime import timedelta

import matplotlib
import matplotlib.dates as mdates
from matplotlib.axes import Axes
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from service.app.chart_data import ChartInput, Marker, Point, Span

__all__ = ["COLOURS", "ChartInput", "Marker", "Point", "Span", "render_svg"]

# Text stays text (selectable, readable by assistive technology, smaller than glyph outlines);
# a fixed hash salt makes the same data give the same SVG.
matplotlib.rcParams["svg.fonttype"] = "none"
matplotlib.rcParams["svg.hashsalt"] = "flare-cds"
matplotlib.rcParams["font.family"] = "DejaVu Sans"

# Matplotlib's text layout shares caches between figures; one render at a time is plenty fast.
_RENDER_LOCK = threading.Lock()

COLOURS = {
    "igm": "#1f4e99",
    "viscosity": "#6a3d9a",
    "threshold": "#c0392b",
    "baseline": "#2e7d32",
    "dose": "#d35400",
    "course": "#fdebd0",
    "flare": "#fff3b0",
    "hold": "#455a64",
    "exchange": "#00838f",
    "unusable": "#7f7f7f",
}


def render_svg(chart: ChartInput, title: str) -> str:
    """The chart as a standalone SVG document (UTF-8 text)."""
    with _RENDER_LOCK:
        figure = Figure(figsize=(10, 6.2), layout="constrained")
        FigureCanvasSVG(figure)
        igm_axes, visc_axes = figure.subplots(
            2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        _draw_igm(igm_axes, chart)
        _draw_viscosity(visc_axes, chart)
        _time_axis(visc_axes, chart)
        igm_axes.set_title(title, loc="left", fontsize=12)
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None})
        return out.getvalue()


def _draw_igm(axes: Axes, chart: ChartInput) -> None:
    for index, course in enumerate(chart.courses):
        axes.axvspan(
            course.start,
            course.end,
            color=COLOURS["course"],
            zorder=0,
            label="Anti-CD20 course (first to last dose)" if index == 0 else None,
            gid=f"course-{index}",
        )
    if chart.flare_window is not None:
        window = chart.flare_window
        axes.axvspan(
            window.start,
            window.end,
            facecolor=COLOURS["flare"],
            edgecolor="#c9a800",
            hatch="/",
            alpha=0.35,
            zorder=0.5,
            label=window.label,
            gid="flare-window",
        )
    axes.axhline(
        chart.igm_threshold,
        color=COLOURS["threshold"],
        linestyle="--",
        label=f"High-risk threshold {chart.igm_threshold:,.0f} mg/dL",
        gid="igm-threshold",
    )
    if chart.baseline is not None:
        raised = chart.baseline * (1 + chart.rise_percent / 100)
        axes.axhline(
            chart.baseline,
            color=COLOURS["baseline"],
            label=f"Baseline {chart.baseline:,.0f} mg/dL",
            gid="igm-baseline",
        )
        axes.axhline(
            raised,
            color=COLOURS["baseline"],
            linestyle=":",
            label=f"Baseline +{chart.rise_percent:g}% ({raised:,.0f} mg/dL)",
            gid="igm-baseline-rise",
        )
    if chart.igm:
        axes.plot(
            [p.when for p in chart.igm],
            [p.value for p in chart.igm],
            color=COLOURS["igm"],
            linewidth=1.5,
            zorder=3,
            gid="igm-line",
        )
        axes.plot(
            [p.when for p in chart.igm],
            [p.value for p in chart.igm],
            linestyle="none",
            marker="o",
            markersize=7,
            color=COLOURS["igm"],
            label="Serum IgM (usable result)",
            zorder=4,
            gid="igm-usable",
        )
    bottom = axes.get_xaxis_transform()  # x in data, y in axes fraction
    if chart.igm_unusable:
        axes.plot(
            [m.when for m in chart.igm_unusable],
            [0.04] * len(chart.igm_unusable),
            transform=bottom,
            linestyle="none",
            marker="X",
            markersize=9,
            color=COLOURS["unusable"],
            label="Serum IgM not usable (see the table)",
            gid="igm-unusable",
        )
    if chart.doses:
        axes.plot(
            [m.when for m in chart.doses],
            [0.97] * len(chart.doses),
            transform=bottom,
            linestyle="none",
            marker="v",
            markersize=10,
            color=COLOURS["dose"],
            label="Anti-CD20 dose",
            gid="anti-cd20-doses",
        )
    _vertical_markers(axes, chart.holds, COLOURS["hold"], "-.", "BTK inhibitor held", "btk-holds")
    _vertical_markers(
        axes, chart.exchanges, COLOURS["exchange"], ":", "Plasma exchange", "plasma-exchanges"
    )
    axes.set_ylabel("Serum IgM (mg/dL)")
    top = max([p.value for p in chart.igm] + [chart.igm_threshold]) * 1.15
    axes.set_ylim(0, top)
    axes.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    axes.grid(axis="y", color="#dddddd")
    _legend(axes)


def _legend(axes: Axes) -> None:
    # Beside the plot, never over it: a marker under the legend would be a result hidden.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def _vertical_markers(
    axes: Axes, markers: tuple[Marker, ...], colour: str, style: str, label: str, gid: str
) -> None:
    for index, marker in enumerate(markers):
        axes.axvline(
            marker.when,
            color=colour,
            linestyle=style,
            linewidth=1.5,
            label=label if index == 0 else None,
            gid=f"{gid}-{index}",
        )


def _draw_viscosity(axes: Axes, chart: ChartInput) -> None:
    axes.axhline(
        chart.viscosity_threshold,
        color=COLOURS["threshold"],
        linestyle="--",
        label=f"Critical {chart.viscosity_threshold:g} cP",
        gid="viscosity-threshold",
    )
    if chart.viscosity:
        axes.plot(
            [p.when for p in chart.viscosity],
            [p.value for p in chart.viscosity],
            marker="s",
            color=COLOURS["viscosity"],
            label="Serum viscosity",
            gid="viscosity-usable",
        )
        top = max(max(p.value for p in chart.viscosity), chart.viscosity_threshold) * 1.2
    else:
        axes.text(0.5, 0.5, "No serum viscosity on record", transform=axes.transAxes, ha="center")
        top = chart.viscosity_threshold * 1.3
    axes.set_ylim(0, top)
    axes.set_ylabel("Viscosity (cP)")
    axes.grid(axis="y", color="#dddddd")
    _legend(axes)


def _time_axis(axes: Axes, chart: ChartInput) -> None:
    dates = chart.dates()
    if dates:
        pad = max((max(dates) - min(dates)) / 20, timedelta(days=3))
        axes.set_xlim(min(dates) - pad, max(dates) + pad)
    locator = mdates.AutoDateLocator(minticks=4, maxticks=10)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
