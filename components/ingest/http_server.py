"""Serve a local directory over HTTP on 127.0.0.1 (a free port, a background thread, no access log).

The demo source turns installed image files into a URL list this way, so they are ingested exactly like web images.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import quote


class QuietFileHandler(SimpleHTTPRequestHandler):
    """Serves files under the server's directory; counts GET requests per path instead of logging them."""

    server: "_CountingServer"

    def do_GET(self) -> None:
        self.server.count(self.path)
        super().do_GET()

    def log_message(self, format: str, *args) -> None:
        pass


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow client must not keep the process alive at exit
    # socketserver's default backlog of 5 drops connections when img2dataset opens dozens at once; the dropped
    # clients' SYN retries (1 s, 3 s, 7 s...) then surface as download timeouts.
    request_queue_size = 256

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1

    def handle_error(self, request, client_address) -> None:
        # A client that gave up (a download timeout) is routine here; anything else is still reported.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass(frozen=True)
class FileServer:
    base_url: str  # http://127.0.0.1:PORT
    root: Path
    _server: _CountingServer

    @property
    def host(self) -> str:
        """The address it listens on (for an ingest allow-list entry)."""
        return str(self._server.server_address[0])

    def url(self, relative_path: str) -> str:
        """The URL of a file under root (path segments percent-encoded)."""
        return f"{self.base_url}/{quote(relative_path)}"

    def requests(self) -> Counter[str]:
        """GET requests so far per URL path (a copy)."""
        with self._server._lock:
            return Counter(self._server.requests)


@contextlib.contextmanager
def serve_directory(root: str | Path, handler: type[QuietFileHandler] = QuietFileHandler) -> Iterator[FileServer]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"cannot serve {root}: not a directory")
    httpd = _CountingServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, name=f"http-{root.name}", daemon=True)
    thread.start()
    try:
        yield FileServer(f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
