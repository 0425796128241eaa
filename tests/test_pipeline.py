"""The KFP pipeline: the committed compiled YAML, its components' commands and secrets, promotion, and submission to
a KFP API (a loopback HTTP server answering the four REST calls kfp's client makes; no KFP server runs here).

The pipeline itself runs end to end under kfp's local runner in tests/test_cli.py (``clipline run``)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.common import store
from components.train.launch.pytorchjob import validate_pytorchjob
from pipelines import steps
from pipelines.submit import COMPILED, SUBMITTED, compile_pipeline, submit

PARTS = 4  # the committed pipeline's fan-out
COMPONENTS = {"ingest", "merge-ingest", "filter-part", "preprocess", "train", "evaluate", "promote"}
TASKS = {*(f"ingest-{k}" for k in range(2, PARTS + 1)), *(f"filter-part-{k}" for k in range(2, PARTS + 1)),
         "ingest", "filter-part", "merge-ingest", "preprocess", "train", "evaluate", "promote"}


def _documents() -> list[dict]:
    return list(yaml.safe_load_all(COMPILED.read_text()))


@pytest.fixture(scope="module")
def spec() -> dict:
    """The pipeline spec (the first document; the second is the Kubernetes platform spec)."""
    return _documents()[0]


def test_compiled_pipeline_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "clip_pretrain.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipelines/compiled/ is stale: run `clipline compile`"


def test_compiled_pipeline_loads_back_with_kfp():
    from kfp import components

    loaded = components.load_component_from_file(str(COMPILED))
    assert loaded.name == "clip-pretrain"
    assert {"run_prefix", "url_list", "recipe", "objective", "nodes", "gpus_per_node", "eval_datasets",
            "models_prefix", "promote_metric", "promote_tolerance"} <= set(loaded.component_spec.inputs)


def test_no_component_installs_packages_at_run_time(spec):
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-").rstrip("-234") for name in executors} == set(COMPONENTS)
    assert len(executors) == len(TASKS)  # kfp gives each task of the fan-out its own executor
    for name, executor in executors.items():
        container = executor["container"]
        text = " ".join(container.get("command", []) + container.get("args", []))
        assert "pip install" not in text and "pip3 install" not in text, name
        assert "kfp.dsl.executor_main" in text, name
        assert container["image"] == "clipline:0.1.0"


def test_every_parameter_is_described_and_none_is_a_credential(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, param in params.items():
        assert len(param.get("description", "")) > 10, name
        assert not any(word in name.lower() for word in ("secret", "password", "access_key", "token")), name


def test_every_step_gets_store_credentials_from_the_secret_and_caching_is_off(spec):
    (platform,) = [d for d in _documents() if "platforms" in d]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == len(TASKS)  # one per task: every task, fan-out included, gets the credentials
    for name, config in executors.items():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == "clipline-store-credentials"
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        (config_map,) = config["configMapAsEnv"]
        assert {k["envVar"] for k in config_map["keyToEnv"]} == {"AWS_ENDPOINT_URL", "AWS_REGION"}
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == TASKS
    assert all(task["cachingOptions"] == {} for task in tasks.values())  # enableCache absent = false


# ------------------------------------------------------------------------------------------------------ promote


def test_promotion_keeps_the_better_model_within_tolerance(any_prefix):
    models = store.join(any_prefix, "models")

    def evaluation(acc1: float) -> dict:
        return {"results": {"a": {"acc1": acc1, "acc5": 0.9}, "b": {"acc1": acc1}, "r": {"recall@5": 0.5}},
                "report": "s3://x/report.html"}

    first = steps.promote_step("m1", evaluation(0.40), models, metric="acc1", tolerance=0.01)
    assert first["promoted"] and first["baseline"] is None and "no latest model" in first["reason"]
    worse = steps.promote_step("m2", evaluation(0.38), models, metric="acc1", tolerance=0.01)
    assert not worse["promoted"] and worse["baseline"] == pytest.approx(0.40) and worse["score"] == pytest.approx(0.38)
    within = steps.promote_step("m3", evaluation(0.395), models, metric="acc1", tolerance=0.01)
    assert within["promoted"] and "0.3950 vs latest 0.4000" in within["reason"]
    latest = json.loads(store.get_bytes(store.join(models, steps.LATEST)))
    assert latest["model"] == "m3" and latest["score"] == pytest.approx(0.395)
    decisions = list(store.list_objects(store.join(models, "decisions") + "/"))
    assert len(decisions) >= 1
    with pytest.raises(steps.StepError, match="available: acc1, acc5, recall@5"):
        steps.promote_step("m4", evaluation(0.5), models, metric="top1", tolerance=0.0)


# ------------------------------------------------------------------------------------------------------- submit


class _KfpApi(BaseHTTPRequestHandler):
    runs: list[dict] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # healthz, and the experiment lookup by name (none exists)
        self._reply({})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        else:
            type(self).runs.append(body)
            self._reply({"run_id": f"run-{len(type(self).runs)}", "display_name": body["display_name"]})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    _KfpApi.runs = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KfpApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _KfpApi.runs
    server.shutdown()


def _url_list(uri: str, rows: int, tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    pd.DataFrame({"url": [f"http://img/{uri[-12:]}/{i}.jpg" for i in range(rows)],
                  "caption": [f"caption {i}" for i in range(rows)]}).to_parquet(path)
    store.put_file(uri, path)


def test_submit_gathers_new_url_lists_and_skips_unchanged(s3_prefix, kfp_api, tmp_path):
    host, runs = kfp_api
    lists = store.join(s3_prefix, "url-lists")
    _url_list(store.join(lists, "2026-11-01.parquet"), 5, tmp_path)
    common = dict(params={"recipe": "configs/demo.yaml", "nodes": "2"}, experiment="scheduled",
                  runs_root=store.join(s3_prefix, "runs"), url_lists=lists, skip_if_unchanged=True)

    first = submit(host, **common)
    assert first["submitted"] and len(runs) == 1
    run = runs[0]
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "clip-pretrain"
    params = run["runtime_config"]["parameters"]
    assert params["recipe"] == "configs/demo.yaml" and params["run_prefix"].startswith(store.join(s3_prefix, "runs"))
    combined = store.join(params["run_prefix"], "url_list.parquet")
    assert params["url_list"] == combined
    assert json.loads(store.get_bytes(store.join(lists, SUBMITTED)))["rows"] == 5

    again = submit(host, **common)
    assert not again["submitted"] and again["reason"] == "URL lists unchanged" and len(runs) == 1

    _url_list(store.join(lists, "2026-11-08.parquet"), 3, tmp_path)
    third = submit(host, **{**common, "params": {**common["params"], "run_prefix": store.join(s3_prefix, "r3")}})
    assert third["submitted"] and len(runs) == 2
    local = tmp_path / "combined.parquet"
    store.get_file(store.join(s3_prefix, "r3", "url_list.parquet"), local)
    assert len(pd.read_parquet(local)) == 8  # both lists


# ------------------------------------------------------------------------------------------------------- fan-out


def _samples(manifest_uri: str, tmp_path: Path) -> dict[int, tuple[str, str]]:
    """index -> (caption, sha256 of the 16 px image) over a TRAIN_SHARDS manifest's shards."""
    import hashlib
    import tarfile

    doc = json.loads(store.get_bytes(manifest_uri))
    out = {}
    for shard in doc["shards"]:
        path = tmp_path / "shard.tar"
        store.get_file(shard["uri"], path)
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in files.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                index = json.loads(data)["index"]
                out[index] = (files[f"{key}.txt"].decode(), hashlib.sha256(files[f"{key}.img16.jpg"]).hexdigest())
    return out


@pytest.mark.slow
def test_fan_out_gives_the_same_dense_indices_and_counts_as_one_part(s3_prefix, tmp_path):
    recipe, _ = steps.effective_recipe(str(Path(__file__).parents[1] / "configs" / "ci.yaml"), "", s3_prefix)
    results = {}
    for parts in (1, 3):
        run = store.join(s3_prefix, f"k{parts}")
        for k in range(parts):
            steps.ingest_step(steps.DEMO_SOURCE, run, demo_limit=40, seed=0, part=k, parts=parts)
        raw = (steps.merge_ingest_step(run, parts, demo=True) if parts > 1
               else {"manifest": store.join(steps.ingest_prefix(run), "manifest.json")})
        output = store.join(run, "train-data")
        if parts > 1:
            for k in range(parts):
                steps.preprocess_part_step(raw["manifest"], output, recipe, k, parts)
        done = steps.preprocess_step(raw["manifest"], output, recipe)
        results[parts] = (json.loads(store.get_bytes(raw["manifest"])), json.loads(store.get_bytes(done["manifest"])),
                          _samples(done["manifest"], tmp_path))
    (raw1, train1, samples1), (raw3, train3, samples3) = results[1], results[3]
    assert raw3["counts"] == raw1["counts"] and len(raw3["parts"]) == 3
    assert train3["num_samples"] == train1["num_samples"] > 80
    assert train3["rejected"] == train1["rejected"]
    assert sorted(samples1) == list(range(train1["num_samples"]))  # dense
    assert samples3 == samples1  # the same sample behind every index


# ------------------------------------------------------------------------------------------- train on a cluster


class _Cluster:
    """The two Kubernetes API groups our PyTorchJob scheduler calls, answering like a cluster whose job runs for a
    few polls and then ends in ``final`` (no Kubernetes API server runs here)."""

    def __init__(self, final: str | None, polls: int = 3):
        self.jobs, self.created, self.deleted, self.final, self.polls = {}, [], [], final, polls

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.jobs[(namespace, body["metadata"]["name"])] = body
        self.created.append(body)
        return body

    def get_namespaced_custom_object_status(self, group, version, namespace, plural, name):
        job = self.jobs[(namespace, name)]
        self.polls -= 1
        conditions = [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]
        if self.polls <= 0 and self.final:
            conditions.append({"type": self.final, "status": "True", "message": f"job {self.final.lower()}"})
        return {**job, "status": {"conditions": conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)
        del self.jobs[(namespace, name)]

    # CoreV1Api
    def read_namespaced_pod_log(self, **kw):
        return "train step=1/2 loss=0.9\ntrain step=2/2 loss=0.8\n"


def _scheduler(cluster: _Cluster):
    from components.train.launch.pytorchjob import create_scheduler

    scheduler = create_scheduler("test")
    scheduler._custom = lambda: cluster
    scheduler._core = lambda: cluster
    return scheduler


@pytest.mark.parametrize("final, error", [("Succeeded", None), ("Failed", "ended FAILED"),
                                          (None, "did not finish within 1 s")])
def test_cluster_train_step_submits_waits_and_always_deletes_the_job(final, error, tmp_path, monkeypatch):
    from components.common.recipe import load_recipe

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.clipline.svc:9000")
    output = (tmp_path / "train").as_uri()
    store.put_bytes(store.join(output, "metrics.json"), json.dumps({"samples_seen": 48000, "stages": []}).encode())
    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    recipe_uri = (tmp_path / "recipe.yaml").as_uri()
    store.put_bytes(recipe_uri, yaml.safe_dump(recipe.document()).encode())
    cluster = _Cluster(final)
    call = dict(nodes=2, gpus_per_node=4, image="clipline:0.1.0", namespace="ml", secret="clipline-store-credentials",
                service_account="clipline-pipeline", scheduler=_scheduler(cluster), poll_s=0.01,
                timeout_s=1 if final is None else 60)
    if error:
        with pytest.raises(steps.StepError, match=error):
            steps.train_on_cluster(recipe, recipe_uri, "s3://b/run/train-data/manifest.json", output, **call)
    else:
        doc = steps.train_on_cluster(recipe, recipe_uri, "s3://b/run/train-data/manifest.json", output, **call)
        assert doc["samples_seen"] == 48000 and doc["model"].endswith("/model/manifest.json")
    (job,) = cluster.created
    assert cluster.deleted == [job["metadata"]["name"]] and cluster.jobs == {}  # deleted however it ended
    validate_pytorchjob(job)
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = master["containers"]
    assert container["command"][:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=4"]
    assert recipe_uri in container["command"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio.clipline.svc:9000"  # the endpoint, not a secret
    assert "AWS_SECRET_ACCESS_KEY" not in env and container["envFrom"] == [{"secretRef": {
        "name": "clipline-store-credentials"}}]
    assert master["serviceAccountName"] == "clipline-pipeline"


def test_train_timeout_follows_the_recipe():
    from components.common.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    samples = sum(stage.samples for stage in recipe.stages)
    one_gpu, many = steps.train_timeout_s(recipe, 1, 1), steps.train_timeout_s(recipe, 4, 8)
    assert one_gpu == int(samples / steps.MIN_SAMPLES_PER_S) + steps.SUBMIT_SLACK_S
    assert steps.SUBMIT_SLACK_S < many < one_gpu  # more GPUs, less time
