"""Closing the SQLite store while other threads write to it (a shutdown under load)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Writer threads insert batches of issued cards without pause; the main thread closes the store
# under them. Each writer reports how many rows it was told were stored, then StoreClosed.
CLOSE_UNDER_WRITERS = """
    import json, sqlite3, threading, time
    from datetime import UTC, datetime
    from service.storage.errors import StoreClosed
    from service.storage.feedback import IssuedCard, SqliteFeedbackStore, patient_hash

    store = SqliteFeedbackStore({path!r})
    store.ping()
    stored, ends, started = [], [], threading.Barrier({writers} + 1)

    def card(worker, n):
        return IssuedCard(
            uuid=f"card-{{worker}}-{{n}}", service_id="svc", hook="order-sign",
            hook_instance="h", finding="igm-high", rule_version="1", indicator="warning",
            issued_at=datetime(2025, 3, 1, tzinfo=UTC), patient_hash=patient_hash(b"k" * 32, "p"),
        )

    def write(worker):
        done, n = 0, 0
        started.wait()
        try:
            while True:
                batch = [card(worker, n + i) for i in range({batch})]
                store.record_issued(batch if n % 2 else batch[:1])
                done += len(batch) if n % 2 else 1
                n += len(batch)
        except StoreClosed:
            ends.append("closed")
        except Exception as exc:
            ends.append(repr(exc))
        stored.append(done)

    threads = [threading.Thread(target=write, args=(w,)) for w in range({writers})]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(0.3)
    store.close()
    for thread in threads:
        thread.join(timeout=60)
    db = sqlite3.connect({path!r})
    rows = db.execute("SELECT count(*) FROM issued_cards").fetchone()[0]
    db.close()
    print(json.dumps({{"ends": sorted(set(ends)), "told": sum(stored), "rows": rows}}))
"""


def test_closing_the_store_under_writing_threads_ends_them_cleanly(tmp_path: Path) -> None:
    """A connection closed while its thread is inside SQLite crashes the process; close() waits
    for each thread's call to end, and every row a writer was told was stored is in the file."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(8):  # the crash needs the close to land inside a call (1 in 3)
        path = str(tmp_path / f"feedback-{attempt}.sqlite3")
        script = textwrap.dedent(CLOSE_UNDER_WRITERS).format(path=path, writers=6, batch=40)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outcome = json.loads(done.stdout)
        assert outcome["ends"] == ["closed"]
        assert outcome["told"] == outcome["rows"] > 0
