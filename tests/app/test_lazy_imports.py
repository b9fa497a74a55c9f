"""Libraries only some routes use are loaded when first used, never by creating the app.

A hook worker that never draws a chart or starts a SMART launch must not carry matplotlib (with
numpy and Pillow), an HTTP client or cryptography: together about 60 MB per worker. Each check
runs in a fresh interpreter, since in the test process other tests have long since loaded them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The module that needs them, and what it loads.
LAZY = {
    "service.app.chart": ("matplotlib", "numpy", "PIL"),
    "service.app.sealed_state": ("cryptography",),
    "service.record.fhir_client": ("urllib3", "certifi"),
}
LOADED_BY_APP_THEN_BY_MODULE = """
import importlib, json, sys
from pathlib import Path
from service import create_app
from service.settings import Settings

folder, module, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
storage = {"database": str(folder / "flare-cds.sqlite3"), "spool_directory": str(folder / "spool")}
create_app(Settings().replace(storage=storage))
loaded = lambda: sorted(name for name in names if name in sys.modules)
after_app = loaded()
importlib.import_module(module)
print(json.dumps({"after_app": after_app, "after_module": loaded()}))
"""


@pytest.mark.parametrize("module", LAZY)
def test_creating_the_app_does_not_load_it(tmp_path: Path, module: str) -> None:
    names = LAZY[module]
    result = subprocess.run(
        [sys.executable, "-c", LOADED_BY_APP_THEN_BY_MODULE, str(tmp_path), module, *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert loaded["after_app"] == []
    # The same check sees them once the module that needs them is imported.
    assert loaded["after_module"] == sorted(names)
