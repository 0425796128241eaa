"""The clipline command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from minio import Minio

from components.common import store

ROOT = Path(__file__).parents[1]
SUBCOMMANDS = ["ingest", "preprocess", "train", "evaluate", "run", "compile", "submit", "store"]


def clipline(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_console_script_is_installed():
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "clipline"), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_explains_itself(name):
    result = clipline(name, "--help")
    assert result.returncode == 0
    assert len(result.stdout.split("\n\n")[1].strip()) > 20, result.stdout  # a description, not just usage


def test_store_up_status_down(tmp_path):
    state = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    up = clipline("store", "up", "--dir", str(state), env=env)
    assert up.returncode == 0, up.stderr
    exported = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    assert set(exported) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert exported["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert oct((state / "store.json").stat().st_mode)[-3:] == "600"
    try:
        client = Minio(exported["AWS_ENDPOINT_URL"].removeprefix("http://"), access_key=exported["AWS_ACCESS_KEY_ID"],
                       secret_key=exported["AWS_SECRET_ACCESS_KEY"], secure=False)
        assert "clipline" in [b.name for b in client.list_buckets()]

        again = clipline("store", "up", "--dir", str(state), env=env)  # idempotent: same server, same env
        assert again.returncode == 0 and again.stdout == up.stdout

        status = clipline("store", "status", "--dir", str(state), env=env)
        assert status.returncode == 0
        info = json.loads(status.stdout)
        assert info["endpoint"] == exported["AWS_ENDPOINT_URL"]
        assert exported["AWS_SECRET_ACCESS_KEY"] not in status.stdout + status.stderr
        assert Path(f"/proc/{info['pid']}").exists()
    finally:
        down = clipline("store", "down", "--dir", str(state), env=env)
    assert down.returncode == 0
    assert not Path(f"/proc/{info['pid']}").exists() or "Z" in Path(f"/proc/{info['pid']}/stat").read_text()
    assert clipline("store", "status", "--dir", str(state), env=env).returncode == 1


def test_bad_recipe_fails_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "configs" / "demo.yaml").read_text()
    assert "\nbatch_size:" in text
    bad.write_text(text.replace("\nbatch_size:", "\nbatch_sise:"))
    result = clipline("run", "--recipe", str(bad), "--store-dir", str(tmp_path / "store"))
    assert result.returncode == 2
    assert "unknown key 'batch_sise'" in result.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_run_goes_from_the_demo_source_to_a_report(s3_server, s3_prefix, tmp_path):
    result = clipline("run", "--recipe", "configs/ci.yaml", "--use-env-store", "--run-prefix", s3_prefix,
                      "--demo-limit", "100", "--store-dir", str(tmp_path / "store"), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(store.get_bytes(store.join(s3_prefix, "run.json")))
    assert manifest["kind"] == "run" and manifest["recipe"]["name"] == "ci"
    stages = manifest["stages"]
    assert all(stages[name]["status"] == "done" for name in ("ingest", "preprocess", "train", "evaluate")), stages
    ingested = stages["ingest"]["counts"]["success"]
    assert ingested > 150  # up to 100 images from each of 3 sources, minus the held-out split
    assert 0 < stages["preprocess"]["num_samples"] <= ingested
    train = json.loads(store.get_bytes(stages["preprocess"]["manifest"]))
    assert train["resolutions"] == [16, 32]  # the recipe's pretrain and finetune sides
    assert stages["train"]["samples_seen"] == 40 * 32
    # the report's numbers: every held-out benchmark evaluated, each metric a fraction
    results = stages["evaluate"]["results"]
    assert results and all(0.0 <= v <= 1.0 for metrics in results.values() for v in metrics.values())
    metrics = json.loads(store.get_bytes(stages["evaluate"]["metrics"]))
    assert set(metrics["datasets"]) == set(results)
    # a local copy of the report for the browser (the store may be an embedded one that stops with the run)
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("report: ")]
    report = Path(line.removeprefix("report: "))
    assert report.is_file() and "Training" in report.read_text()  # the training curves from log.jsonl
    assert s3_server.secret_key not in json.dumps(manifest) + result.stdout + result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_store_up_leaves_no_server(tmp_path, sig):
    state = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: give `up` the
    # default disposition, as a terminal's Ctrl-C finds it, or a suite run from `make test &` sees no interrupt.
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "store", "up", "--dir", str(state)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while not (state / "store.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    pid = json.loads((state / "store.json").read_text())["pid"]
    assert _running(pid), "the server should be starting"
    proc.send_signal(sig)  # while `up` still waits for the S3 API
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0, stderr
    assert "S3 store running" not in stderr
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_reports_a_bad_url_list_clearly(s3_server, s3_prefix, tmp_path):
    missing = tmp_path / "nowhere.parquet"
    result = clipline("run", "--use-env-store", "--run-prefix", s3_prefix, "--url-list", str(missing))
    assert result.returncode == 1
    assert "nowhere.parquet" in result.stderr and "Traceback" not in result.stderr


def test_compile_takes_an_image_and_refuses_an_unqualified_one(tmp_path):
    digest = "registry.example.com/ml/clipline@sha256:" + "ab" * 32
    out = tmp_path / "p.yaml"
    ok = clipline("compile", "--output", str(out), "--parts", "1", "--image", digest)
    assert ok.returncode == 0, ok.stderr
    text = out.read_text()
    assert text.count(f"image: {digest}") == 6 and "clipline:0.1.0" not in text  # 6 executors with parts=1
    bad = clipline("compile", "--output", str(tmp_path / "bad.yaml"), "--image", "clipline:0.1.0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--image" in bad.stderr and "names no registry" in bad.stderr and "docker.io/library/clipline" in bad.stderr
    assert not (tmp_path / "bad.yaml").exists()


def test_submit_offers_what_the_retraining_cronjob_passes_and_checks_the_token_first(tmp_path):
    help_text = clipline("submit", "--help").stdout
    for flag in ("--host", "--namespace", "--token-path", "--image", "--pipeline-name", "--experiment", "--param",
                 "--runs-root", "--url-lists", "--skip-if-unchanged"):
        assert flag in help_text, flag
    env = {**os.environ, "KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "no-token")}
    result = clipline("submit", "--host", "http://127.0.0.1:9", "--namespace", "team-a", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no token file at {tmp_path / 'no-token'}" in result.stderr


def test_every_stage_follows_the_one_exit_code_rule(tmp_path):
    from components.common.config import ConfigError
    from components.common.device import DeviceError
    from components.common.exit_codes import FAILED, USAGE, exit_code
    from components.train.loop import TrainingError

    assert [exit_code(e) for e in (ConfigError("recipe", ["k: bad"]), DeviceError("d"), store.ObjectNotFound("o"),
                                   store.StoreError("s"))] == [USAGE] * 4
    assert [exit_code(e) for e in (store.StoreUnavailable("gone"), TrainingError("t"), ValueError("v"))] == [FAILED] * 3
    missing = (tmp_path / "none" / "manifest.json").as_uri()
    out = tmp_path.as_uri()
    for args, code, says in [
        (("ingest", "--output", out), USAGE, "give either URL_LIST or --demo"),
        (("evaluate", "--output", out), USAGE, "give --model and at least one --dataset"),
        (("preprocess", "--raw-manifest", missing, "--output", out), USAGE, "none/manifest.json"),
        (("evaluate", "--model", "tiny-clip", "--dataset", (tmp_path / "nobench").as_uri(), "--output", out),
         FAILED, "nobench"),
    ]:
        result = clipline(*args)
        assert result.returncode == code, (args, result.stderr)
        assert f"clipline {args[0]}: " in result.stderr and says in result.stderr and "Traceback" not in result.stderr
