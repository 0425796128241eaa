"""What a URL list may make ingest fetch (components/ingest/egress.py): real img2dataset over real sockets on
127.0.0.1 only. No test sends a packet to any other address: refused addresses are refused before a connection,
which the in-process tests prove by failing any socket connect that is not to 127.0.0.1."""

from __future__ import annotations

import base64
import io
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from PIL import Image
from webdataset_reader import webdataset_samples

from components.ingest import cli as ingest_cli
from components.ingest.egress import EgressPolicy, Refused, opener
from components.ingest.ingest import ingest
from components.ingest.options import IngestOptions

LOOPBACK = ("127.0.0.1/32",)
BIG = 300_000  # bytes; the tests cap responses at 100 kB


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((40, 32), 30 + seed).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


class Site(BaseHTTPRequestHandler):
    """/img/N.jpg images, /big and /big-chunked over the cap, and redirects to places ingest must not go."""

    targets: dict[str, str] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        if self.path.startswith("/img/"):
            self._send(_jpeg(int(self.path.split("/")[-1].split(".")[0])))
        elif self.path == "/big":
            self._send(_jpeg(0) + b"\0" * BIG)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = _jpeg(1) + b"\0" * BIG
            for i in range(0, len(body), 16384):
                part = body[i:i + 16384]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path in self.targets:
            self.send_response(302)
            self.send_header("Location", self.targets[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def listener():
    """A TCP port on 127.0.0.1 that counts connections (the ftp:// rows point at it: none may arrive)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                accepted.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield sock.getsockname()[1], accepted
    stop.set()
    thread.join()
    sock.close()


@pytest.fixture(scope="module")
def site(listener):
    port, _ = listener
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    server.seen = []
    Site.targets = {"/to-metadata": "http://169.254.169.254/latest/meta-data/",
                    "/to-file": "file:///etc/passwd", "/to-ftp": f"ftp://127.0.0.1:{port}/x.png",
                    "/to-img": "/img/7.jpg"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def _ingest(rows, out, tmp_path, **options):
    table = pd.DataFrame(rows, columns=["url", "caption"])
    path = tmp_path / "urls.parquet"
    table.to_parquet(path)
    opts = IngestOptions(image_size=32, number_sample_per_shard=50, processes=1, threads=4, timeout=5,
                         min_success_rate=0.0, **options)
    return ingest(str(path), out, opts)


def _captions(doc) -> list[str]:
    return sorted(s["txt"].decode() for s in webdataset_samples([s["uri"] for s in doc["shards"]]))


@pytest.mark.slow
def test_loopback_is_refused_by_default_and_served_when_allowed(site, tmp_path):
    base, server = site
    rows = [(f"{base}/img/{i}.jpg", f"image {i}") for i in range(4)]
    before = len(server.seen)
    refused = _ingest(rows, (tmp_path / "refused").as_uri(), tmp_path)
    assert refused["counts"] == {"total": 4, "success": 0, "failed": {"refused: address": 4}}
    assert len(server.seen) == before  # not one request reached the server
    served = _ingest(rows, (tmp_path / "served").as_uri(), tmp_path, allow_networks=LOOPBACK)
    assert served["counts"] == {"total": 4, "success": 4, "failed": {}}
    assert _captions(served) == [f"image {i}" for i in range(4)]


@pytest.mark.slow
def test_urls_that_read_local_files_or_other_schemes_never_reach_a_shard(site, listener, tmp_path):
    base, _ = site
    port, accepted = listener
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    data_uri = "data:image/png;base64," + base64.b64encode(_png()).decode()
    rows = [("file:///etc/passwd", "passwd"), (secret.as_uri(), "local png"), (data_uri, "inline png"),
            (f"ftp://127.0.0.1:{port}/x.png", "ftp"), ("gopher://127.0.0.1/x", "gopher"),
            (f"{base}/img/1.jpg", "the one good image")]
    doc = _ingest(rows, (tmp_path / "out").as_uri(), tmp_path, allow_networks=LOOPBACK)
    assert doc["counts"] == {"total": 6, "success": 1, "failed": {"refused: scheme": 5}}
    assert _captions(doc) == ["the one good image"]
    assert accepted == []  # the ftp row opened no connection


@pytest.mark.slow
def test_redirects_are_checked_at_every_hop(site, listener, tmp_path):
    base, server = site
    _, accepted = listener
    rows = [(f"{base}/to-metadata", "to cloud metadata"), (f"{base}/to-file", "to a file"),
            (f"{base}/to-ftp", "to ftp"), (f"{base}/to-img", "to an allowed image")]
    doc = _ingest(rows, (tmp_path / "out").as_uri(), tmp_path, allow_networks=LOOPBACK)
    assert doc["counts"] == {"total": 4, "success": 1,
                             "failed": {"refused: scheme": 2, "refused: address": 1}}
    assert _captions(doc) == ["to an allowed image"]
    assert "/img/7.jpg" in server.seen and accepted == []


@pytest.mark.slow
def test_responses_over_the_size_cap_are_dropped(site, tmp_path):
    base, _ = site
    rows = [(f"{base}/big", "with a Content-Length"), (f"{base}/big-chunked", "chunked, no length"),
            (f"{base}/img/3.jpg", "small")]
    doc = _ingest(rows, (tmp_path / "out").as_uri(), tmp_path, allow_networks=LOOPBACK, max_image_bytes=100_000)
    assert doc["counts"] == {"total": 3, "success": 1, "failed": {"refused: size": 2}}
    assert _captions(doc) == ["small"]
    assert doc["options"]["max_image_bytes"] == 100_000 and doc["options"]["allow_networks"] == list(LOOPBACK)


# ------------------------------------------------------------------------------------------- in-process, no traffic
@pytest.fixture
def only_loopback_connects(monkeypatch):
    """Fail any connect to an address other than 127.0.0.1, and record every attempt."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        attempts.append(address)
        assert address[0] == "127.0.0.1", f"a connection to {address} was attempted"
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


REFUSED_LITERALS = ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/", "http://10.1.2.3/",
                    "http://172.16.0.1/", "http://192.168.1.1/x.jpg", "http://100.64.0.1/", "http://127.0.0.1:9/",
                    "http://[::1]/", "http://[fc00::1]/", "http://[fe80::1]/", "http://224.0.0.1/",
                    "http://0.0.0.0/", "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/",
                    "http://[64:ff9b::a9fe:a9fe]/", "https://169.254.169.254/", "http://255.255.255.255/"]


@pytest.mark.parametrize("url", REFUSED_LITERALS)
def test_refused_address_literals_open_no_socket(url, only_loopback_connects):
    with pytest.raises(Refused, match="refused: address"):
        opener(EgressPolicy()).open(url, timeout=2)
    assert only_loopback_connects == []


def test_a_host_name_is_judged_by_the_address_actually_connected(monkeypatch, only_loopback_connects):
    """A name resolving to internal addresses is refused without a connection; a name resolving to a refused and an
    allowed address is connected to the allowed one only (so a changed DNS answer cannot slip a refused one in)."""
    answers = {"internal.example": ["10.0.0.5", "fd00:ec2::254"], "mixed.example": ["10.0.0.5", "127.0.0.1"]}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):
        if host in answers:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (a, port, 0, 0) if ":" in a else (a, port)) for a in answers[host]]
        return real(host, port, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(Refused, match=r"refused: address \(internal.example resolves to 10.0.0.5, fd00:ec2::254\)"):
        opener(EgressPolicy()).open("http://internal.example/x.jpg", timeout=2)
    assert only_loopback_connects == []
    with socket.socket() as sock:  # nothing listens on this port: the attempt itself is what is checked
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        opener(EgressPolicy(allow_networks=LOOPBACK)).open(f"http://mixed.example:{port}/x.jpg", timeout=2)
    assert only_loopback_connects == [("127.0.0.1", port)]


def test_public_addresses_and_allowed_networks_pass_the_check():
    policy = EgressPolicy(allow_networks=("10.20.0.0/16",))
    for url in ("http://93.184.216.34/a.jpg", "https://[2606:4700::1111]/a.jpg", "http://10.20.3.4/a.jpg",
                "HTTPS://images.example.org/a.jpg"):
        policy.check_url(url)  # no exception, no I/O
    for url, kind in (("http://10.21.0.1/", "address"), ("ftp://93.184.216.34/", "scheme"),
                      ("file:///etc/passwd", "scheme"), ("data:,x", "scheme"), ("//no-scheme/x", "scheme")):
        with pytest.raises(Refused, match=f"refused: {kind}"):
            policy.check_url(url)


def test_urlopen_is_untouched_outside_the_workers():
    """The guard is installed in img2dataset's worker processes only, not in the process that runs ingest."""
    assert urllib.request._opener is None or not any(  # type: ignore[attr-defined]
        type(h).__name__ == "_Check" for h in urllib.request._opener.handlers)  # type: ignore[attr-defined]


def test_cli_allow_network_and_size_cap_flags():
    parser = __import__("argparse").ArgumentParser()
    ingest_cli.add_arguments(parser)
    args = parser.parse_args(["u.csv", "-o", "x", "--allow-network", "10.20.0.0/16", "--allow-network",
                              "192.0.2.7", "--max-image-bytes", "1000"])
    options = ingest_cli.options_from_args(args)
    assert options.allow_networks == ("10.20.0.0/16", "192.0.2.7/32") and options.max_image_bytes == 1000
    with pytest.raises(Exception, match="allow_networks: 'intranet' is not a CIDR"):
        ingest_cli.options_from_args(parser.parse_args(["u.csv", "-o", "x", "--allow-network", "intranet"]))
