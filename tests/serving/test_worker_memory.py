"""A worker's collector settings (service.serving.memory), in a fresh interpreter: they are
process-wide, and the test process must keep its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from service.serving.memory import YOUNG_COLLECTION_THRESHOLD


def _run(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()


def test_settled_worker_freezes_start_up_and_collects_young_objects_rarely() -> None:
    out = _run(
        """
        import gc
        from service.serving.memory import settle_worker_memory
        kept = [{"model": i} for i in range(1000)]  # what start-up built
        settle_worker_memory()
        print(gc.get_threshold()[0], gc.get_freeze_count() >= len(kept))
        """
    )
    assert out == [str(YOUNG_COLLECTION_THRESHOLD), "True"]
