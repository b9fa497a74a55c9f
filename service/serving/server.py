"""Serving with gunicorn: a production WSGI server, in the foreground, stopped by SIGTERM/SIGINT.

Workers are gevent workers (service.serving.worker.FlareWorker): every connection and every FHIR
query is a greenlet, so slow clients and slow FHIR servers hold memory, not threads, and hook work
never queues behind someone else's network wait. Measured on the no-prefetch workload (50 ms per
FHIR query, 32 connections), 2 gthread workers x 2 threads gave p99 about 1 s; see README.

Each worker builds its own app (no preload), so the FHIR client's pools and the database
connections are created after the fork (and after gevent's patching), inside the process that
uses them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from service.serving import worker
from service.serving.memory import settle_worker_memory
from service.settings import Settings, load_settings

log = logging.getLogger("flare_cds.server")

DEFAULT_WORKERS = 2
# Kept for `--threads` on existing command lines; gevent workers serve without a thread pool.
DEFAULT_THREADS = 2
WORKER_CLASS = "service.serving.worker.FlareWorker"
# Room for a CDS Hooks JWT (MAX_TOKEN_CHARS, 16 KiB) in Authorization, so an oversized token is a
# 401 from the verifier rather than a parser error.
MAX_HEADER_FIELD_BYTES = 20 * 1024


class GunicornApp(BaseApplication):  # type: ignore[misc]
    """gunicorn with options given in code; each worker calls `load_app` to build its app."""

    def __init__(self, options: dict[str, Any], load_app: Callable[[], Any]) -> None:
        self.options = options
        self.load_app = load_app
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return settle_worker_memory(self.load_app())


def load_flare_cds() -> Any:
    from service import create_app

    # Settings are read again in the worker from the same file and environment.
    return create_app(load_settings())


def gunicorn_options(
    host: str, port: int, workers: int, threads: int, loglevel: str
) -> dict[str, Any]:
    """The gunicorn settings `serve` runs with; the benchmark's baseline app reuses them as-is.

    `threads` has no effect on gevent workers; it stays in the signature for the callers."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "bind": bind,
        "workers": workers,
        "worker_class": WORKER_CLASS,
        "worker_connections": worker.limits().max_connections + worker.OVERFLOW_CONNECTIONS,
        "timeout": 30,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": None,  # the app logs each request as JSON, with its request id
        "errorlog": "-",
        "loglevel": loglevel.lower(),
        "proc_name": "flare-cds",
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": MAX_HEADER_FIELD_BYTES,
        # One shared control socket per user would let two instances collide; not needed here.
        "control_socket_disable": True,
    }


def configure_limits(settings: Settings) -> None:
    """The connection deadlines and bound of `settings`, for every worker forked after this."""
    http = settings.http
    worker.configure(
        worker.ServingLimits(
            header_timeout_seconds=http.header_timeout_seconds,
            body_timeout_seconds=http.body_timeout_seconds,
            max_connections=http.max_connections,
            cors_any_origin="*" in http.cors_origins,
        )
    )


# prometheus-client's multi-process mode reads this when first imported (in the workers).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


METRICS_DIR_PREFIX = "flare-cds-metrics-"


def _remove_stale_metrics_dirs() -> None:
    """Folders of servers that were killed (SIGKILL skips their clean-up): their pid is gone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR_PREFIX}*-*"):
        pid = folder.name[len(METRICS_DIR_PREFIX) :].partition("-")[0]
        if pid.isdigit() and folder.stat().st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker_exited(server: Any, worker: Any) -> None:
    from service.metrics import worker_exited

    worker_exited(worker.pid)


def serve(host: str, port: int, workers: int, threads: int, settings: Settings) -> int:
    from service.serving.store_setup import prepare_store

    if not prepare_store(settings):
        return 2
    configure_limits(settings)
    options = gunicorn_options(host, port, workers, threads, settings.logging.level)
    options["child_exit"] = _worker_exited
    # Fresh for each start: counts left by an earlier run would be added to this one's.
    _remove_stale_metrics_dirs()
    metrics_dir = Path(tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-"))
    os.environ[METRICS_DIR_ENV] = str(metrics_dir)
    try:
        GunicornApp(options, load_flare_cds).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
