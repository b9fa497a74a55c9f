"""How a worker's memory is kept: what the collector scans, and when the C heap gives back.

Two defaults of CPython and glibc suit a short script better than a worker answering hook calls
whose bodies are 100 kB to several MB of JSON:

- The collector scans the youngest objects every 700 net container allocations. A call's parsed
  body is a few thousand containers that reference counting frees when the call ends, so the
  scans found nothing to collect and cost about 0.5 ms of CPU per call (three young and a
  quarter of a middle-generation collection, each over the bodies of the calls in flight).
- glibc serves blocks from 128 kB up with their own mappings, returned when freed, but raises
  that bound to the size of each such block freed. After one 6.6 MB chart, every later body and
  buffer of that size comes from the heap, whose free top glibc keeps up to twice the bound:
  about 3-4 MB more peak per worker across a series of large calls.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger("flare_cds.server")

# Net container allocations between two young-generation collections; cyclic garbage (rare on
# the request path) waits at most this long, and a collection comes every few dozen calls.
YOUNG_COLLECTION_THRESHOLD = 50_000
# Blocks this large or larger get their own mapping, returned to the system when freed
# (glibc's own starting value, kept fixed instead of rising).
OWN_MAPPING_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def settle_worker_memory() -> bool:
    """Set the collector and the C heap up for serving, once the worker's app is built.

    What start-up built (FHIR models, compiled schemas, value sets, card text) lives as long as
    the worker: frozen, no collection scans it again (a full one took 15-20 ms). Returns whether
    the C heap's setting applied (glibc only; elsewhere the system's default stays).
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, oldest)
    return _fix_own_mapping_threshold()


def _fix_own_mapping_threshold() -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt  # symbols already loaded: the C library's
    except (AttributeError, OSError):
        return False  # not glibc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, OWN_MAPPING_BYTES))
    if not applied:
        log.warning("the C heap refused a fixed mapping threshold; its default stays")
    return applied
