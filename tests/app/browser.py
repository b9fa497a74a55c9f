"""Headless Chromium for page tests: Debian's `chromium` driven by Playwright.

Never `playwright install` (it downloads a browser build of its own): the project's set-up
installs the distribution's package, and a machine without it fails the test with the command
that installs it. It is never skipped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("FLARE_CDS_TEST_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get install -y chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots a person can look at after a run (see README, "The IgM timeline").
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "timeline"


@contextmanager
def chromium(width: int = 1280, height: int = 1600) -> Iterator[Any]:
    """A fresh browser context (empty profile) as a Playwright BrowserContext."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"Chromium is not installed at {CHROMIUM}; install it with: {INSTALL}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing; run: make venv")
    profile = tempfile.mkdtemp(prefix="flare-cds-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
                viewport={"width": width, "height": height},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
