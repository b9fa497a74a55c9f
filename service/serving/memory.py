"""What a worker's garbage collector scans, set once its app is built.

CPython scans the youngest objects every 700 net container allocations, a default that suits a
short script better than a worker answering hook calls whose bodies are 100 kB to several MB of
JSON. A call's parsed body is a few thousand containers that reference counting frees when the
call ends, so the scans found nothing to collect and cost about 0.5 ms of CPU per call (three
young and a quarter of a middle-generation collection, each over the bodies of the calls in
flight).

glibc's heap is left with its own dynamic thresholds: fixing the mapping threshold (mallopt)
took 3-4 MB off the peak of a series of 6.6 MB charts but cost every ordinary call about 80 page
faults and 0.2 ms of system time.
"""

from __future__ import annotations

import gc

# Net container allocations between two young-generation collections; cyclic garbage (rare on
# the request path) waits at most this long, and a collection comes every few dozen calls.
YOUNG_COLLECTION_THRESHOLD = 50_000


def settle_worker_memory() -> None:
    """Set the collector up for serving, once the worker's app is built.

    What start-up built (FHIR models, compiled schemas, value sets, card text) lives as long as
    the worker: frozen, no collection scans it again (a full one took 15-20 ms).
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)
