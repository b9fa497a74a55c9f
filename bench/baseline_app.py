"""The baseline: the least a Flask service can do with a hook call, under the same gunicorn.

It reads and parses the same JSON body and answers `{"cards": []}`, served with exactly the
options `flare-cds serve` uses (service.serving.server.gunicorn_options), so the ratio of the two
throughputs is the cost of the service's own work, not of the framework, the server or the load
generator.

Run: python -m bench.baseline_app --host 127.0.0.1 --port 8090 --workers 2 --threads 4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from flask import Flask, Response, jsonify, request

from service.serving.server import GunicornApp, gunicorn_options


def create_baseline_app() -> Flask:
    app = Flask("flare_cds_baseline")

    @app.post("/cds-services/<service_id>")
    def call_service(service_id: str) -> Response:
        # The same reading as service.api.routes.read_json_body: raw bytes, then json.loads.
        body = json.loads(request.get_data(cache=False))
        if not isinstance(body, dict):
            return Response(status=400)
        return jsonify({"cards": []})

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    options = gunicorn_options(args.host, args.port, args.workers, args.threads, "info")
    # Only the process title differs, so `ps` tells the two servers apart.
    options["proc_name"] = "flare-cds-baseline"
    GunicornApp(options, create_baseline_app).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
