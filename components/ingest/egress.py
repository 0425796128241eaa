"""What a URL list may make ingest fetch: http(s) from public addresses, within a size cap, and nothing else.

A URL list comes from scrapes, from users, from a bucket others can write to. img2dataset downloads with urllib,
which opens ``file://``, ``data:`` and ``ftp://`` and follows redirects anywhere, so without a guard a list could read
files from the pod into a published dataset, or make the pod call cloud metadata (169.254.169.254), the Kubernetes
API, the object store or any in-cluster service. The guard is a urllib opener installed in every img2dataset worker
process (``install``, the worker pool's initializer):

- only ``http`` and ``https`` are opened; any other scheme, also as a redirect target, is refused before any I/O;
- every host is resolved and each address checked; the connection goes to a checked address (the one actually
  connected to is the one checked, so a DNS answer that changes between check and use gains nothing), and every
  redirect hop goes through the same check. Refused by default: anything that is not globally routable (loopback,
  link-local incl. fd00:ec2::254 and 169.254.169.254, RFC 1918, ULA, CGNAT, reserved, unspecified) and multicast;
  IPv4 embedded in IPv6 (mapped, NAT64) is judged as the IPv4 address. ``allow_networks`` (CIDRs) lets on-prem
  users fetch from their own servers;
- a response over ``max_bytes`` is refused, from its Content-Length when it has one, else while it is read.

A refusal raises ``URLError("refused: <scheme|address|size> ...")``; img2dataset records the message as the sample's
failure, and ``counts.normalise_reason`` counts it under ``refused: scheme``, ``refused: address`` or
``refused: size``. Environment proxies are not used (a proxy would do the connecting, unchecked).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Optional

ALLOWED_SCHEMES = ("http", "https")
REFUSED = "refused"  # the prefix of every refusal's message
NAT64 = ipaddress.ip_network("64:ff9b::/96")
POLICY_ENV = "CLIPLINE_EGRESS_POLICY"  # how the policy reaches spawned workers (JSON)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(urllib.error.URLError):
    """A request the egress policy does not allow; ``kind`` is scheme, address or size."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{REFUSED}: {kind} ({detail})")
        self.kind = kind


DEFAULT_MAX_BYTES = 32 * 1024 * 1024


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise ValueError(f"allow_networks: {cidr!r} is not a CIDR (e.g. 10.20.0.0/16 or 192.0.2.7/32)") from None


@dataclass(frozen=True)
class EgressPolicy:
    allow_networks: tuple[str, ...] = ()  # CIDRs fetched from even though they are not public
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        # parsed once: every request of every worker checks its addresses against them
        object.__setattr__(self, "_networks", tuple(_network(c) for c in self.allow_networks))
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")

    def to_json(self) -> str:
        return json.dumps({"allow_networks": list(self.allow_networks), "max_bytes": self.max_bytes})

    @classmethod
    def from_json(cls, text: str) -> "EgressPolicy":
        doc = json.loads(text)
        return cls(tuple(doc["allow_networks"]), int(doc["max_bytes"]))

    def address_allowed(self, address: Address) -> bool:
        judged = _embedded_ipv4(address) or address
        if any(judged in net or address in net for net in self._networks):
            return True
        return judged.is_global and not judged.is_multicast

    def check_url(self, url: str) -> None:
        """Refuse a URL by its scheme, or by its host when that is an address literal (no I/O either way)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            raise Refused("scheme", parts.scheme or "none")
        address = _literal(parts.hostname or "")
        if address is not None and not self.address_allowed(address):
            raise Refused("address", str(address))

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """getaddrinfo results for ``host`` whose address the policy allows; Refused when none is."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        allowed = [info for info in infos if self.address_allowed(ipaddress.ip_address(info[4][0].split("%")[0]))]
        if not allowed:
            raise Refused("address", f"{host} resolves to {', '.join(sorted({i[4][0] for i in infos}))}")
        return allowed


def _literal(host: str) -> Optional[Address]:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _embedded_ipv4(address: Address) -> Optional[ipaddress.IPv4Address]:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _connect(policy: EgressPolicy, address: tuple[str, int], timeout: Any, source: Any) -> socket.socket:
    """http.client's connection hook: connect to an allowed address of the host, trying each in turn."""
    host, port = address
    last: Optional[OSError] = None
    for family, kind, proto, _, sockaddr in policy.resolve(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source:
                sock.bind(source)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"cannot connect to {host}:{port}")


def _guarded(connection_class: type, policy: EgressPolicy) -> type:
    class Guarded(connection_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = lambda address, timeout, source=None: _connect(policy, address, timeout,
                                                                                      source)

    return Guarded


class _Check(urllib.request.BaseHandler):
    """Runs before any protocol handler (urllib calls every ``default_open`` first), also on each redirect."""

    handler_order = 100

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    def default_open(self, req: urllib.request.Request) -> None:
        self.policy.check_url(req.full_url)
        return None  # allowed: the http(s) handler opens it


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Checks a redirect's target before urllib follows it (urllib itself only refuses schemes other than http,
    https and ftp, with an error that would not count as a refusal); the hop then passes ``_Check`` again."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            self.policy.check_url(urllib.parse.urljoin(req.full_url, target))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _SizeCap(urllib.request.BaseHandler):
    """Refuses a response over the cap: by its Content-Length, else when reading passes the cap."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            response.close()
            raise Refused("size", f"Content-Length {length} > {self.max_bytes} bytes")
        read = response.read
        seen = [0]

        def capped_read(amt: Optional[int] = None) -> bytes:
            # http.client reads up to n bytes, stopping early only at the end of the body (chunked or not)
            data = read(self.max_bytes + 1 - seen[0]) if amt is None or amt < 0 else read(amt)
            seen[0] += len(data)
            if seen[0] > self.max_bytes:
                response.close()
                raise Refused("size", f"body over {self.max_bytes} bytes")
            return data

        response.read = capped_read
        return response

    https_response = http_response


def _unwrapped(do_open: Any, *args: Any, **kwargs: Any) -> Any:
    """urllib wraps an error raised while connecting in another URLError: surface a refusal as itself."""
    try:
        return do_open(*args, **kwargs)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, Refused):
            raise exc.reason from None
        raise


def opener(policy: EgressPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener with only the guarded http(s) handlers: no file, data or ftp handler, no proxies."""
    director = urllib.request.OpenerDirector()
    http_connection = _guarded(http.client.HTTPConnection, policy)
    https_connection = _guarded(http.client.HTTPSConnection, policy)

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return _unwrapped(self.do_open, http_connection, req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return _unwrapped(self.do_open, https_connection, req, context=self._context)

    for handler in (_Check(policy), Http(), Https(), _Redirects(policy), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), _SizeCap(policy.max_bytes)):
        director.add_handler(handler)
    return director


def install(policy_json: Optional[str] = None) -> None:
    """Make ``urllib.request.urlopen`` in this process go through the guard (the worker pool's initializer)."""
    policy = EgressPolicy.from_json(policy_json or os.environ[POLICY_ENV])
    urllib.request.install_opener(opener(policy))


def refusal_kind(message: str) -> Optional[str]:
    """``refused: <kind>`` for a failure message that a refusal produced, else None."""
    marker = f"{REFUSED}: "
    at = message.find(marker)
    if at < 0:
        return None
    kind = message[at + len(marker):].split(" ", 1)[0]
    return f"{REFUSED}: {kind}" if kind in ("scheme", "address", "size") else None


def networks(items: Iterable[str]) -> tuple[str, ...]:
    """Normalised CIDRs (``192.0.2.7`` -> ``192.0.2.7/32``), in order, without repeats."""
    out: list[str] = []
    for item in items:
        for cidr in filter(None, (part.strip() for part in item.split(","))):
            text = str(_network(cidr))
            if text not in out:
                out.append(text)
    return tuple(out)
