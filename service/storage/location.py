"""Which store `storage.url` names: an SQLite file on this host, or one PostgreSQL database.

`service.settings` has already made relative paths absolute; settings built in code (tests,
tools) may still hold a relative `database`, read here against the working directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from service.settings import StorageSettings

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


@dataclass(frozen=True)
class StorageLocation:
    backend: str  # SQLITE or POSTGRESQL
    path: Path | None = None  # the SQLite file
    conninfo: str | None = None  # the PostgreSQL URL, as given (it may hold a password)

    def describe(self) -> str:
        """For logs and messages: the URL without its password."""
        if self.backend == SQLITE:
            return f"sqlite:///{self.path}"
        parts = urlsplit(self.conninfo or "")
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit((parts.scheme, f"{user}{host}{port}", parts.path, "", ""))


def storage_location(settings: StorageSettings) -> StorageLocation:
    url = settings.url or f"sqlite:///{settings.database}"
    scheme, _, rest = url.partition("://")
    if scheme.lower() in ("postgresql", "postgres"):
        return StorageLocation(POSTGRESQL, conninfo=url)
    return StorageLocation(SQLITE, path=Path(rest[1:]).expanduser().absolute())
