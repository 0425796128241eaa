"""The KFP pipeline: the committed compiled YAML (images, parameters, resources, secrets), the train component's
wiring, gathering URL lists, promotion, and submission to KFP as a pipeline version (against a fake kfp.Client that
records its calls: no KFP API server runs here).

The pipeline itself runs end to end under kfp's local runner in tests/test_cli.py (``clipline run``)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from components.common import store
from components.train.launch.jobspec import DEFAULT_IMAGE
from pipelines import pipeline as pipeline_module
from pipelines import steps
from pipelines.pipeline import ImageRefError, check_image_ref
from pipelines.submit import COMPILED, SUBMITTED, SubmitError, compile_pipeline, submit, version_name

PARTS = 4  # the committed pipeline's fan-out
COMPONENTS = {"gather-url-lists", "ingest", "merge-ingest", "filter-part", "preprocess", "train", "evaluate",
              "promote"}
TASKS = {*(f"ingest-{k}" for k in range(2, PARTS + 1)), *(f"filter-part-{k}" for k in range(2, PARTS + 1)),
         "gather-url-lists", "ingest", "filter-part", "merge-ingest", "preprocess", "train", "evaluate", "promote"}
DIGEST_REF = "registry.example.com/ml/clipline@sha256:" + "0123456789abcdef" * 4
TRAIN_PARAMETERS = {"launcher": "trainjob", "runtime": "clipline-torch", "image": DEFAULT_IMAGE, "namespace": "",
                    "cpu_per_node": "", "memory_per_node": "", "shm_size": "", "ephemeral_storage": "",
                    "node_selector": "", "tolerations": "", "priority_class": "", "queue": "",
                    "gang_scheduler": "", "nccl_env": "", "max_restarts": 2}


def _documents(path: Path = COMPILED) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def spec() -> dict:
    """The pipeline spec (the first document; the second is the Kubernetes platform spec)."""
    return _documents()[0]


@pytest.fixture(scope="module")
def platform() -> dict:
    return _documents()[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_pipeline_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "clip_pretrain.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipelines/compiled/ is stale: run `clipline compile`"


def test_compiled_pipeline_loads_back_with_kfp():
    from kfp import components

    loaded = components.load_component_from_file(str(COMPILED))
    assert loaded.name == "clip-pretrain"
    assert {"run_prefix", "url_list", "recipe", "objective", "nodes", "gpus_per_node", "eval_datasets",
            "models_prefix", "promote_metric", "promote_tolerance", *TRAIN_PARAMETERS} <= set(
        loaded.component_spec.inputs)


def test_no_component_installs_packages_and_every_one_runs_the_registry_qualified_default_image(spec):
    executors = spec["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-").rstrip("-234") for name in executors} == set(COMPONENTS)
    assert len(executors) == len(TASKS)  # kfp gives each task of the fan-out its own executor
    assert DEFAULT_IMAGE == "registry.example.com/clipline/clipline:0.1.0"
    for name, executor in executors.items():
        container = executor["container"]
        text = " ".join(container.get("command", []) + container.get("args", []))
        assert "pip install" not in text and "pip3 install" not in text, name
        assert "kfp.dsl.executor_main" in text, name
        assert container["image"] == DEFAULT_IMAGE, name
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == DEFAULT_IMAGE


def test_compile_with_a_digest_puts_it_on_every_executor_and_as_the_image_default(tmp_path):
    out = compile_pipeline(tmp_path / "p.yaml", parts=2, image=DIGEST_REF)
    spec, _ = _documents(out)
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {DIGEST_REF}
    assert len(spec["deploymentSpec"]["executors"]) == 2 + 2 + 6  # 2 ingest + 2 filter parts + 6 steps
    assert spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == DIGEST_REF
    assert "clipline:0.1.0" not in out.read_text()


@pytest.mark.parametrize("ref", [
    DIGEST_REF, "registry.example.com/clipline/clipline:0.1.0", "localhost:5000/clipline:dev",
    "ghcr.io/org/team/clipline:v1.2@sha256:" + "a" * 64, "docker.io/library/clipline:0.1.0"])
def test_image_references_that_a_cluster_pulls_as_meant(ref):
    assert check_image_ref(ref) == ref


@pytest.mark.parametrize("ref, message", [
    ("clipline:0.1.0", "names no registry.*docker.io/library/clipline"),
    ("org/clipline:1", "names no registry"),
    ("registry.example.com/clipline/clipline", "neither a tag nor a digest"),
    ("registry.example.com/clipline@sha256:abc", "digest is not sha256: followed by 64"),
    ("registry.example.com/CLIPLINE:1", "not a valid image reference"),
    ("", "names no registry|not a valid")])
def test_bad_image_references_are_refused_saying_why(ref, message, tmp_path):
    with pytest.raises(ImageRefError, match=message) as info:
        compile_pipeline(tmp_path / "never-written.yaml", image=ref)
    assert not (tmp_path / "never-written.yaml").exists()
    assert "REGISTRY/REPOSITORY@sha256:DIGEST" in str(info.value)


def test_every_parameter_is_described_and_none_is_a_credential(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name, param in params.items():
        assert len(param.get("description", "")) > 10, name
        assert not any(word in name.lower() for word in ("secret", "password", "access_key", "token")), name
    for name, default in TRAIN_PARAMETERS.items():
        assert params[name]["defaultValue"] == default, name


def test_every_step_gets_store_credentials_from_the_secret_and_caching_is_off(spec, platform):
    assert len(platform) == len(TASKS)  # one per task: every task, fan-out included, gets the credentials
    for config in platform.values():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == "clipline-store-credentials"
        assert {k["envVar"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        (config_map,) = config["configMapAsEnv"]
        assert config_map["configMapName"] == "clipline-store"
        assert {k["envVar"] for k in config_map["keyToEnv"]} == {"AWS_ENDPOINT_URL", "AWS_REGION"}
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == TASKS
    assert all(task["cachingOptions"] == {} for task in tasks.values())  # enableCache absent = false


def _bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(m|Mi|Gi|)", quantity).groups()
    return float(number) * {"m": 1e-3, "": 1, "Mi": 2 ** 20, "Gi": 2 ** 30}[unit]


def test_every_step_requests_and_limits_cpu_and_memory_as_sized(spec):
    executors = spec["deploymentSpec"]["executors"]
    sizes = pipeline_module.STEP_RESOURCES
    for name, executor in executors.items():
        step = name.removeprefix("exec-").rstrip("-234").replace("-", "_")
        resources = executor["container"]["resources"]
        for kind in ("cpu", "memory"):
            request, limit = (resources[f"resource{kind.title()}{bound}"] for bound in ("Request", "Limit"))
            assert (request, limit) == sizes[step][kind], (name, kind)
            assert 0 < _bytes(request) <= _bytes(limit), (name, kind)
    # the heavy steps get more than the ones that only move manifests
    by_step = {name.removeprefix("exec-"): _bytes(e["container"]["resources"]["resourceMemoryLimit"])
               for name, e in executors.items()}
    assert by_step["evaluate"] > by_step["preprocess"] > by_step["train"] > by_step["promote"]
    assert by_step["ingest"] > by_step["gather-url-lists"] > by_step["merge-ingest"]


def test_train_step_gets_its_pod_from_the_downward_api_and_reports_metrics(spec, platform):
    fields = {e["name"]: e["fieldPath"] for e in platform["exec-train"]["fieldPathAsEnv"]}
    assert fields == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_UID": "metadata.uid"}
    assert all("fieldPathAsEnv" not in config for name, config in platform.items() if name != "exec-train")
    outputs = spec["components"]["comp-train"]["outputDefinitions"]["artifacts"]
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    inputs = spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    for name in TRAIN_PARAMETERS:
        assert inputs[name] == {"componentInputParameter": name}, name


def test_gather_step_runs_first_with_scratch_space(spec, platform):
    tasks = spec["root"]["dag"]["tasks"]
    for name in (f"ingest-{k}" if k > 1 else "ingest" for k in range(1, PARTS + 1)):
        assert tasks[name]["inputs"]["parameters"]["url_list"] == {
            "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "gather-url-lists"}}
    assert tasks["gather-url-lists"]["inputs"]["parameters"]["url_list"] == {"componentInputParameter": "url_list"}
    (scratch,) = platform["exec-gather-url-lists"]["emptyDirMounts"]
    assert scratch["mountPath"] == "/scratch" and scratch["sizeLimit"] == "64Gi"
    env = spec["deploymentSpec"]["executors"]["exec-gather-url-lists"]["container"]["env"]
    assert {"name": "CLIPLINE_SCRATCH", "value": "/scratch"} in env


class _Artifact(SimpleNamespace):
    def log_metric(self, name, value):
        self.logged[name] = value


@pytest.mark.parametrize("launcher", ["trainjob", "pytorchjob", "local"])
def test_train_component_passes_every_parameter_on(launcher, tmp_path, monkeypatch):
    calls = []
    doc = {"status": "done", "model": "s3://b/run/train/model/manifest.json", "samples_seen": 64, "log": "l",
           "stages": [], "metrics": {"samples_seen": 64.0, "stages.0.loss": 0.5}, "job": "ns:clip-abc"}
    monkeypatch.setattr(steps, "effective_recipe", lambda recipe, objective, prefix: ("RECIPE", "s3://b/run/r.yaml"))
    monkeypatch.setattr(steps, "train_on_cluster", lambda *a, **kw: calls.append(("cluster", a, kw)) or doc)
    monkeypatch.setattr(steps, "train_step", lambda *a, **kw: calls.append(("local", a, kw)) or doc)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"manifest": "s3://b/run/train-data/manifest.json"}))
    model = _Artifact(path=str(tmp_path / "model.json"), metadata={})
    metrics = _Artifact(logged={})
    given = {**TRAIN_PARAMETERS, "launcher": launcher, "runtime": "torch-distributed", "image": DIGEST_REF,
             "namespace": "team-a", "cpu_per_node": "48", "memory_per_node": "384Gi", "shm_size": "64Gi",
             "ephemeral_storage": "100Gi", "node_selector": "pool=a100", "tolerations": "gpu:NoSchedule",
             "priority_class": "high", "queue": "q", "gang_scheduler": "", "nccl_env": "NCCL_IB_HCA=mlx5",
             "max_restarts": 3}
    pipeline_module.train(train_data=SimpleNamespace(path=str(data)), recipe="configs/demo.yaml", objective="",
                          run_prefix="s3://b/run", nodes=2, gpus_per_node=8, model=model, metrics=metrics, **given)
    ((kind, args, kwargs),) = calls
    if launcher == "local":
        assert kind == "local" and kwargs == {"nproc_per_node": 8}
    else:
        assert kind == "cluster"
        assert args == ("RECIPE", "s3://b/run/r.yaml", "s3://b/run/train-data/manifest.json", "s3://b/run/train")
        assert kwargs == {"launcher": launcher, "nodes": 2, "gpus_per_node": 8, "image": DIGEST_REF,
                          "namespace": "team-a", "runtime": "torch-distributed", "cpu": "48", "memory": "384Gi",
                          "shm": "64Gi", "ephemeral": "100Gi", "node_selector": "pool=a100",
                          "tolerations": "gpu:NoSchedule", "priority_class": "high", "queue": "q",
                          "gang_scheduler": "", "nccl_env": "NCCL_IB_HCA=mlx5", "max_restarts": 3}
    assert metrics.logged == {"samples_seen": 64.0, "stages.0.loss": 0.5}
    assert json.loads(Path(model.path).read_text()) == doc
    assert model.metadata["job"] == "ns:clip-abc"
    with pytest.raises(ValueError, match="launcher must be"):
        pipeline_module.train(train_data=SimpleNamespace(path=str(data)), recipe="r", objective="", run_prefix="p",
                              nodes=1, gpus_per_node=0, model=model, metrics=metrics,
                              **{**given, "launcher": "torchx"})


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


# ------------------------------------------------------------------------------------------------ gather URL lists


def _lists(prefix: str, tmp_path: Path) -> list[str]:
    """Three URL lists in three formats, columns in different orders, with captions that pandas' defaults would
    have turned into NaN ("NA", "null", "") and a label that must stay text ("007")."""
    uris = [store.join(prefix, "lists", name) for name in ("a-first.parquet", "b-second.csv", "c-third.jsonl.gz")]
    pd.DataFrame({"url": ["http://x/a0.jpg", "http://x/a1.jpg", "http://x/a2.jpg"],
                  "caption": ["a cat", "NA", None], "label": [7, 8, 9]}).to_parquet(tmp_path / "a.parquet")
    store.put_file(uris[0], tmp_path / "a.parquet")
    store.put_bytes(uris[1], b'caption,url,label\nNA,http://x/b0.jpg,007\nnull,http://x/b1.jpg,1\n'
                             b',http://x/b2.jpg,2\n"a dog, running\nfast",http://x/b3.jpg,3\n')
    store.put_bytes(uris[2], gzip.compress(b'{"url": "http://x/c0.jpg", "caption": "NA", "label": 3}\n'
                                           b'{"label": null, "caption": null, "url": "http://x/c1.jpg"}\n'))
    return uris


def _table(uri: str, tmp_path: Path) -> pd.DataFrame:
    local = tmp_path / "gathered.parquet"
    store.get_file(uri, local)
    return pq.read_table(local).to_pandas()


def test_gather_concatenates_lists_of_any_format_keeping_every_value_as_written(any_prefix, tmp_path):
    uris = _lists(any_prefix, tmp_path)
    run = store.join(any_prefix, "run")
    doc = steps.gather_url_lists_step(store.join(any_prefix, "lists") + "/", run, batch_rows=2)
    assert doc["gathered"] and doc["lists"] == uris and doc["rows"] == [3, 4, 2]
    assert doc["url_list"] == store.join(run, "url_list.parquet")
    local = tmp_path / "check.parquet"
    store.get_file(doc["url_list"], local)
    parquet = pq.ParquetFile(local)
    assert parquet.schema_arrow.names == ["url", "caption", "label"]  # the first list's order
    assert {str(t) for t in parquet.schema_arrow.types} == {"string"}
    assert parquet.num_row_groups > 1  # written batch by batch
    table = _table(doc["url_list"], tmp_path)
    assert list(table["url"]) == [f"http://x/{k}.jpg" for k in ("a0", "a1", "a2", "b0", "b1", "b2", "b3", "c0", "c1")]
    assert list(table["caption"]) == ["a cat", "NA", None, "NA", "null", "", "a dog, running\nfast", "NA", None]
    assert list(table["label"]) == ["7", "8", "9", "007", "1", "2", "3", "3", None]

    # what ingest then reads: "NA" is a caption, a missing one is ""
    from components.ingest.options import IngestOptions
    from components.ingest.url_list import load_url_list

    (tmp_path / "ingest").mkdir()
    urls = load_url_list(doc["url_list"], IngestOptions(extra_columns=("label",)), tmp_path / "ingest")
    ingested = pd.read_parquet(urls.path)
    assert list(ingested["caption"]) == ["a cat", "NA", "", "NA", "null", "", "a dog, running\nfast", "NA", ""]


def test_gather_keeps_the_order_of_a_comma_separated_list(s3_prefix, tmp_path):
    uris = _lists(s3_prefix, tmp_path)
    doc = steps.gather_url_lists_step(" , ".join(reversed(uris)), store.join(s3_prefix, "run"))
    assert doc["lists"] == list(reversed(uris)) and doc["rows"] == [2, 4, 3]
    table = _table(doc["url_list"], tmp_path)
    assert list(table.columns) == ["url", "caption", "label"]  # the jsonl's first line's order
    assert list(table["url"])[:3] == ["http://x/c0.jpg", "http://x/c1.jpg", "http://x/b0.jpg"]


def test_gather_passes_one_list_and_the_demo_through_untouched(s3_prefix, tmp_path):
    uris = _lists(s3_prefix, tmp_path)
    run = store.join(s3_prefix, "run")
    assert steps.gather_url_lists_step("demo", run)["url_list"] == "demo"
    assert steps.gather_url_lists_step(uris[1], run) == {"status": "done", "url_list": uris[1], "lists": [uris[1]],
                                                         "gathered": False}
    single = store.join(s3_prefix, "one")
    store.put_bytes(store.join(single, "only.csv"), b"url,caption\nhttp://x/0.jpg,NA\n")
    assert steps.gather_url_lists_step(single + "/", run)["url_list"] == store.join(single, "only.csv")
    assert not store.exists(store.join(run, "url_list.parquet"))
    with pytest.raises(steps.StepError, match="no URL list"):
        steps.gather_url_lists_step(store.join(s3_prefix, "empty") + "/", run)


def test_gather_refuses_lists_with_different_columns_naming_them(s3_prefix, tmp_path):
    uris = _lists(s3_prefix, tmp_path)
    other = store.join(s3_prefix, "lists2", "d-fourth.tsv.gz")
    store.put_bytes(other, gzip.compress(b"url\ttext\nhttp://x/d0.jpg\tNA\n"))
    with pytest.raises(steps.StepError, match="different columns") as info:
        steps.gather_url_lists_step(f"{uris[0]},{other}", store.join(s3_prefix, "run"))
    assert uris[0] in str(info.value) and other in str(info.value) and "'text'" in str(info.value)
    bad = store.join(s3_prefix, "lists3", "e.jsonl")
    store.put_bytes(bad, b'{"url": "http://x/e0.jpg", "caption": "x"}\nnot json\n')
    with pytest.raises(steps.StepError, match=f"cannot read URL list {re.escape(bad)}"):
        steps.gather_url_lists_step(f"{uris[0]},{bad}", store.join(s3_prefix, "run"))


# ------------------------------------------------------------------------------------------------------- submit


@pytest.fixture
def kfp_server(monkeypatch):
    """kfp.Client replaced by a fake that keeps pipelines, versions, experiments and runs the way the KFP API server
    does (version names unique per pipeline, the first version named after the pipeline) and records every call."""
    import kfp

    server = SimpleNamespace(clients=[], calls=[], pipelines={}, versions={}, experiments={}, runs=[],
                             fail_version_upload_once=False)

    def matches(filter_json: str | None, name: str) -> bool:
        if not filter_json:
            return True
        (predicate,) = json.loads(filter_json)["predicates"]
        assert predicate["key"] == "display_name" and predicate["operation"] == "EQUALS"
        return predicate["stringValue"] == name

    class FakeClient:
        def __init__(self, **kwargs):
            self.kwargs = kwargs
            server.clients.append(kwargs)

        def list_pipelines(self, page_token="", page_size=10, sort_by="", filter=None, namespace=None):
            server.calls.append(("list_pipelines", {"namespace": namespace}))
            found = [p for p in server.pipelines.values() if matches(filter, p.display_name)
                     and p.namespace == namespace]
            return SimpleNamespace(pipelines=found or None)

        def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
            server.calls.append(("upload_pipeline", {"name": pipeline_name, "namespace": namespace}))
            pipeline = SimpleNamespace(pipeline_id=f"p-{len(server.pipelines) + 1}", display_name=pipeline_name,
                                       namespace=namespace)
            server.pipelines[pipeline.pipeline_id] = pipeline
            self._add_version(pipeline.pipeline_id, pipeline_name, Path(pipeline_package_path).read_text())
            return pipeline

        def _add_version(self, pipeline_id, name, text):
            if any(v.pipeline_id == pipeline_id and v.display_name == name for v in server.versions.values()):
                raise RuntimeError("(409) Conflict: version name exists")  # idx_pipelineid_name
            version = SimpleNamespace(pipeline_version_id=f"v-{len(server.versions) + 1}", pipeline_id=pipeline_id,
                                      display_name=name, text=text)
            server.versions[version.pipeline_version_id] = version
            return version

        def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
            found = [v for v in server.versions.values() if v.pipeline_id == pipeline_id and matches(
                filter, v.display_name)]
            return SimpleNamespace(pipeline_versions=found or None)

        def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, pipeline_id=None,
                                    pipeline_name=None, description=None):
            server.calls.append(("upload_pipeline_version", {"name": pipeline_version_name, "pipeline_id": pipeline_id,
                                                             "description": description}))
            version = self._add_version(pipeline_id, pipeline_version_name, Path(pipeline_package_path).read_text())
            if server.fail_version_upload_once:  # another submitter won the race
                server.fail_version_upload_once = False
                raise RuntimeError("(409) Conflict")
            return version

        def create_experiment(self, name, description=None, namespace=None):
            server.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
            key = (name, namespace)
            server.experiments.setdefault(key, SimpleNamespace(experiment_id=f"e-{len(server.experiments) + 1}"))
            return server.experiments[key]

        def run_pipeline(self, experiment_id, job_name, pipeline_package_path=None, params=None, pipeline_id=None,
                         version_id=None, pipeline_root=None, enable_caching=None, cache_key=None,
                         service_account=None):
            run = dict(experiment_id=experiment_id, job_name=job_name, pipeline_package_path=pipeline_package_path,
                       params=params, pipeline_id=pipeline_id, version_id=version_id, enable_caching=enable_caching,
                       service_account=service_account)
            server.runs.append(run)
            return SimpleNamespace(run_id=f"run-{len(server.runs)}")

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    server.client_class = FakeClient
    return server


def test_the_fake_client_takes_the_arguments_kfp_2_16_1_takes(kfp_server):
    import inspect

    from kfp.client import Client

    for name in ("list_pipelines", "upload_pipeline", "list_pipeline_versions", "upload_pipeline_version",
                 "create_experiment", "run_pipeline"):
        real = list(inspect.signature(getattr(Client, name)).parameters)
        assert list(inspect.signature(getattr(kfp_server.client_class, name)).parameters) == real, name


def _uploaded_images(text: str) -> set[str]:
    spec = next(yaml.safe_load_all(text))
    return {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}


def test_multi_user_submit_authenticates_uploads_a_version_once_and_runs_it(kfp_server, tmp_path):
    from kfp.client import ServiceAccountTokenVolumeCredentials

    token = tmp_path / "token"
    token.write_text("eyJ...")
    common = dict(namespace="team-a", token_path=str(token), image=DIGEST_REF, experiment="scheduled",
                  runs_root="s3://clipline/runs")

    first = submit("http://ml-pipeline-ui.kubeflow", params={"nodes": "2", "recipe": "configs/demo.yaml",
                                                             "run_prefix": "s3://clipline/runs/r1"}, **common)
    (client,) = kfp_server.clients
    assert client["host"] == "http://ml-pipeline-ui.kubeflow" and client["namespace"] == "team-a"
    assert isinstance(client["credentials"], ServiceAccountTokenVolumeCredentials)
    assert client["credentials"]._token_path == str(token)
    assert ("upload_pipeline", {"name": "clip-pretrain", "namespace": "team-a"}) in kfp_server.calls
    assert ("create_experiment", {"name": "scheduled", "namespace": "team-a"}) in kfp_server.calls
    version = kfp_server.versions[first["version_id"]]
    assert version.display_name == first["version"] == version_name(DIGEST_REF, version.text)
    assert _uploaded_images(version.text) == {DIGEST_REF}  # compiled with --image
    assert DIGEST_REF in [c for c in kfp_server.calls if c[0] == "upload_pipeline_version"][0][1]["description"]
    (run,) = kfp_server.runs
    assert run["pipeline_id"] == first["pipeline_id"] and run["version_id"] == first["version_id"]
    assert run["pipeline_package_path"] is None and run["enable_caching"] is False
    assert run["params"] == {"nodes": 2, "recipe": "configs/demo.yaml", "run_prefix": "s3://clipline/runs/r1"}
    assert run["job_name"] == "r1" and run["service_account"] is None  # the profile's default-editor runs it

    uploads = [c for c in kfp_server.calls if c[0].startswith("upload")]
    again = submit("http://ml-pipeline-ui.kubeflow", params={"run_prefix": "s3://clipline/runs/r2"}, **common)
    assert [c for c in kfp_server.calls if c[0].startswith("upload")] == uploads  # the version is reused
    assert again["version_id"] == first["version_id"] and not again["version_uploaded"]
    assert kfp_server.runs[-1]["version_id"] == first["version_id"]

    newer = DIGEST_REF.replace("0123", "4567")
    third = submit("http://ml-pipeline-ui.kubeflow", params={"run_prefix": "s3://clipline/runs/r3"},
                   **{**common, "image": newer})
    assert third["pipeline_id"] == first["pipeline_id"] and third["version_id"] != first["version_id"]
    assert _uploaded_images(kfp_server.versions[third["version_id"]].text) == {newer}
    assert [c[0] for c in kfp_server.calls].count("upload_pipeline") == 1


def test_standalone_submit_sends_no_credentials_and_uploads_the_committed_yaml(kfp_server, tmp_path):
    result = submit("http://ml-pipeline.kubeflow:8888", params={"run_prefix": "s3://clipline/runs/r1"},
                    experiment="clipline", runs_root="s3://clipline/runs")
    assert kfp_server.clients == [{"host": "http://ml-pipeline.kubeflow:8888"}]  # kfp then sends no token
    assert ("list_pipelines", {"namespace": None}) in kfp_server.calls
    assert ("create_experiment", {"name": "clipline", "namespace": None}) in kfp_server.calls
    version = kfp_server.versions[result["version_id"]]
    assert version.text == COMPILED.read_text() and result["image"] == DEFAULT_IMAGE
    assert result["version"].startswith("clipline-0-1-0-")

    kfp_server.fail_version_upload_once = True  # a concurrent submitter uploads the same new version first
    other = tmp_path / "other.yaml"
    compile_pipeline(other, parts=1)
    raced = submit("http://ml-pipeline.kubeflow:8888", params={"run_prefix": "s3://clipline/runs/r2"},
                   experiment="clipline", runs_root="s3://clipline/runs", pipeline=other)
    assert kfp_server.runs[-1]["version_id"] == raced["version_id"] != result["version_id"]


def test_submit_takes_the_token_path_from_the_environment_and_checks_it(kfp_server, tmp_path, monkeypatch):
    kwargs = dict(params={"run_prefix": "s3://clipline/runs/r1"}, experiment="e", runs_root="s3://clipline/runs")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match=r"\$KF_PIPELINES_SA_TOKEN_PATH: no token file at .*missing"):
        submit("http://kfp", **kwargs)
    assert not kfp_server.clients
    (tmp_path / "missing").write_text("token")
    submit("http://kfp", **kwargs)
    assert kfp_server.clients[-1]["credentials"]._token_path == str(tmp_path / "missing")
    with pytest.raises(SubmitError, match="--token-path: no token file at /nowhere"):
        submit("http://kfp", token_path="/nowhere", **kwargs)


@pytest.mark.parametrize("params, message", [({"nodez": "2"}, "no parameter 'nodez'"),
                                             ({"nodes": "two"}, "'two' is not a NUMBER_INTEGER")])
def test_submit_checks_parameters_against_the_pipeline(kfp_server, params, message):
    with pytest.raises(SubmitError, match=message):
        submit("http://kfp", params=params, experiment="e", runs_root="s3://clipline/runs")
    assert not kfp_server.runs


def test_version_names_are_dns_labels_from_the_image_and_the_yaml():
    tagged = version_name("registry.example.com/clipline/clipline:0.1.0", "spec")
    assert re.fullmatch(r"clipline-0-1-0-[0-9a-f]{10}", tagged)
    assert version_name("registry.example.com/clipline/clipline:0.1.0", "spec 2") != tagged
    digest = version_name(DIGEST_REF, "spec")
    assert re.fullmatch(r"clipline-sha256-0123456789ab-[0-9a-f]{10}", digest)
    long = version_name("r.io/" + "x" * 120 + ":" + "t" * 100 + "@sha256:" + "f" * 64, "spec")
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)


def _url_list(uri: str, rows: int, tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    pd.DataFrame({"url": [f"http://img/{uri[-12:]}/{i}.jpg" for i in range(rows)],
                  "caption": [f"caption {i}" for i in range(rows)]}).to_parquet(path)
    store.put_file(uri, path)


def test_submit_passes_the_url_lists_to_the_run_and_skips_unchanged(s3_prefix, kfp_server, tmp_path):
    lists = store.join(s3_prefix, "url-lists")
    first_list = store.join(lists, "2026-11-01.parquet")
    _url_list(first_list, 5, tmp_path)
    common = dict(params={"recipe": "configs/demo.yaml", "nodes": "2"}, experiment="scheduled",
                  runs_root=store.join(s3_prefix, "runs"), url_lists=lists, skip_if_unchanged=True)

    first = submit("http://kfp", **common)
    assert first["submitted"] and len(kfp_server.runs) == 1
    params = kfp_server.runs[0]["params"]
    assert params["url_list"] == first_list  # listed only: the pipeline's gather step reads the lists
    assert params["run_prefix"].startswith(store.join(s3_prefix, "runs"))
    assert not store.exists(store.join(params["run_prefix"], "url_list.parquet"))
    record = json.loads(store.get_bytes(store.join(lists, SUBMITTED)))
    assert record["run_id"] == "run-1" and [item["uri"] for item in record["lists"]] == [first_list]

    again = submit("http://kfp", **common)
    assert not again["submitted"] and again["reason"] == "URL lists unchanged" and len(kfp_server.runs) == 1

    second_list = store.join(lists, "2026-11-08.csv.gz")
    store.put_bytes(second_list, gzip.compress(b"url,caption\nhttp://img/x.jpg,NA\n"))
    third = submit("http://kfp", **common)
    assert third["submitted"] and kfp_server.runs[-1]["params"]["url_list"] == f"{first_list},{second_list}"


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
# steps.train_on_cluster itself is tested against a fake Kubernetes API in tests/test_launch_cluster.py; the train
# component's call of it is tested above (test_train_component_passes_every_parameter_on).


def test_train_timeout_follows_the_recipe():
    from components.common.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "configs" / "demo.yaml")
    samples = sum(stage.samples for stage in recipe.stages)
    one_gpu, many = steps.train_timeout_s(recipe, 1, 1), steps.train_timeout_s(recipe, 4, 8)
    assert one_gpu == int(samples / steps.MIN_SAMPLES_PER_S) + steps.SUBMIT_SLACK_S
    assert steps.SUBMIT_SLACK_S < many < one_gpu  # more GPUs, less time
