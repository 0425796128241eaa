"""The object store layer against a real SeaweedFS S3 server (and the file:// backend)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import tarfile
import threading
import time
from pathlib import Path

import pytest
from minio import Minio
from webdataset_reader import webdataset_samples

from components.common import embedded_store, store
from components.common.tars import read_samples

MB = 1024 * 1024


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_round_trip(any_prefix):
    uri = store.join(any_prefix, "a/b/hello.bin")
    payload = os.urandom(1000) + b"\x00end"
    assert not store.exists(uri)
    store.put_bytes(uri, payload)
    assert store.exists(uri)
    assert store.get_bytes(uri) == payload
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting a missing object is not an error


def test_50mb_file_round_trip_multipart(any_prefix, tmp_path):
    src = tmp_path / "big.bin"
    digest = _random_file(src, 50 * MB)  # above the 16 MB part size: a multipart upload on S3
    uri = store.join(any_prefix, "big.bin")
    store.put_file(uri, src)
    dst = tmp_path / "back.bin"
    store.get_file(uri, dst)
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == digest
    assert [o.size for o in store.list_objects(uri)] == [50 * MB]


def test_list_by_prefix(any_prefix):
    names = ["shards/train-000.tar", "shards/train-001.tar", "shards/val-000.tar", "manifest.json"]
    for n in names:
        store.put_bytes(store.join(any_prefix, n), n.encode())
    listed = [o.uri for o in store.list_objects(store.join(any_prefix, "shards/train-"))]
    assert listed == [store.join(any_prefix, "shards/train-000.tar"), store.join(any_prefix, "shards/train-001.tar")]
    everything = {o.uri.removeprefix(any_prefix + "/"): o.size for o in store.list_objects(any_prefix + "/")}
    assert everything == {n: len(n) for n in names}
    assert list(store.list_objects(store.join(any_prefix, "nothing-here/"))) == []


def test_streaming_read_in_chunks(any_prefix):
    payload = os.urandom(3 * MB + 17)
    uri = store.join(any_prefix, "stream.bin")
    store.put_bytes(uri, payload)
    chunks = []
    with store.open_read(uri) as f:
        while chunk := f.read(100_000):
            chunks.append(chunk)
    assert len(chunks) > 10
    assert b"".join(chunks) == payload


def _tar_shard(samples: dict[str, dict[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, fields in samples.items():
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_tar_shards_stream_from_s3_with_our_reader_and_webdataset(s3_prefix):
    expected = {}
    for shard in range(2):
        samples = {f"{shard:03d}{i:03d}": {"txt": f"caption {shard}-{i}".encode(), "bin": os.urandom(64)}
                   for i in range(5)}
        expected.update(samples)
        store.put_bytes(store.join(s3_prefix, f"shard-{shard:03d}.tar"), _tar_shard(samples))
    urls = [o.uri for o in store.list_objects(store.join(s3_prefix, "shard-"))]
    ours = {}
    for url in urls:
        with store.open_read(url) as stream:
            ours.update({s["__key__"]: {"txt": s["txt"], "bin": s["bin"]} for s in read_samples(stream, url)})
    theirs = {s["__key__"]: {"txt": s["txt"], "bin": s["bin"]} for s in webdataset_samples(urls)}
    assert ours == theirs == expected


def test_missing_object_names_bucket_and_key(s3_prefix):
    uri = store.join(s3_prefix, "absent.json")
    with pytest.raises(store.ObjectNotFound, match="absent.json.*no such key"):
        store.get_bytes(uri)
    with pytest.raises(store.ObjectNotFound, match="no-such-bucket-xyz.*no such bucket"):
        store.put_bytes("s3://no-such-bucket-xyz/k", b"x")


def test_failed_write_publishes_nothing(any_prefix):
    uri = store.join(any_prefix, "partial.bin")
    with pytest.raises(RuntimeError):
        with store.open_write(uri) as f:
            f.write(b"half of it")
            raise RuntimeError("writer crashed")
    assert not store.exists(uri)
    assert list(store.list_objects(any_prefix + "/")) == []


def test_readers_never_see_a_partial_object(any_prefix, tmp_path):
    """While large objects are being published, a concurrent reader sees each key absent or complete."""
    src = tmp_path / "payload.bin"
    size = 40 * MB
    _random_file(src, size)
    keys = [store.join(any_prefix, f"obj-{i}.bin") for i in range(3)]
    observations, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for info in store.list_objects(any_prefix + "/"):
                observations.append(info.size)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for key in keys:
            store.put_file(key, src)
    finally:
        stop.set()
        watcher.join()
    assert observations, "the watcher never listed anything"
    assert set(observations) == {size}, f"saw sizes other than the full object: {set(observations) - {size}}"
    assert [o.uri for o in store.list_objects(any_prefix + "/")] == keys


def test_wrong_credentials_fail_fast_with_clear_error(s3_server, s3_prefix, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")
    started = time.monotonic()
    with pytest.raises(store.StoreError) as err:
        store.put_bytes(store.join(s3_prefix, "x.bin"), b"data")
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert "access denied" in message
    assert s3_server.endpoint in message
    assert "definitely-not-the-secret" not in message and s3_server.secret_key not in message
    assert elapsed < 3.0, f"took {elapsed:.1f}s: a permanent error must not be retried"


def test_settings_never_show_the_secret(s3_server):
    settings = store.S3Settings.from_env()
    assert s3_server.secret_key not in repr(settings)


def test_missing_settings_name_the_variables(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(store.StoreError, match="AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID"):
        store.get_bytes("s3://b/k")


def test_minio_sdk_uses_the_embedded_endpoint(s3_server):
    client = Minio(s3_server.endpoint.removeprefix("http://"), access_key=s3_server.access_key,
                   secret_key=s3_server.secret_key, secure=False)
    assert s3_server.bucket in [b.name for b in client.list_buckets()]


# ------------------------------------------------------------------------------------------------------------------
# Faults: a dropped connection mid-read, and a server killed mid-upload


class _DroppingProxy:
    """A loopback TCP proxy in front of the S3 server that cuts its first connection after ``cut_after`` bytes."""

    def __init__(self, target_port: int, cut_after: int):
        self.target_port, self.cut_after = target_port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            limit = self.cut_after if self.connections == 1 else None
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, limit):
        sent = 0
        try:
            while data := src.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()


def test_streaming_read_resumes_after_dropped_connection(s3_server, s3_prefix, monkeypatch):
    payload = os.urandom(8 * MB)
    uri = store.join(s3_prefix, "dropped.bin")
    store.put_bytes(uri, payload)
    proxy = _DroppingProxy(s3_server.ports["s3"], cut_after=2 * MB)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        with store.open_read(uri) as f:
            got = f.read()
    finally:
        proxy.close()
    assert proxy.connections >= 2, "the proxy never had to cut a connection"
    assert _sha(got) == _sha(payload)


@pytest.fixture
def own_server(tmp_path):
    """A server this test may kill; restarted servers keep the same ports and credentials."""
    state_dir = tmp_path / "killable"
    server = embedded_store.start(state_dir)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env().items():
            mp.setenv(key, value)
        yield server
    embedded_store.stop(state_dir, grace=0)


def _kill_mid_upload(server, uri, src: Path, retry_seconds: str, monkeypatch):
    """Start uploading ``src``, SIGKILL the server once data is arriving; return (thread, outcome dict)."""
    monkeypatch.setenv("CLIPLINE_STORE_RETRY_SECONDS", retry_seconds)
    outcome: dict = {}

    def upload():
        try:
            store.put_file(uri, src)
            outcome["ok"] = True
        except store.StoreError as exc:
            outcome["error"] = exc

    data_dir = server.state_dir / "data"
    before = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file())
    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and thread.is_alive():
        grown = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file()) - before
        if grown > 4 * MB:
            break
        time.sleep(0.01)
    assert thread.is_alive(), "the upload finished before the server could be killed"
    os.killpg(server.pid, 9)
    return thread, outcome


@pytest.mark.slow
def test_upload_survives_server_restart_within_retry_window(own_server, tmp_path, monkeypatch):
    src = tmp_path / "big.bin"
    digest = _random_file(src, 150 * MB)
    uri = f"s3://{own_server.bucket}/run/ckpt.bin"
    thread, outcome = _kill_mid_upload(own_server, uri, src, "60", monkeypatch)
    time.sleep(2)
    embedded_store.start(own_server.state_dir)  # back on the same port within the retry window
    thread.join(timeout=120)
    assert not thread.is_alive()
    if "ok" in outcome:
        assert _sha(store.get_bytes(uri)) == digest
    else:  # allowed by the contract, but then it must be clear and leave nothing behind
        assert "ckpt.bin" in str(outcome["error"])
        assert not store.exists(uri)
    assert [o.uri for o in store.list_objects(f"s3://{own_server.bucket}/run/")] in ([uri], [])


@pytest.mark.slow
def test_upload_fails_clearly_when_server_stays_down(own_server, tmp_path, monkeypatch):
    src = tmp_path / "big.bin"
    _random_file(src, 150 * MB)
    uri = f"s3://{own_server.bucket}/run/ckpt.bin"
    thread, outcome = _kill_mid_upload(own_server, uri, src, "3", monkeypatch)
    thread.join(timeout=60)
    assert not thread.is_alive()
    error = outcome.get("error")
    assert isinstance(error, store.StoreUnavailable), outcome
    assert "ckpt.bin" in str(error) and own_server.endpoint in str(error)
    embedded_store.start(own_server.state_dir)
    assert not store.exists(uri)
    assert list(store.list_objects(f"s3://{own_server.bucket}/run/")) == []
