"""A Kubernetes API server on 127.0.0.1 for the calls the launch code makes, recording every request.

No API server runs here, so the launcher's real kubernetes client talks HTTP to this one. It serves custom objects
of any group (create, get, get .../status, list, delete), pod lists by label selector and pod logs (with
``follow``, ``timestamps`` and ``sinceSeconds``), and records each request as the attributes Kubernetes RBAC
authorizes: verb, API group, resource, subresource, namespace, name (k8s.io/apiserver pkg/endpoints/request
requestinfo.go: GET on a collection is ``list``, on an object ``get``, POST ``create``, DELETE ``delete``).

Tests script the cluster: ``on_poll(fake, key, obj, polls)`` runs on each status read of a job and may change its
status or add pods; ``log_errors`` are HTTP errors a pod's log answers first (400 while the container is
creating, 404 before the pod exists); ``log_segments`` are what successive log streams of a pod deliver before the
connection drops (each delivers the whole log so far, as a re-opened stream without an exact ``since`` does;
once the pod has ended, a stream delivers all of it).
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlparse

VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
START = datetime(2026, 12, 1, tzinfo=timezone.utc)


def stamp(i: int) -> str:
    """A kubelet log timestamp i seconds after START (RFC 3339 with trimmed nanoseconds, as kubelet writes)."""
    return (START + timedelta(seconds=i, microseconds=120000)).strftime("%Y-%m-%dT%H:%M:%S.12Z")


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict[str, Any]] = {}  # (group, plural, ns, name) -> object
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}  # (ns, name) -> pod
        self.calls: list[dict[str, Any]] = []
        self.polls: dict[tuple, int] = {}
        self.on_poll: Optional[Callable[["FakeKube", tuple, dict, int], None]] = None
        self.log_errors: dict[tuple[str, str], list[int]] = {}
        self.log_segments: dict[tuple[str, str], list[list[str]]] = {}
        self.log_requests: list[dict[str, Any]] = []
        self.streams: dict[tuple[str, str], int] = {}  # log streams served per pod
        self.created = threading.Event()
        self.last_created: dict[str, Any] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                url = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, reply = fake.handle(self.command, url.path, query, body, self)
                if code:
                    self._send(code, reply)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeKube":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api_client(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    # ------------------------------------------------------------------------------------------------- cluster
    def jobs(self, plural: str) -> list[dict[str, Any]]:
        return [o for (g, p, ns, n), o in self.objects.items() if p == plural]

    def add_pod(self, namespace: str, name: str, labels: dict[str, str], phase: str, created: int = 0) -> None:
        self.pods[(namespace, name)] = {
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "creationTimestamp": stamp(created).split(".")[0] + "Z"},
            "status": {"phase": phase}}

    def calls_of(self, verb: str, resource: str, subresource: str = "") -> list[dict[str, Any]]:
        return [c for c in self.calls if (c["verb"], c["resource"], c["subresource"]) == (verb, resource, subresource)]

    # ------------------------------------------------------------------------------------------------- routing
    def handle(self, method: str, path: str, query: dict[str, str], body: Any, handler: Any) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            return 404, {"kind": "Status", "code": 404}
        if len(rest) < 3 or rest[0] != "namespaces":
            return 404, {"kind": "Status", "code": 404}
        namespace, resource = rest[1], rest[2]
        name = rest[3] if len(rest) > 3 else ""
        sub = rest[4] if len(rest) > 4 else ""
        verb = VERBS.get(method) or ("get" if name else ("watch" if query.get("watch") == "true" else "list"))
        with self._lock:
            self.calls.append({"verb": verb, "group": group, "resource": resource, "subresource": sub,
                               "namespace": namespace, "name": name})
        if group == "" and resource == "pods":
            return self._pods(namespace, name, sub, query, handler)
        return self._custom(verb, group, resource, namespace, name, sub, body)

    def _custom(self, verb: str, group: str, plural: str, ns: str, name: str, sub: str,
                body: Any) -> tuple[int, Any]:
        key = (group, plural, ns, name or (body or {}).get("metadata", {}).get("name", ""))
        if verb == "create":
            if key in self.objects:
                return 409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
            obj = json.loads(json.dumps(body))
            obj["metadata"].setdefault("uid", f"uid-{len(self.objects)}")
            self.objects[key] = obj
            self.last_created = json.loads(json.dumps(obj))
            self.created.set()
            return 201, obj
        if verb == "list":
            return 200, {"items": [o for (g, p, n_s, _), o in self.objects.items() if (g, p, n_s) == key[:3]]}
        if key not in self.objects:
            return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
        if verb == "delete":
            del self.objects[key]
            for pod_key, pod in list(self.pods.items()):
                if pod_key[0] == ns and name in pod["metadata"]["name"]:
                    del self.pods[pod_key]
            return 200, {"kind": "Status", "status": "Success"}
        if verb == "get" and sub == "status":
            self.polls[key] = self.polls.get(key, 0) + 1
            if self.on_poll:
                self.on_poll(self, key, self.objects[key], self.polls[key])
        return 200, self.objects.get(key, {})

    def _pods(self, ns: str, name: str, sub: str, query: dict[str, str], handler: Any) -> tuple[int, Any]:
        if not name:
            wanted = dict(item.split("=", 1) for item in query.get("labelSelector", "").split(",") if item)
            items = [p for (n_s, _), p in self.pods.items()
                     if n_s == ns and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
            return 200, {"kind": "PodList", "items": items}
        if (ns, name) not in self.pods:
            return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
        if sub != "log":
            return 200, self.pods[(ns, name)]
        self.log_requests.append({"pod": name, **query})
        errors = self.log_errors.get((ns, name)) or []
        if errors:
            code = errors.pop(0)
            return code, {"kind": "Status", "code": code, "message": "container is waiting to start"}
        segments = self.log_segments.get((ns, name)) or []
        served = self.streams.get((ns, name), 0)
        self.streams[(ns, name)] = served + 1
        finished = self.pods[(ns, name)]["status"]["phase"] in ("Succeeded", "Failed")
        upto = segments if finished else segments[: served + 1]  # an ended container's log is whole
        lines = [line for seg in upto for line in seg]
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        for line in lines:
            handler.wfile.write((line + "\n").encode())
        handler.wfile.flush()
        return 0, None  # the connection closes: the stream dropped (or the container ended)

    def script_log(self, namespace: str, pod: str, segments: list[list[str]], errors: tuple[int, ...] = ()) -> None:
        """Log of ``pod``: first answer ``errors``, then stream segment 0, then segments 0-1, ... (the last one
        for every later request). Lines are 'TIMESTAMP text' (use ``stamp``)."""
        self.log_errors[(namespace, pod)] = list(errors)
        self.log_segments[(namespace, pod)] = segments
