"""The trainer's torchx component and the PyTorchJob scheduler (no cluster: dryrun, validation, status mapping)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.specs import AppState

from components.train.launch.component import train
from components.train.launch.pytorchjob import (
    PyTorchJobValidationError,
    create_scheduler,
    crd_path,
    describe_from_job,
    job_name,
    state_from_status,
    validate_pytorchjob,
)

REPO = Path(__file__).resolve().parents[1]
SECRET = "clipline-store-credentials"
DATA, OUTPUT = "s3://clipline/run/train-data/manifest.json", "s3://clipline/run/train"


def _job(nnodes=1, nproc=1, gpu=0, **cfg):
    app = train("configs/demo.yaml", DATA, OUTPUT, nnodes=nnodes, nproc_per_node=nproc, gpu=gpu)
    info = create_scheduler("test").submit_dryrun(app, {"env_secret": SECRET, **cfg})
    return info.request.resource


def _containers(job):
    for rtype, rs in job["spec"]["pytorchReplicaSpecs"].items():
        for c in rs["template"]["spec"]["containers"]:
            yield rtype, rs, c


# The CRD is the upstream file in shared/ next to the repository (CI has it); where it is absent, only the schema
# check is skipped, as the validator itself does.
NEEDS_CRD = pytest.mark.skipif(crd_path() is None, reason="PyTorchJob CRD file absent (shared/k8s/crds)")


@NEEDS_CRD
def test_crd_present():
    assert crd_path() is not None


def test_component_builds_torchrun_appdef():
    app = train("configs/demo.yaml", DATA, OUTPUT, nnodes=2, nproc_per_node=4, gpu=4)
    (role,) = app.roles
    assert role.entrypoint == "torchrun"
    assert role.num_replicas == 2
    assert "--nnodes=2" in role.args and "--nproc_per_node=4" in role.args
    i = role.args.index("-m")
    assert role.args[i:] == ["-m", "components.train.main", "--recipe", "configs/demo.yaml", "--data", DATA,
                             "--output", OUTPUT, "--resume", "auto", "--pg-timeout-minutes=30.0"]
    assert role.resource.gpu == 4


def test_component_resolves_under_local_cwd():
    out = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "--dryrun", "-s", "local_cwd", "--workspace", "",
         "components/train/launch/component.py:train", "--recipe", "configs/demo.yaml", "--data", DATA,
         "--output", OUTPUT],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "components.train.main" in out.stdout and "torchrun" in out.stdout


def test_dryrun_single_node():
    job = _job()
    validate_pytorchjob(job)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master"} and specs["Master"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "1"
    (_, _, c), = list(_containers(job))
    assert c["command"][:3] == ["torchrun", "--nnodes=1", "--nproc_per_node=1"]
    assert not any(a.startswith("--rdzv") for a in c["command"])


def test_dryrun_four_nodes_four_gpus():
    job = _job(nnodes=4, nproc=4, gpu=4, gang_scheduler="volcano", queue="train", namespace="ml",
               service_account="trainer", image_pull_secret="regcred", node_selector="gpu=a100",
               tolerations="nvidia.com/gpu:NoSchedule", priority_class="high")
    validate_pytorchjob(job)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert spec["nprocPerNode"] == "4"
    rp = spec["runPolicy"]
    assert rp["cleanPodPolicy"] in ("None", "Running", "All")
    assert rp["ttlSecondsAfterFinished"] > 0 and rp["backoffLimit"] >= 0
    assert rp["schedulingPolicy"] == {"minAvailable": 4, "queue": "train", "priorityClass": "high"}
    for _, rs, c in _containers(job):
        pod = rs["template"]["spec"]
        assert c["name"] == "pytorch"
        assert c["command"][:3] == ["torchrun", "--nnodes=4", "--nproc_per_node=4"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
        assert c["envFrom"] == [{"secretRef": {"name": SECRET}}]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert "NCCL_DEBUG" in env
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["serviceAccountName"] == "trainer"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["nodeSelector"] == {"gpu": "a100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["priorityClassName"] == "high" and pod["schedulerName"] == "volcano"


def test_no_literal_credentials():
    text = json.dumps(_job(nnodes=2)).lower()
    for word in ("access_key", "secret_key", "accesskey", "secretkey", "password", "aws_secret"):
        assert word not in text


def test_job_name_is_dns1035_with_suffix():
    a, b = job_name("My_Train.Run"), job_name("My_Train.Run")
    assert a != b and a.startswith("my-train-run-")
    long = job_name("9" + "x" * 200)
    assert len(long) <= 63 and long[0].isalpha()


@pytest.mark.parametrize(
    "mutate, rule",
    [
        (lambda j: j["metadata"].__setitem__("name", "bad_name"), "DNS-1035"),
        (lambda j: j["metadata"].__setitem__("name", "a" * 64), "DNS-1035"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", 2), "Master replicas"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
         .__setitem__("name", "trainer"), "container name"),
        (lambda j: (j["spec"].__setitem__("elasticPolicy", {"minReplicas": 1, "maxReplicas": 3}),
                    j["spec"]["pytorchReplicaSpecs"].pop("Worker")), "elasticPolicy"),
        pytest.param(lambda j: j["spec"].__setitem__("nprocPerNode", 4), "CRD schema", marks=NEEDS_CRD),
    ],
    ids=["underscore", "too-long", "two-masters", "container-renamed", "elastic-no-worker", "schema-type"],
)
def test_broken_jobs_fail_naming_the_rule(mutate, rule):
    job = copy.deepcopy(_job(nnodes=4, nproc=4, gpu=4))
    validate_pytorchjob(job)
    mutate(job)
    with pytest.raises(PyTorchJobValidationError, match=rule):
        validate_pytorchjob(job)


def test_elastic_with_worker_passes():
    job = _job(nnodes=2)
    job["spec"]["elasticPolicy"] = {"minReplicas": 1, "maxReplicas": 2, "rdzvBackend": "c10d"}
    validate_pytorchjob(job)


def test_missing_crd_skips_schema_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLIPLINE_PYTORCHJOB_CRD", str(tmp_path / "absent.yaml"))
    job = _job()
    job["spec"]["nprocPerNode"] = 4  # a schema error, not checked without the CRD
    validate_pytorchjob(job)
    assert "skipping the CRD schema check" in caplog.text
    job["metadata"]["name"] = "Bad"
    with pytest.raises(PyTorchJobValidationError, match="DNS-1035"):
        validate_pytorchjob(job)


def _cond(*types, false=()):
    return {"conditions": [{"type": t, "status": "False" if t in false else "True"} for t in types]}


@pytest.mark.parametrize(
    "status, state",
    [
        (_cond("Created"), AppState.SUBMITTED),
        (_cond("Created", "Running"), AppState.RUNNING),
        (_cond("Created", "Running", "Restarting", false=("Running",)), AppState.PENDING),
        (_cond("Created", "Running", "Succeeded", false=("Running",)), AppState.SUCCEEDED),
        (_cond("Created", "Running", "Failed", false=("Running",)), AppState.FAILED),
        ({}, AppState.SUBMITTED),
    ],
    ids=["created", "running", "restarting", "succeeded", "failed", "no-conditions"],
)
def test_conditions_to_appstate(status, state):
    assert state_from_status(status) == state


def test_describe_from_job():
    job = {"metadata": {"name": "x"}, "status": {
        "conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True", "message": "m"}],
        "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 2}}}}
    resp = describe_from_job("default:x", job)
    assert resp.state == AppState.RUNNING and resp.msg == "m"
    assert {r.role: len(r.replicas) for r in resp.roles_statuses} == {"Master": 1, "Worker": 2}


def test_import_creates_no_client():
    s = create_scheduler("t")
    assert s._client is None


def _entry_point_installed() -> bool:
    from importlib import metadata

    return any(ep.name == "pytorchjob" for ep in metadata.entry_points().select(group="torchx.schedulers"))


def test_cli_dryrun_prints_pytorchjob(tmp_path):
    env = dict(os.environ)
    if not _entry_point_installed():
        # register the scheduler for this subprocess through a temporary dist-info; torchx drops its default
        # schedulers once the group has any entry, so local_cwd is registered too (as pyproject.toml must)
        dist = tmp_path / "clipline_torchx_test-0.0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clipline-torchx-test\nVersion: 0.0.0\n")
        (dist / "entry_points.txt").write_text(
            "[torchx.schedulers]\n"
            "pytorchjob = components.train.launch.pytorchjob:create_scheduler\n"
            "local_cwd = torchx.schedulers.local_scheduler:create_scheduler\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), str(REPO), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "--dryrun", "-s", "pytorchjob", "--workspace", "",
         "components/train/launch/component.py:train", "--recipe", "configs/demo.yaml", "--data", DATA,
         "--output", OUTPUT],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "kind: PyTorchJob" in out.stdout and "name: pytorch" in out.stdout
    start = out.stdout.index("apiVersion: kubeflow.org/v1")
    job = yaml.safe_load(out.stdout[start:])
    validate_pytorchjob(job)


class _FakeCustom:
    def __init__(self):
        self.jobs = {}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        self.jobs[(namespace, body["metadata"]["name"])] = copy.deepcopy(body)
        return body

    def get_namespaced_custom_object_status(self, group, version, namespace, plural, name):
        from kubernetes.client.rest import ApiException

        if (namespace, name) not in self.jobs:
            raise ApiException(status=404)
        return self.jobs[(namespace, name)]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        del self.jobs[(namespace, name)]

    def list_namespaced_custom_object(self, group, version, namespace, plural):
        return {"items": [j for (ns, _), j in self.jobs.items() if ns == namespace]}


class _FakeCore:
    def __init__(self):
        self.calls = []

    def read_namespaced_pod_log(self, **kw):
        self.calls.append(kw)
        return "step 1\nloss 0.5\nstep 2\n"


def test_schedule_describe_list_logs_cancel_with_fake_client(monkeypatch):
    s = create_scheduler("t")
    custom, core = _FakeCustom(), _FakeCore()
    monkeypatch.setattr(s, "_custom", lambda: custom)
    monkeypatch.setattr(s, "_core", lambda: core)
    app = train("configs/demo.yaml", DATA, OUTPUT, nnodes=2)
    app_id = s.schedule(s.submit_dryrun(app, {"namespace": "default"}))
    ns, name = app_id.split(":")
    assert ns == "default" and (ns, name) in custom.jobs
    assert s.describe(app_id).state == AppState.SUBMITTED
    custom.jobs[(ns, name)]["status"] = _cond("Created", "Running")
    assert s.describe(app_id).state == AppState.RUNNING
    assert [r.app_id for r in s.list()] == [app_id]
    lines = list(s.log_iter(app_id, "trainer", k=0, regex="step"))
    assert [ln.strip() for ln in lines] == ["step 1", "step 2"]
    assert core.calls[0]["name"] == f"{name}-master-0" and core.calls[0]["container"] == "pytorch"
    list(s.log_iter(app_id, "trainer", k=2))
    assert core.calls[1]["name"] == f"{name}-worker-1"
    s.cancel(app_id)
    assert custom.jobs == {} and s.describe(app_id) is None
