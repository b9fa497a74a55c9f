"""A small FHIR R4 server on loopback, for tests and the benchmark.

It answers reads and the handful of searches the service's prefetch templates use, pages with
`_count` (optionally capped), honours `_include=<Type>:medication`, records every request, and
can be told to misbehave (delays, error statuses, non-JSON, OperationOutcome answers, next links
to another origin, ignoring the patient filter) so the client's failure paths are tested against
real HTTP rather than mocks.

Fault settings are plain attributes, each one value for every resource type, a {type: value}
mapping, or (for the on/off faults) a set of types: `server.fail_status = {"Observation": 500}`.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode

from werkzeug.datastructures import MultiDict
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

FHIR_JSON = "application/fhir+json"
# Where a resource keeps the date `_sort=date` orders by, first match wins.
_DATE_PATHS = (
    ("effectiveDateTime",),
    ("effectivePeriod", "start"),
    ("issued",),
    ("authoredOn",),
    ("onsetDateTime",),
    ("recordedDate",),
)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    args: MultiDict[str, str]
    authorization: str | None
    accept: str | None


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """One log line per request would drown test output."""


class _KeepAliveHandler(BaseHTTPRequestHandler):
    """The same WSGI app behind HTTP/1.1 persistent connections, as production FHIR servers keep
    them. Werkzeug's server closes after every answer (it drains the socket, which would eat the
    next request), so every query would pay a new TCP connection that a real server spares."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm the body would wait
    # for the client's delayed ACK (40 ms) on every answer.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """One log line per request would drown test output."""

    def do_GET(self) -> None:
        try:
            self._serve()
        except ConnectionError:
            self.close_connection = True  # the client gave up (a deadline): not a server error

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _serve(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0],
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(length),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(self.rfile.read(length) if length else b""),
            "wsgi.errors": io.StringIO(),
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in self.headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                environ[key] = value
        answer: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
            answer[:] = [status, headers]
            return self.wfile.write

        body = self.server.app(environ, start_response)  # type: ignore[attr-defined]
        try:
            status, headers = answer
            self.send_response(int(status.split(" ", 1)[0]), status.split(" ", 1)[1])
            chunks: Iterable[bytes] = body
            if not any(name.lower() == "content-length" for name, _ in headers):
                data = b"".join(body)
                headers = [*headers, ("Content-Length", str(len(data)))]
                chunks = (data,)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            for chunk in chunks if self.command != "HEAD" else ():
                self.wfile.write(chunk)
                self.wfile.flush()
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


class _KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: Any) -> None:
        super().__init__(address, _KeepAliveHandler)
        self.app = app
        self.connections_opened = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections_opened += 1  # on the serving thread only
        super().process_request(request, client_address)


def _fault(setting: Any, resource_type: str) -> Any:
    if isinstance(setting, Mapping):
        return setting.get(resource_type)
    if isinstance(setting, set | frozenset | list | tuple):
        return resource_type in setting
    return setting


def _unpack(resource: Any) -> list[dict[str, Any]]:
    """A Bundle's entry resources, or the resource itself; OperationOutcomes are not data."""
    if not isinstance(resource, dict) or resource.get("resourceType") == "OperationOutcome":
        return []
    if resource.get("resourceType") == "Bundle":
        return [r for e in resource.get("entry") or [] for r in _unpack(e.get("resource"))]
    return [resource]


def hook_request_resources(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every resource in the `prefetch` values of CDS Hooks request files (directories recurse)."""
    resources: list[dict[str, Any]] = []
    for path in map(Path, paths):
        for file in sorted(path.rglob("*.json")) if path.is_dir() else [path]:
            request = json.loads(file.read_text(encoding="utf-8"))
            for value in (request.get("prefetch") or {}).values():
                resources.extend(_unpack(value))
    return resources


def _codings(resource: dict[str, Any]) -> list[dict[str, Any]]:
    concepts = [
        resource.get("code"),
        resource.get("medicationCodeableConcept"),
        (resource.get("medication") or {}).get("concept"),  # R5 CodeableReference
    ]
    return [
        c for concept in concepts if isinstance(concept, dict) for c in concept.get("coding", [])
    ]


def _token_matches(token: str, codings: list[dict[str, Any]]) -> bool:
    system, sep, code = token.rpartition("|")
    return any(
        c.get("code") == code and (not sep or not system or c.get("system") == system)
        for c in codings
    )


def _patient_of(resource: dict[str, Any]) -> str:
    for field in ("subject", "patient"):
        reference = (resource.get(field) or {}).get("reference")
        if isinstance(reference, str):
            return reference
    return ""


def _reference_matches(resource: dict[str, Any], value: str) -> bool:
    return _patient_of(resource) == (value if "/" in value else f"Patient/{value}")


def _date(resource: dict[str, Any]) -> str | None:
    for path in _DATE_PATHS:
        value: Any = resource
        for step in path:
            value = value.get(step) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return None


def _matches(resource: dict[str, Any], args: MultiDict[str, str]) -> bool:
    """AND across parameters and repeats, OR across a comma list; unknown parameters are ignored
    the way a lenient FHIR server does."""
    for name, value in args.items(multi=True):
        options = value.split(",")
        if name in ("patient", "subject"):
            ok = any(_reference_matches(resource, o) for o in options)
        elif name == "_id":
            ok = resource.get("id") in options
        elif name == "code":
            ok = any(_token_matches(o, _codings(resource)) for o in options)
        elif name == "status":
            ok = resource.get("status") in options
        elif name == "clinical-status":
            coding = (resource.get("clinicalStatus") or {}).get("coding", [])
            ok = any(_token_matches(o, coding) for o in options)
        else:
            continue
        if not ok:
            return False
    return True


class FhirTestServer:
    """`with FhirTestServer() as fhir:` serves `fhir.base_url` until the block ends."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        base_path: str = "/fhir",
        *,
        keep_alive: bool = False,
    ) -> None:
        self.host = host
        # Off by default: the client's tests then see a new connection for every request, the
        # hardest case for its deadlines. The benchmark keeps connections, as real servers do.
        self.keep_alive = keep_alive
        self.base_path = base_path.rstrip("/")
        self._port = port
        self._lock = threading.Lock()
        # Keyed by (type, id, patient): fixtures reuse ids like "igm-2026-11-15" across patients,
        # and every patient's searches must still find all of that patient's data.
        self._resources: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.reset_faults()

    def reset_faults(self) -> None:
        self.delay_seconds: float | Mapping[str, float] = 0.0
        self.fail_status: int | Mapping[str, int] | None = None
        self.malformed: bool | Iterable[str] = False
        self.operation_outcome: bool | Iterable[str] = False
        self.next_link_origin: str | None = None  # e.g. "http://127.0.0.2:8123"
        self.required_token: str | None = None  # when set, other tokens get 401
        # Real servers cap `_count`; a small cap makes any search page.
        self.max_page_size: int | None = None
        # A server that ignores the patient filter hands out every patient's data.
        self.ignore_patient: bool | Iterable[str] = False
        # Send the status and headers, then the body one byte every this many seconds.
        self.trickle_seconds: float | Mapping[str, float] = 0.0
        # Answer 200 with exactly these bytes as FHIR JSON (e.g. JSON with NaN in it).
        self.raw_body: bytes | None = None
        # Keep each answer and send it again for the same URL (the benchmark's data never
        # changes): the loopback server must not be what limits a load test.
        self.cache_answers = False
        self._answers: dict[str, tuple[int, bytes]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FhirTestServer:
        if self.keep_alive:
            self._server = _KeepAliveServer((self.host, self._port), self._app)
        else:
            self._server = make_server(
                self.host, self._port, self._app, threaded=True, request_handler=_QuietHandler
            )
        self._port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # quick shutdown
            name=f"fhir-test-server-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in an injected delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FhirTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def connections_opened(self) -> int:
        """TCP connections accepted so far (keep-alive mode only: the other closes each one)."""
        if not self.keep_alive:
            raise RuntimeError("connections are counted only with keep_alive=True")
        return int(self._server.connections_opened)

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def base_url(self) -> str:
        return self.origin + self.base_path

    # -- data and records ------------------------------------------------------------------

    def add_resources(self, resources: Iterable[dict[str, Any]]) -> int:
        """Store resources (Bundles are unpacked into their entries); returns how many."""
        added = 0
        with self._lock:
            for resource in (r for item in resources for r in _unpack(item)):
                resource_id = resource.get("id") or f"generated-{len(self._resources) + 1}"
                key = (resource["resourceType"], resource_id, _patient_of(resource))
                self._resources[key] = {**resource, "id": resource_id}
                added += 1
        return added

    def load_fixture_requests(self, paths: Iterable[str | Path]) -> int:
        """Store every resource from the prefetch of CDS Hooks request files or directories."""
        return self.add_resources(hook_request_resources(paths))

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- HTTP ------------------------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = Request(environ)
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    request.method,
                    request.path,
                    request.query_string.decode("latin-1"),
                    request.args.copy(),
                    request.headers.get("Authorization"),
                    request.headers.get("Accept"),
                )
            )
        segments = [s for s in request.path[len(self.base_path) :].split("/") if s]
        if self.cache_answers and request.full_path in self._answers:
            delay = _fault(self.delay_seconds, segments[0] if segments else "") or 0.0
            if delay:
                self._stopping.wait(delay)
            status, data = self._answers[request.full_path]
            return Response(data, status, mimetype=FHIR_JSON)(environ, start_response)
        response = self._respond(request)
        if self.cache_answers:
            self._answers[request.full_path] = (response.status_code, response.get_data())
        trickle = _fault(self.trickle_seconds, segments[0] if segments else "") or 0.0
        if trickle:
            data = response.get_data()
            # With a Content-Length (not chunked) a client cannot tell a byte from a chunk.
            response = Response(
                self._trickled(data, trickle),
                response.status_code,
                headers={"Content-Length": str(len(data))},
                mimetype=FHIR_JSON,
                direct_passthrough=True,
            )
        return response(environ, start_response)

    def _trickled(self, body: bytes, interval: float) -> Iterable[bytes]:
        for index in range(len(body)):
            if self._stopping.wait(interval):
                return
            yield body[index : index + 1]

    def _respond(self, request: Request) -> Response:
        if request.method != "GET":
            return _outcome(405, "not-supported", "only GET is supported")
        if not request.path.startswith(self.base_path + "/"):
            return _outcome(404, "not-found", "not a FHIR endpoint")
        segments = [s for s in request.path[len(self.base_path) :].split("/") if s]
        resource_type = segments[0] if segments else ""
        delay = _fault(self.delay_seconds, resource_type) or 0.0
        if delay:
            self._stopping.wait(delay)
        if self.required_token and (
            request.headers.get("Authorization") != f"Bearer {self.required_token}"
        ):
            return _outcome(401, "login", "invalid or missing access token")
        status = _fault(self.fail_status, resource_type)
        if status:
            return _outcome(status, "exception", f"injected failure {status}")
        if self.raw_body is not None:
            return Response(self.raw_body, 200, mimetype=FHIR_JSON)
        if _fault(self.malformed, resource_type):
            return Response("<html><body>Bad gateway</body></html>", 200, mimetype="text/html")
        if _fault(self.operation_outcome, resource_type):
            return _outcome(200, "processing", "search could not be completed")
        if len(segments) == 2:
            return self._read(resource_type, segments[1])
        if len(segments) == 1:
            return self._search(resource_type, request.args)
        return _outcome(400, "not-supported", "only read and type-level search are supported")

    def _read(self, resource_type: str, resource_id: str) -> Response:
        key = (resource_type, resource_id)
        with self._lock:  # the last one stored wins when patients share an id
            found = [r for (t, i, _), r in self._resources.items() if (t, i) == key]
        if not found:
            return _outcome(404, "not-found", f"{resource_type}/{resource_id} is not known")
        return _json(200, found[-1])

    def _search(self, resource_type: str, args: MultiDict[str, str]) -> Response:
        ignored = {"_sort", "_count", "_getpages", "_include"}
        if _fault(self.ignore_patient, resource_type):
            ignored |= {"patient", "subject"}
        criteria = MultiDict([(k, v) for k, v in args.items(multi=True) if k not in ignored])
        with self._lock:
            found = [
                r
                for (kind, _, _), r in self._resources.items()
                if kind == resource_type and _matches(r, criteria)
            ]
        sort = args.get("_sort")
        if sort in ("date", "-date"):
            dated = sorted((r for r in found if _date(r)), key=_date, reverse=sort == "-date")
            found = dated + [r for r in found if not _date(r)]  # undated last either way
        count = args.get("_count", type=int)
        if self.max_page_size is not None:
            count = min(count or self.max_page_size, self.max_page_size)
        offset = args.get("_getpages", 0, type=int)
        page = found[offset : offset + count] if count else found[offset:]
        base_args = [(k, v) for k, v in args.items(multi=True) if k != "_getpages"]
        links = [{"relation": "self", "url": self._page_url(resource_type, base_args, offset)}]
        if count and offset + count < len(found):
            next_url = self._page_url(resource_type, base_args, offset + count)
            if self.next_link_origin:
                next_url = self.next_link_origin.rstrip("/") + next_url[len(self.origin) :]
            links.append({"relation": "next", "url": next_url})
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "link": links,
        }
        included = self._included(page, args.getlist("_include"))
        if page or included:
            bundle["entry"] = [
                {
                    "fullUrl": f"{self.base_url}/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": mode},
                }
                for mode, group in (("match", page), ("include", included))
                for r in group
            ]
        return _json(200, bundle)

    def _included(self, page: list[dict[str, Any]], includes: list[str]) -> list[dict[str, Any]]:
        """`_include=<Type>:medication`: the Medications the page's resources reference."""
        if not any(i.endswith(":medication") for i in includes):
            return []
        wanted = []
        for resource in page:
            for ref in (
                resource.get("medicationReference"),
                (resource.get("medication") or {}).get("reference"),  # R5 CodeableReference
            ):
                target = (ref or {}).get("reference") if isinstance(ref, dict) else None
                if isinstance(target, str) and target.startswith("Medication/"):
                    wanted.append(target.split("/", 1)[1])
        with self._lock:
            found = {
                i: r
                for (t, i, _), r in self._resources.items()
                if t == "Medication" and i in wanted
            }
        return [found[i] for i in dict.fromkeys(wanted) if i in found]

    def _page_url(self, resource_type: str, args: list[tuple[str, str]], offset: int) -> str:
        query = urlencode(args + ([("_getpages", str(offset))] if offset else []))
        return f"{self.base_url}/{resource_type}" + (f"?{query}" if query else "")


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status, content_type=FHIR_JSON)


def _outcome(status: int, code: str, text: str) -> Response:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    response = _json(status, outcome)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="fhir-test-server"'
    return response
