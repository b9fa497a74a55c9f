"""A worker's collector settings (service.serving.memory), in a fresh interpreter: they are
process-wide, and the test process must keep its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from service.serving.memory import YOUNG_COLLECTION_CALLS, YOUNG_COLLECTION_THRESHOLD


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
        settle_worker_memory(lambda environ, start_response: [b""])
        print(gc.get_threshold()[0], gc.get_freeze_count() >= len(kept))
        """
    )
    assert out == [str(YOUNG_COLLECTION_THRESHOLD), "True"]


def test_cyclic_garbage_of_each_call_is_collected_every_so_many_calls() -> None:
    # Each call leaves a self-referring closure, as Werkzeug's URL matcher does.
    out = _run(
        f"""
        import gc
        import weakref
        from service.serving.memory import settle_worker_memory

        left = []

        def app(environ, start_response):
            class Garbage:
                pass
            cycle = Garbage()
            cycle.me = cycle
            left.append(weakref.ref(cycle))
            return [b"ok"]

        served = settle_worker_memory(app)
        for _ in range({YOUNG_COLLECTION_CALLS} - 1):
            assert served({{}}, None) == [b"ok"]
        before = sum(ref() is not None for ref in left)
        served({{}}, None)
        print(before, sum(ref() is not None for ref in left))
        """
    )
    assert out == [str(YOUNG_COLLECTION_CALLS - 1), "0"]
