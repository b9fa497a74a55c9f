"""The flare-cds benchmark: the production server (`flare-cds serve`) against a baseline Flask app.

Run it with `make bench` (or `python -m bench --help`). It writes `bench/results.json` and
`bench/results.md`; scratch files (configs, request bodies, logs, the SQLite store) go to
`bench/out/`, which git ignores.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
