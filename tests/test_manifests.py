"""manifests/: kustomize renders, Kubernetes schemas, PyTorchJob CRD + webhook rules, no credentials, restricted pods.

No cluster: `kubectl kustomize` renders offline, kubernetes-validate checks built-in kinds against the Kubernetes
OpenAPI schemas (strict: unknown fields fail), and the PyTorchJob goes through our own `validate_pytorchjob`
(the training operator's CRD schema, skipped only where the CRD file is absent, plus its webhook rules).
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from components.train.launch.pytorchjob import PyTorchJobValidationError, crd_path, validate_pytorchjob

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
TARGETS = {
    "base": MANIFESTS / "base",
    "local-dev": MANIFESTS / "overlays" / "local-dev",
    "gpu": MANIFESTS / "overlays" / "gpu",
}
# The oldest Kubernetes minor we support (CronJob timeZone, PSS labels) and the kubectl on the project's machines.
KUBERNETES_VERSIONS = ("1.30", "1.32")
NAMESPACE = "clipline"
SECRET = "clipline-store-credentials"
SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
SERVICE_ACCOUNT = "clipline-pipeline"

KUBECTL = shutil.which("kubectl")
NEEDS_KUBECTL = pytest.mark.skipif(KUBECTL is None, reason="kubectl binary not found: `kubectl kustomize` renders "
                                                           "the manifests")
_CRD = crd_path()
NEEDS_CRD = pytest.mark.skipif(_CRD is None or not _CRD.is_file(),
                               reason="PyTorchJob CRD file absent (shared/k8s/crds)")
pytestmark = NEEDS_KUBECTL

WORKLOAD_KINDS = {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "PyTorchJob"}
OTHER_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "ServiceAccount", "Role", "RoleBinding"}


@lru_cache(maxsize=None)
def _render(target: str) -> Tuple[Dict[str, Any], ...]:
    out = subprocess.run([KUBECTL, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {target} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(target: str) -> List[Dict[str, Any]]:
    """A fresh (mutable) copy of the rendered objects."""
    return copy.deepcopy(list(_render(target)))


def find(objs, kind: str, name: str | None = None) -> List[Dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind: str, name: str) -> Dict[str, Any]:
    (obj,) = find(objs, kind, name)
    return obj


# ----------------------------------------------------------------------------------------------- pod security checker
def pod_specs(obj: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, pod spec) for every pod template an object holds."""
    kind, name, spec = obj["kind"], obj["metadata"]["name"], obj.get("spec") or {}
    where = f"{kind}/{name}"
    if kind == "Pod":
        yield where, spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield where, spec["template"]["spec"]
    elif kind == "CronJob":
        yield where, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "PyTorchJob":
        for rtype, rspec in spec["pytorchReplicaSpecs"].items():
            yield f"{where}[{rtype}]", rspec["template"]["spec"]


# Pod Security Standards, "restricted" profile (plus baseline), and what this project adds on top of it.
ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}


def _positive_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def restricted_violations(obj: Dict[str, Any]) -> List[str]:
    """Everything in obj's pod templates that breaks the restricted Pod Security Standard or our resource rule."""
    problems: List[str] = []
    for where, pod in pod_specs(obj):
        def bad(msg: str, _where: str = where) -> None:
            problems.append(f"{_where}: {msg}")

        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(field):
                bad(f"{field} is set")
        psc = pod.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            bad("pod securityContext.runAsNonRoot must be true")
        for field in ("runAsUser", "runAsGroup", "fsGroup"):
            if not _positive_id(psc.get(field)):
                bad(f"pod securityContext.{field} must be a non-zero id, got {psc.get(field)!r}")
        if (psc.get("seccompProfile") or {}).get("type") not in SECCOMP_OK:
            bad("pod securityContext.seccompProfile.type must be RuntimeDefault")
        for vol in pod.get("volumes") or []:
            types = set(vol) - {"name"}
            if not types <= ALLOWED_VOLUME_TYPES:
                bad(f"volume {vol.get('name')!r} has a disallowed type {sorted(types - ALLOWED_VOLUME_TYPES)}")
        containers = [*(pod.get("initContainers") or []), *(pod.get("containers") or []),
                      *(pod.get("ephemeralContainers") or [])]
        if not containers:
            bad("no containers")
        for c in containers:
            cw = f"container {c.get('name')!r}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                bad(f"{cw}: securityContext.allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                bad(f"{cw}: securityContext.privileged is set")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []):
                bad(f"{cw}: securityContext.capabilities.drop must contain ALL")
            if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                bad(f"{cw}: securityContext.capabilities.add may only hold NET_BIND_SERVICE")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad(f"{cw}: securityContext.readOnlyRootFilesystem must be true")
            if "runAsNonRoot" in sc and sc["runAsNonRoot"] is not True:
                bad(f"{cw}: securityContext.runAsNonRoot overrides the pod's with {sc['runAsNonRoot']!r}")
            if "runAsUser" in sc and not _positive_id(sc["runAsUser"]):
                bad(f"{cw}: securityContext.runAsUser must be non-zero")
            if "seccompProfile" in sc and (sc["seccompProfile"] or {}).get("type") not in SECCOMP_OK:
                bad(f"{cw}: securityContext.seccompProfile.type must be RuntimeDefault")
            if any(p.get("hostPort") for p in c.get("ports") or []):
                bad(f"{cw}: hostPort is set")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (res.get(kind) or {}):
                        bad(f"{cw}: resources.{kind}.{resource} is missing")
    return problems


# ----------------------------------------------------------------------------------------------- (1) rendering
@pytest.mark.parametrize("target", list(TARGETS))
def test_kustomize_renders(target):
    objs = render(target)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "StatefulSet", "Service", "ConfigMap", "ServiceAccount", "Role", "RoleBinding",
            "PyTorchJob", "CronJob", "Job"} <= kinds
    # every kind is known to this file, so no pod template escapes the security checker
    assert kinds <= WORKLOAD_KINDS | OTHER_KINDS, kinds - (WORKLOAD_KINDS | OTHER_KINDS)
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"]["name"])
    assert one(objs, "Namespace", NAMESPACE)


# ----------------------------------------------------------------------------------------------- (2) schemas
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_builtin_objects_pass_kubernetes_validate_strict(target, version):
    failures = []
    for o in render(target):
        if o["kind"] == "PyTorchJob":
            continue  # a custom resource: checked against its CRD below
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            failures.append(f"{o['kind']}/{o['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(e.message)
    assert not failures, "\n".join(failures)


def test_kubernetes_validate_strict_refuses_unknown_fields():
    sts = copy.deepcopy(one(render("base"), "StatefulSet", "minio"))
    kubernetes_validate.validate(sts, KUBERNETES_VERSIONS[0], strict=True)
    sts["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # a typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES_VERSIONS[0], strict=True)


def _nnodes_nproc(container) -> Tuple[int, int]:
    cmd = container["command"]
    assert cmd[0] == "torchrun"
    flags = dict(a.split("=", 1) for a in cmd[1:] if a.startswith("--") and "=" in a)
    return int(flags["--nnodes"]), int(flags["--nproc_per_node"])


@pytest.mark.parametrize("target, nnodes, nproc, gpus", [("base", 2, 1, 0), ("local-dev", 1, 1, 0),
                                                         ("gpu", 4, 8, 8)])
def test_pytorchjob_passes_crd_and_webhook_rules(target, nnodes, nproc, gpus):
    job = one(render(target), "PyTorchJob", "clipline-train-example")
    validate_pytorchjob(job)  # CRD schema (where the CRD file is present) + the operator's webhook rules
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert 1 + replicas.get("Worker", {}).get("replicas", 0) == nnodes
    assert spec["nprocPerNode"] == str(nproc)  # explicit, never "auto"
    rp = spec["runPolicy"]
    assert rp["cleanPodPolicy"] in ("None", "Running", "All")
    assert rp["ttlSecondsAfterFinished"] > 0 and rp["backoffLimit"] >= 0
    for rtype, rspec in replicas.items():
        pod = rspec["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == "clipline:0.1.0"
        assert _nnodes_nproc(c) == (nnodes, nproc), rtype
        i = c["command"].index("-m")
        assert c["command"][i:] == [
            "-m", "components.train.main", "--recipe", "configs/demo.yaml",
            "--data", "s3://clipline/runs/example/train-data/manifest.json",
            "--output", "s3://clipline/runs/example/train", "--resume", "auto"]
        assert c["envFrom"] == [{"configMapRef": {"name": "clipline-store"}}, {"secretRef": {"name": SECRET}}]
        shm = {v["name"]: v for v in pod["volumes"]}[
            next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")]
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"].get("sizeLimit")
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/dev/shm", "/tmp"}
        limits = c["resources"]["limits"]
        if gpus:
            assert limits["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == str(gpus) == str(nproc)
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"} <= {e["name"] for e in c["env"]}
        else:
            assert "nvidia.com/gpu" not in limits


@pytest.mark.parametrize("target", list(TARGETS))
def test_pytorchjob_matches_our_scheduler(target):
    """The example job has the shape our torchx `pytorchjob` scheduler submits for the same arguments."""
    from components.train.launch.component import train
    from components.train.launch.pytorchjob import create_scheduler

    job = one(render(target), "PyTorchJob", "clipline-train-example")
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    nnodes, nproc = _nnodes_nproc(master)
    app = train("configs/demo.yaml", "s3://clipline/runs/example/train-data/manifest.json",
                "s3://clipline/runs/example/train", nnodes=nnodes, nproc_per_node=nproc, gpu=0,
                image="clipline:0.1.0")
    generated = create_scheduler("test").submit_dryrun(app, {"env_secret": SECRET}).request.resource
    gen_master = generated["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    # the scheduler adds its own restart and collective-timeout flags; the rest is the same command
    gen_cmd = [a for a in gen_master["command"]
               if not a.startswith(("--max-restarts", "--pg-timeout-minutes"))]
    assert master["command"] == gen_cmd
    assert job["spec"]["nprocPerNode"] == generated["spec"]["nprocPerNode"]
    assert set(job["spec"]["pytorchReplicaSpecs"]) == set(generated["spec"]["pytorchReplicaSpecs"])


@NEEDS_CRD
def test_pytorchjob_crd_schema_is_applied_to_the_rendered_job():
    job = one(render("gpu"), "PyTorchJob", "clipline-train-example")
    job["spec"]["nprocPerNode"] = 8  # the CRD wants a string
    with pytest.raises(PyTorchJobValidationError, match="CRD schema"):
        validate_pytorchjob(job)


# ----------------------------------------------------------------------------------------------- (3) credentials
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def _containers(obj):
    for where, pod in pod_specs(obj):
        for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            yield where, c


@pytest.mark.parametrize("target", ["base", "gpu"])
def test_no_literal_credentials_outside_local_dev(target):
    objs = render(target)
    for s in find(objs, "Secret"):
        assert not s.get("data") and not s.get("stringData"), f"Secret {s['metadata']['name']} carries values"
    for o in objs:
        for where, c in _containers(o):
            for e in c.get("env") or []:
                if CREDENTIAL_NAME.search(e["name"]):
                    assert "value" not in e, f"{where}: env {e['name']} is a literal; use valueFrom"
    # the store credentials are referenced, never defined: the user creates the Secret (manifests/README.md)
    assert not find(objs, "Secret", SECRET)


def test_local_dev_credentials_are_marked_dev_only():
    objs = render("local-dev")
    (secret,) = find(objs, "Secret")
    assert secret["metadata"]["name"] == SECRET  # no name-suffix hash: the base refers to this exact name
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(values) == SECRET_KEYS
    assert all("local-dev-only" in v for v in values.values()), values
    assert len(values["AWS_SECRET_ACCESS_KEY"]) >= 8  # MinIO refuses shorter root passwords
    kustomization = (TARGETS["local-dev"] / "kustomization.yaml").read_text()
    assert "LOCAL-DEV-ONLY" in kustomization


@pytest.mark.parametrize("target", list(TARGETS))
def test_config_references_resolve(target):
    """Every ConfigMap/Secret a pod reads exists in the render, except the store Secret the user creates."""
    objs = render(target)
    configmaps = {o["metadata"]["name"]: o.get("data") or {} for o in find(objs, "ConfigMap")}
    secrets = {o["metadata"]["name"]: o.get("data") or {} for o in find(objs, "Secret")}
    if target != "local-dev":
        secrets[SECRET] = dict.fromkeys(SECRET_KEYS)  # created by `kubectl create secret generic` (README)
    for o in objs:
        for where, c in _containers(o):
            for ref in c.get("envFrom") or []:
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps, where
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets, where
            for e in c.get("env") or []:
                src = e.get("valueFrom") or {}
                if "configMapKeyRef" in src:
                    assert src["configMapKeyRef"]["key"] in configmaps[src["configMapKeyRef"]["name"]], where
                if "secretKeyRef" in src:
                    assert src["secretKeyRef"]["key"] in secrets[src["secretKeyRef"]["name"]], where


def test_store_and_kfp_launcher_config():
    objs = render("base")
    store = one(objs, "ConfigMap", "clipline-store")["data"]
    assert store == {"AWS_ENDPOINT_URL": "http://minio.clipline.svc.cluster.local:9000", "AWS_REGION": "us-east-1"}
    svc = one(objs, "Service", "minio")
    assert 9000 in {p["port"] for p in svc["spec"]["ports"]}
    env = {e["name"]: e for e in one(objs, "StatefulSet", "minio")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "AWS_ACCESS_KEY_ID"}
    assert env["MINIO_ROOT_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "AWS_SECRET_ACCESS_KEY"}

    launcher = one(objs, "ConfigMap", "kfp-launcher")["data"]
    assert launcher["defaultPipelineRoot"] == "s3://clipline/pipeline-root"
    default = yaml.safe_load(launcher["providers"])["s3"]["default"]
    assert default["endpoint"] == store["AWS_ENDPOINT_URL"] and default["disableSSL"] is True
    assert default["region"] == store["AWS_REGION"]
    assert default["credentials"] == {"fromEnv": False, "secretRef": {
        "secretName": SECRET, "accessKeyKey": "AWS_ACCESS_KEY_ID", "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}}


@pytest.mark.parametrize("target, size", [("base", "100Gi"), ("local-dev", "5Gi"), ("gpu", "2Ti")])
def test_minio_storage_per_overlay(target, size):
    sts = one(render(target), "StatefulSet", "minio")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == size
    mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"


# ----------------------------------------------------------------------------------------------- (4) pod security
@pytest.mark.parametrize("target", list(TARGETS))
def test_every_pod_meets_restricted_and_has_resources(target):
    objs = render(target)
    workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
    assert {o["kind"] for o in workloads} >= {"StatefulSet", "Job", "CronJob", "PyTorchJob"}
    problems = [p for o in workloads for p in restricted_violations(o)]
    assert not problems, "\n".join(problems)


def _container(obj, index=0, replica="Master"):
    return dict(pod_specs(obj))[
        f"{obj['kind']}/{obj['metadata']['name']}" + (f"[{replica}]" if obj["kind"] == "PyTorchJob" else "")
    ]["containers"][index]


def _pod(obj, replica="Master"):
    return dict(pod_specs(obj))[
        f"{obj['kind']}/{obj['metadata']['name']}" + (f"[{replica}]" if obj["kind"] == "PyTorchJob" else "")]


@pytest.mark.parametrize(
    "kind, name, mutate, message",
    [
        ("PyTorchJob", "clipline-train-example",
         lambda o: _container(o, replica="Worker")["securityContext"].__setitem__("allowPrivilegeEscalation", True),
         "allowPrivilegeEscalation"),
        ("StatefulSet", "minio", lambda o: _container(o)["resources"]["limits"].pop("memory"),
         "resources.limits.memory"),
        ("CronJob", "clipline-retrain", lambda o: _container(o)["resources"].pop("requests"),
         "resources.requests.cpu"),
        ("CronJob", "clipline-retrain", lambda o: _pod(o)["securityContext"].__setitem__("runAsUser", 0),
         "runAsUser"),
        ("Job", "clipline-store-init", lambda o: _pod(o)["securityContext"].pop("seccompProfile"),
         "seccompProfile"),
        ("StatefulSet", "minio", lambda o: _container(o)["securityContext"]["capabilities"].__setitem__("drop", []),
         "capabilities.drop"),
        ("StatefulSet", "minio",
         lambda o: _container(o)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
         "readOnlyRootFilesystem"),
        ("PyTorchJob", "clipline-train-example",
         lambda o: _pod(o)["volumes"].append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
    ],
    ids=["escalation", "no-memory-limit", "no-requests", "root-user", "no-seccomp", "caps-kept", "rw-root",
         "hostpath"],
)
def test_security_checker_catches_violations(kind, name, mutate, message):
    obj = copy.deepcopy(one(render("gpu"), kind, name))
    assert restricted_violations(obj) == []
    mutate(obj)
    problems = restricted_violations(obj)
    assert problems and any(message in p for p in problems), problems


# ----------------------------------------------------------------------------------------------- (5) scheduled retraining
@pytest.mark.parametrize("target", list(TARGETS))
def test_retrain_cronjob(target):
    objs = render(target)
    cron = one(objs, "CronJob", "clipline-retrain")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5  # a Kubernetes cron string (KFP recurring runs use 6 fields)
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    (c,) = pod["containers"]
    cmd = c["command"]
    assert c["image"] == "clipline:0.1.0"
    assert cmd[:2] == ["clipline", "submit"]
    assert cmd[cmd.index("--host") + 1] == "$(KFP_HOST)"
    assert cmd[cmd.index("--url-lists") + 1] == "s3://clipline/url-lists/"
    assert "--skip-if-unchanged" in cmd
    assert cmd[cmd.index("--pipeline") + 1].endswith(".yaml")
    params = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--param"]
    assert "recipe=configs/demo.yaml" in params and "models_prefix=s3://clipline/models" in params
    # $(KFP_HOST) expands from the container's env, which takes it from a ConfigMap
    (host,) = [e for e in c["env"] if e["name"] == "KFP_HOST"]
    ref = host["valueFrom"]["configMapKeyRef"]
    assert one(objs, "ConfigMap", ref["name"])["data"][ref["key"]].startswith("http://")
    assert {"configMapRef": {"name": "clipline-store"}} in c["envFrom"]
    assert {"secretRef": {"name": SECRET}} in c["envFrom"]


# ----------------------------------------------------------------------------------------------- (6) RBAC
@pytest.mark.parametrize("target", list(TARGETS))
def test_rbac_is_namespaced_and_minimal(target):
    objs = render(target)
    assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding")
    role = one(objs, "Role", SERVICE_ACCOUNT)
    assert role["metadata"]["namespace"] == NAMESPACE
    granted: Dict[Tuple[str, str], set] = {}
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {
        ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
    }
    binding = one(objs, "RoleBinding", SERVICE_ACCOUNT)
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]
    assert one(objs, "ServiceAccount", SERVICE_ACCOUNT)
