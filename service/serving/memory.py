"""What a worker's garbage collector scans, and when.

CPython scans the youngest objects every 700 net container allocations, a default that suits a
short script better than a worker answering hook calls whose bodies are 100 kB to several MB of
JSON. A call's parsed body is a few thousand containers that reference counting frees when the
call ends, so the scans found nothing to collect and cost about 0.5 ms of CPU per call (three
young and a quarter of a middle-generation collection, each over the bodies of the calls in
flight).

So the automatic threshold is raised far above one call's allocations, and the young objects
are collected on purpose every YOUNG_COLLECTION_CALLS calls instead: each call does leave a
little cyclic garbage (Werkzeug's URL matcher is a closure that refers to itself, 8 objects),
which the raised threshold alone would keep for thousands of calls.

glibc's heap is left with its own dynamic thresholds: fixing the mapping threshold (mallopt)
took 3-4 MB off the peak of a series of 6.6 MB charts but cost every ordinary call about 80 page
faults and 0.2 ms of system time.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from typing import Any

# Net container allocations between two automatic young-generation collections: more than a
# call makes from the largest body the default limit admits. A 6,000-result chart (6.5 MB) is
# about 67,000 containers once read, and more in the rules; at 50,000 each of its calls paid a
# collection of about 5 ms that scanned the body it was still reading.
YOUNG_COLLECTION_THRESHOLD = 250_000
# Calls between two young-generation collections made on purpose.
YOUNG_COLLECTION_CALLS = 100


def settle_worker_memory(app: Callable[..., Any]) -> Callable[..., Any]:
    """Set the collector up for serving, once the worker's WSGI `app` is built; the app to serve.

    What start-up built (FHIR models, compiled schemas, value sets, card text) lives as long as
    the worker: frozen, no collection scans it again (a full one took 15-20 ms).
    """
    configure_collector()
    return _CollectingYoungObjects(app, YOUNG_COLLECTION_CALLS)


def configure_collector() -> None:
    """Freeze what exists now and raise the young generation's threshold (see the module's
    docstring); the bench's in-process figures use it too, so they match a served worker."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)


class _CollectingYoungObjects:
    """A WSGI app that collects the young generation after every `every`-th call it answers."""

    def __init__(self, app: Callable[..., Any], every: int) -> None:
        self._app = app
        self._every = every
        self._calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            return self._app(environ, start_response)  # type: ignore[no-any-return]
        finally:
            self._calls += 1
            if self._calls >= self._every:
                self._calls = 0
                gc.collect(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._app, name)  # the Flask app's own attributes, for the server's hooks
