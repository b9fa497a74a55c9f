"""A worker's collector and C heap settings (service.serving.memory), in a fresh interpreter each
time: they are process-wide, and the test process must keep its own."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

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
    assert YOUNG_COLLECTION_THRESHOLD > 10 * 700  # far above CPython's default


# A large body's worth of memory, freed: what a worker sees after each 6 MB chart.
_FREED_BLOCKS = """
    import sys
    from service.serving.memory import settle_worker_memory

    def resident_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024

    if sys.argv[-1] == "settled":
        assert settle_worker_memory()
    before = resident_mb()
    for _ in range(3):
        block = bytearray(16 * 1024 * 1024)  # zero-filled, so every page is touched
        del block
    print(resident_mb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc heap setting")
def test_large_blocks_go_back_to_the_system_once_freed() -> None:
    def kept_mb(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_FREED_BLOCKS), mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(done.stdout)

    # By default glibc keeps the second and later 16 MB blocks in its heap once freed.
    assert kept_mb("default") >= 15
    assert kept_mb("settled") <= 2
