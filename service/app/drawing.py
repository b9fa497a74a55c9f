"""Drawing the timeline chart without stopping the worker's other calls.

Under the gevent worker every connection of a process shares one OS thread. Importing matplotlib
(with numpy and Pillow) takes about a second on a busy machine, and each chart takes tens of
milliseconds more: on that thread, every hook call the worker holds would wait for them. So the
chart is drawn on one native thread of its own (service.api.blocking.off_loop), which takes
turns with the event loop for the interpreter, and the page's greenlet waits cooperatively.
Without gevent (tests, `flare-cds evaluate`) it is drawn on the calling thread.

Matplotlib loads on the first chart drawn, not with the app: a worker that serves only hooks
never needs it. One thread for every chart of the process also keeps matplotlib's shared state
(font cache, unit registry) to a single thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from service.api.blocking import gevent_active, off_loop
from service.app.chart_data import ChartInput


class _Painter:
    def svg(self, chart: ChartInput, title: str) -> str:
        from service.app.chart import render_svg

        return render_svg(chart, title)


_painter: Any = None
_lock = threading.Lock()


def painter(active: Callable[[], bool] = gevent_active) -> Any:
    """The process's painter: under gevent, a proxy whose calls run on its native thread."""
    global _painter
    with _lock:
        if _painter is None:
            _painter = off_loop(_Painter(), active=active)
        return _painter


def draw_svg(chart: ChartInput, title: str) -> str:
    """The chart as an SVG document (service.app.chart.render_svg), drawn off the event loop."""
    result: str = painter().svg(chart, title)
    return result
