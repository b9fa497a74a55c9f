"""The baseline: the least a Flask service can do with a hook call, under gunicorn.

It reads the body, parses it as a plain Flask app does (the standard library's json, which
`request.get_json()` uses) and answers `{"cards": []}`. The ratio of the service's throughput to
this app's is the cost of the service's own work, not of Flask or the load generator.

The server settings are chosen on the command line: `--server flare-cds` is exactly what
`flare-cds serve` runs (service.serving.server.gunicorn_options, the gevent worker); `sync` and
`gthread` are plain gunicorn workers. The bench measures several and keeps the fastest
(bench/baseline_search.py), so the service is compared with the best a bare app gets here.

Run: python -m bench.baseline_app --host 127.0.0.1 --port 8090 --workers 2 --server sync
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, jsonify, request

from service.serving.server import GunicornApp, gunicorn_options

SERVERS = ("flare-cds", "sync", "gthread")


def create_baseline_app() -> Flask:
    app = Flask("flare_cds_baseline")

    @app.post("/cds-services/<service_id>")
    def call_service(service_id: str) -> Response:
        body = json.loads(request.get_data(cache=False))
        if not isinstance(body, dict):
            return Response(status=400)
        return jsonify({"cards": []})

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    return app


def server_options(server: str, host: str, port: int, workers: int, threads: int) -> dict[str, Any]:
    options = gunicorn_options(host, port, workers, threads, "warning")
    if server == "sync":
        options.update(worker_class="sync", threads=1)
        options.pop("worker_connections", None)
    elif server == "gthread":
        options.update(worker_class="gthread", threads=threads)
        options.pop("worker_connections", None)
    elif server != "flare-cds":
        raise ValueError(f"unknown server settings {server!r}; one of {', '.join(SERVERS)}")
    # Only the process title differs, so `ps` tells the two servers apart.
    options["proc_name"] = "flare-cds-baseline"
    return options


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="gthread only")
    parser.add_argument("--server", choices=SERVERS, default="flare-cds")
    args = parser.parse_args(argv)
    options = server_options(args.server, args.host, args.port, args.workers, args.threads)
    GunicornApp(options, create_baseline_app).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
