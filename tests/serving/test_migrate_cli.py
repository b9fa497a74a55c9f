"""`flare-cds migrate`: the schema brought up to date on either store, before instances start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from service.storage.feedback import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[2]


def migrate(config: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.serving.cli", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_migrate_creates_the_postgresql_schema_once(tmp_path: Path, postgres_url: str) -> None:
    config = tmp_path / "flare-cds.toml"
    config.write_text(f"[storage]\nurl = {json.dumps(postgres_url)}\n")
    for _ in range(2):  # a second run finds nothing to do
        result = migrate(config)
        assert result.returncode == 0, result.stderr
        assert f"schema version {SCHEMA_VERSION}" in result.stdout
    with psycopg.connect(postgres_url) as connection:
        versions = connection.execute("SELECT version FROM schema_migrations").fetchall()
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert {"issued_cards", "feedback", "seen_jti", "store_secrets"} <= {t for (t,) in tables}


def test_the_sqlite_file_is_beside_the_config_from_whatever_folder(tmp_path: Path) -> None:
    """The same configuration started from two folders uses one file (and so one replay cache
    and one feedback store), not one per working directory."""
    config = tmp_path / "site" / "flare-cds.toml"
    config.parent.mkdir()
    config.write_text('[storage]\nurl = "sqlite:///data/cds.sqlite3"\n')
    for cwd in (tmp_path, tmp_path / "site"):
        result = migrate(config, cwd)
        assert result.returncode == 0, result.stderr
        assert f"sqlite:///{tmp_path / 'site' / 'data' / 'cds.sqlite3'}:" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]


def test_migrate_fails_clearly_without_a_server_and_shows_no_password(tmp_path: Path) -> None:
    from tests.conftest import free_port

    config = tmp_path / "flare-cds.toml"
    url = f"postgresql://flare:pa55word@127.0.0.1:{free_port()}/flare"
    config.write_text(f"[storage]\nurl = {json.dumps(url)}\n")
    result = migrate(config)
    assert result.returncode == 1
    assert "migrate: postgresql://flare@127.0.0.1" in result.stderr
    assert "pa55word" not in result.stderr + result.stdout
