"""A torchx scheduler that submits a Kubeflow PyTorchJob (kubeflow.org/v1, training-operator v1.9).

torchx's built-in ``kubernetes`` scheduler emits a Volcano Job; this one targets the training operator.
Registered through the ``torchx.schedulers`` entry-point group as ``pytorchjob``.

Nothing touches a cluster at import: the kubernetes client is created on first use (schedule/describe/...).
"""

import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml
from torchx.schedulers.api import (
    DescribeAppResponse,
    ListAppResponse,
    Scheduler,
    Stream,
    filter_regex,
    split_lines,
)
from torchx.specs import AppDef, AppDryRunInfo, AppState, Role, RoleStatus, ReplicaStatus, macros, runopts

log = logging.getLogger(__name__)

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
CONTAINER_NAME = "pytorch"
GPU_RESOURCE = "nvidia.com/gpu"
CRD_FILE = "kubeflow.org_pytorchjobs.v1.9.0.yaml"
CRD_ENV = "CLIPLINE_PYTORCHJOB_CRD"

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_MAX = 63
SUFFIX_LEN = 6
# generated names leave room for the operator's "-worker-NNN" pod/service suffixes within a 63-char label
GENERATED_NAME_MAX = 48

# torchrun flags the operator's environment supplies (PET_MASTER_ADDR/PORT, PET_NODE_RANK) or that we set ourselves
_TORCHRUN_OWN = ("--nnodes", "--nproc_per_node", "--nproc-per-node", "--rdzv_backend", "--rdzv-backend",
                 "--rdzv_endpoint", "--rdzv-endpoint", "--rdzv_id", "--rdzv-id", "--node_rank", "--node-rank",
                 "--master_addr", "--master-addr", "--master_port", "--master-port", "--standalone")

DEFAULT_NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_SOCKET_IFNAME": "eth0",
}


class PyTorchJobValidationError(ValueError):
    """A PyTorchJob that the CRD schema or the training operator's webhook would refuse."""


# --------------------------------------------------------------------------------------------------------- naming
def job_name(app_name: str, suffix: Optional[str] = None) -> str:
    """A DNS-1035 label from the app name plus a short unique suffix."""
    suffix = suffix if suffix is not None else uuid.uuid4().hex[:SUFFIX_LEN]
    base = re.sub(r"[^a-z0-9-]+", "-", app_name.lower()).strip("-")
    base = re.sub(r"-{2,}", "-", base)
    base = base.lstrip("0123456789-") or "job"
    base = base[: GENERATED_NAME_MAX - len(suffix) - 1].rstrip("-")
    return f"{base}-{suffix}"


# --------------------------------------------------------------------------------------------------------- validation
def crd_path() -> Optional[Path]:
    env = os.environ.get(CRD_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    for cand in (repo.parent / "shared" / "k8s" / "crds" / CRD_FILE, repo / "shared" / "k8s" / "crds" / CRD_FILE):
        if cand.is_file():
            return cand
    return None


@lru_cache(maxsize=4)
def _load_schema(path: str) -> Dict[str, Any]:
    crd = yaml.safe_load(Path(path).read_text())
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    return versions[VERSION]["schema"]["openAPIV3Schema"]


def validate_schema(job: Mapping[str, Any], path: Optional[Path] = None) -> None:
    path = path or crd_path()
    if path is None or not Path(path).is_file():
        log.warning("PyTorchJob CRD %s not found (set %s): skipping the CRD schema check", CRD_FILE, CRD_ENV)
        return
    import jsonschema

    validator = jsonschema.Draft7Validator(_load_schema(str(path)))
    errors = sorted(validator.iter_errors(job), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:10])
        raise PyTorchJobValidationError(f"CRD schema: PyTorchJob does not match {Path(path).name}: {msgs}")


def validate_webhook(job: Mapping[str, Any]) -> None:
    """The training operator's admission webhook rules (not expressed in the CRD schema)."""
    name = (job.get("metadata") or {}).get("name") or ""
    if len(name) > DNS_1035_MAX or not DNS_1035.match(name):
        raise PyTorchJobValidationError(
            f"webhook rule DNS-1035 name: {name!r} must be at most {DNS_1035_MAX} characters matching "
            f"[a-z]([-a-z0-9]*[a-z0-9])?"
        )
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Master" in replicas:
        n = replicas["Master"].get("replicas", 1)
        if n != 1:
            raise PyTorchJobValidationError(f"webhook rule Master replicas: must be exactly 1, got {n}")
    else:
        raise PyTorchJobValidationError("webhook rule Master replicas: a Master replica spec (replicas 1) is required")
    for rtype, rspec in replicas.items():
        containers = (((rspec.get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers:
            raise PyTorchJobValidationError(f"webhook rule container name: {rtype} has no containers")
        for c in containers:
            if c.get("name") != CONTAINER_NAME:
                raise PyTorchJobValidationError(
                    f"webhook rule container name: {rtype} container {c.get('name')!r} must be named "
                    f"{CONTAINER_NAME!r}"
                )
    if spec.get("elasticPolicy") is not None and "Worker" not in replicas:
        raise PyTorchJobValidationError("webhook rule elasticPolicy: elasticPolicy requires a Worker replica spec")


def validate_pytorchjob(job: Dict[str, Any], crd: Optional[Path] = None) -> None:
    """Raise PyTorchJobValidationError (naming the rule) if the CRD schema or the webhook would refuse ``job``."""
    validate_schema(job, crd)
    validate_webhook(job)


# --------------------------------------------------------------------------------------------------------- building
def _torchrun_command(role: Role, nnodes: int) -> Tuple[List[str], int]:
    """(command, nproc_per_node) for the container: torchrun with explicit --nnodes/--nproc_per_node."""
    nproc: Optional[int] = None
    rest: List[str] = []
    entry = os.path.basename(role.entrypoint)
    if entry == "torchrun" or (entry.startswith("python") and role.args[:2] == ["-m", "torch.distributed.run"]):
        args = list(role.args if entry == "torchrun" else role.args[2:])
        i = 0
        while i < len(args):
            a = args[i]
            key, eq, val = a.partition("=")
            if key in _TORCHRUN_OWN:
                if not eq and key != "--standalone":
                    val = args[i + 1] if i + 1 < len(args) else ""
                    i += 1
                if key in ("--nproc_per_node", "--nproc-per-node") and val.isdigit():
                    nproc = int(val)
                i += 1
                continue
            rest.append(a)
            i += 1
    elif entry.startswith("python"):
        rest = list(role.args)
    else:
        rest = ["--no-python", role.entrypoint, *role.args]
    if nproc is None:
        nproc = role.resource.gpu if role.resource.gpu > 0 else 1
    # rendezvous: the operator injects PET_MASTER_ADDR/PET_MASTER_PORT/PET_NODE_RANK which torchrun reads
    cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", *rest]
    return cmd, nproc


def _resources(role: Role) -> Dict[str, Dict[str, Any]]:
    res = role.resource
    limits: Dict[str, Any] = {}
    requests: Dict[str, Any] = {}
    if res.cpu > 0:
        requests["cpu"] = f"{int(res.cpu * 1000)}m"
        limits["cpu"] = f"{int(res.cpu * 1000)}m"
    if res.memMB > 0:
        requests["memory"] = f"{int(res.memMB)}M"
        limits["memory"] = f"{int(res.memMB)}M"
    if res.gpu > 0:
        requests[GPU_RESOURCE] = str(res.gpu)
        limits[GPU_RESOURCE] = str(res.gpu)
    return {"limits": limits, "requests": requests}


def _parse_tolerations(spec: Optional[str]) -> List[Dict[str, str]]:
    """``key=value:Effect,key2:Effect`` -> tolerations (Exists when no value)."""
    out: List[Dict[str, str]] = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        kv, _, effect = item.partition(":")
        key, eq, value = kv.partition("=")
        tol: Dict[str, str] = {"key": key, "operator": "Equal" if eq else "Exists"}
        if eq:
            tol["value"] = value
        if effect:
            tol["effect"] = effect
        out.append(tol)
    return out


def _parse_kv(spec: Optional[str]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        k, _, v = item.partition("=")
        out[k] = v
    return out


def app_to_pytorchjob(app: AppDef, cfg: Mapping[str, Any], suffix: Optional[str] = None) -> Dict[str, Any]:
    if len(app.roles) != 1:
        raise ValueError(f"pytorchjob supports exactly one role (a DDP/SPMD app), got {len(app.roles)}")
    role = app.roles[0]
    nnodes = max(1, int(role.num_replicas))
    name = job_name(app.name, suffix)
    values = macros.Values(img_root="", app_id=name, replica_id="$(PET_NODE_RANK)",
                           rank0_env="PET_MASTER_ADDR")
    role = values.apply(role)
    command, nproc = _torchrun_command(role, nnodes)

    # A read-only root filesystem: HOME and caches (torch.compile, matplotlib) live in the /tmp emptyDir.
    env = {**DEFAULT_NCCL_ENV, "HOME": "/tmp/home", "XDG_CACHE_HOME": "/tmp/cache", **role.env,
           "TORCHX_JOB_ID": f"pytorchjob://{cfg.get('namespace') or 'default'}:{name}"}
    container: Dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": role.image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "env": [{"name": k, "value": str(v)} for k, v in env.items()],
        "resources": _resources(role),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    for port_name, port in (role.port_map or {}).items():
        container.setdefault("ports", []).append({"name": port_name[:15].lower(), "containerPort": int(port)})
    secrets = [s for s in (cfg.get("env_secret") or "").split(",") if s]
    if secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in secrets]

    shm: Dict[str, Any] = {"medium": "Memory"}
    if cfg.get("shm_size"):
        shm["sizeLimit"] = cfg["shm_size"]
    pod_spec: Dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": shm}, {"name": "tmp", "emptyDir": {}}],
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": int(cfg.get("run_as_user") or 1000),
            "runAsGroup": int(cfg.get("run_as_user") or 1000),
            "fsGroup": int(cfg.get("run_as_user") or 1000),
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if cfg.get("service_account"):
        pod_spec["serviceAccountName"] = cfg["service_account"]
    if cfg.get("image_pull_secret"):
        pod_spec["imagePullSecrets"] = [{"name": s} for s in cfg["image_pull_secret"].split(",") if s]
    if cfg.get("node_selector"):
        pod_spec["nodeSelector"] = _parse_kv(cfg["node_selector"])
    if cfg.get("tolerations"):
        pod_spec["tolerations"] = _parse_tolerations(cfg["tolerations"])
    if cfg.get("priority_class"):
        pod_spec["priorityClassName"] = cfg["priority_class"]
    if cfg.get("gang_scheduler"):
        pod_spec["schedulerName"] = cfg["gang_scheduler"]

    labels = {
        "app.kubernetes.io/name": "clipline",
        "app.kubernetes.io/component": "train",
        "app.kubernetes.io/managed-by": "torchx",
        "torchx.pytorch.org/app-name": name,
        "torchx.pytorch.org/role-name": role.name[:63],
    }

    def replica(n: int) -> Dict[str, Any]:
        import copy

        return {
            "replicas": n,
            "restartPolicy": "OnFailure" if role.max_retries > 0 else "Never",
            "template": {"metadata": {"labels": dict(labels)}, "spec": copy.deepcopy(pod_spec)},
        }

    replica_specs: Dict[str, Any] = {"Master": replica(1)}
    if nnodes > 1:
        replica_specs["Worker"] = replica(nnodes - 1)

    run_policy: Dict[str, Any] = {
        "cleanPodPolicy": cfg.get("clean_pod_policy") or "Running",
        "ttlSecondsAfterFinished": int(cfg.get("ttl_seconds_after_finished") or 86400),
        "backoffLimit": int(cfg["backoff_limit"] if cfg.get("backoff_limit") is not None else role.max_retries),
    }
    if cfg.get("active_deadline_seconds"):
        run_policy["activeDeadlineSeconds"] = int(cfg["active_deadline_seconds"])
    if cfg.get("gang_scheduler"):
        sp: Dict[str, Any] = {"minAvailable": nnodes}
        if cfg.get("queue"):
            sp["queue"] = cfg["queue"]
        if cfg.get("priority_class"):
            sp["priorityClass"] = cfg["priority_class"]
        run_policy["schedulingPolicy"] = sp

    job: Dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "labels": dict(labels)},
        "spec": {
            "nprocPerNode": str(nproc),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }
    if cfg.get("namespace"):
        job["metadata"]["namespace"] = cfg["namespace"]
    return job


# --------------------------------------------------------------------------------------------------------- state
def state_from_status(status: Optional[Mapping[str, Any]]) -> AppState:
    """Map PyTorchJob status conditions to a torchx AppState (the latest true condition wins)."""
    conditions = [c for c in ((status or {}).get("conditions") or []) if str(c.get("status", "True")) == "True"]
    if not conditions:
        return AppState.SUBMITTED if status is not None else AppState.UNKNOWN
    types = {c.get("type") for c in conditions}
    # terminal conditions win; otherwise the latest true condition (the operator appends in order)
    ctype = "Failed" if "Failed" in types else "Succeeded" if "Succeeded" in types else conditions[-1].get("type")
    return {
        "Created": AppState.SUBMITTED,
        "Running": AppState.RUNNING,
        "Restarting": AppState.PENDING,
        "Succeeded": AppState.SUCCEEDED,
        "Failed": AppState.FAILED,
        "Suspended": AppState.PENDING,
    }.get(ctype, AppState.UNKNOWN)


@dataclass
class PyTorchJobRequest:
    namespace: str
    resource: Dict[str, Any]

    def __str__(self) -> str:
        return yaml.safe_dump(self.resource, sort_keys=False)

    def __repr__(self) -> str:
        return str(self)


def _split_app_id(app_id: str) -> Tuple[str, str]:
    namespace, _, name = app_id.rpartition(":")
    return namespace or "default", name


class PyTorchJobScheduler(Scheduler[Dict[str, Any]]):
    """Submits a single-role torchx AppDef as a Kubeflow PyTorchJob. app_id is ``namespace:name``."""

    def __init__(self, session_name: str, client: Optional[Any] = None) -> None:
        super().__init__("pytorchjob", session_name)
        self._client = client

    # -- kubernetes client, lazily
    def _api_client(self) -> Any:
        if self._client is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self._client = client.ApiClient()
        return self._client

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api_client())

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api_client())

    # -- torchx API
    def _run_opts(self) -> runopts:
        opts = runopts()
        opts.add("namespace", type_=str, default="default", help="Kubernetes namespace")
        opts.add("service_account", type_=str, default=None, help="service account of the pods")
        opts.add("image_pull_secret", type_=str, default=None, help="image pull secret name(s), comma separated")
        opts.add("env_secret", type_=str, default=None,
                 help="Secret name(s) whose keys become env vars (envFrom secretRef), e.g. store credentials")
        opts.add("node_selector", type_=str, default=None, help="node selector, k1=v1,k2=v2")
        opts.add("tolerations", type_=str, default=None, help="tolerations, key=value:Effect,key:Effect")
        opts.add("priority_class", type_=str, default=None, help="PriorityClass name")
        opts.add("gang_scheduler", type_=str, default=None,
                 help="gang scheduler name (e.g. volcano, scheduler-plugins-scheduler): sets schedulerName and "
                      "runPolicy.schedulingPolicy")
        opts.add("queue", type_=str, default=None, help="gang-scheduling queue (with gang_scheduler)")
        opts.add("clean_pod_policy", type_=str, default="Running", help="runPolicy.cleanPodPolicy: None|Running|All")
        opts.add("ttl_seconds_after_finished", type_=int, default=86400, help="runPolicy.ttlSecondsAfterFinished")
        opts.add("backoff_limit", type_=int, default=None, help="runPolicy.backoffLimit (default: role max_retries)")
        opts.add("active_deadline_seconds", type_=int, default=None, help="runPolicy.activeDeadlineSeconds")
        opts.add("shm_size", type_=str, default=None, help="sizeLimit of the /dev/shm emptyDir (e.g. 16Gi)")
        opts.add("run_as_user", type_=int, default=1000, help="pod securityContext.runAsUser (non-root)")
        return opts

    def _submit_dryrun(self, app: AppDef, cfg: Dict[str, Any]) -> AppDryRunInfo:
        job = app_to_pytorchjob(app, cfg)
        validate_pytorchjob(job)
        req = PyTorchJobRequest(namespace=cfg.get("namespace") or "default", resource=job)
        return AppDryRunInfo(req, str)

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        req: PyTorchJobRequest = dryrun_info.request
        resp = self._custom().create_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=req.namespace, plural=PLURAL, body=req.resource
        )
        return f"{req.namespace}:{resp['metadata']['name']}"

    def _validate(self, app: AppDef, scheduler: str) -> None:
        super()._validate(app, scheduler)
        if len(app.roles) != 1:
            raise ValueError(f"pytorchjob supports exactly one role, got {len(app.roles)}")

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        namespace, name = _split_app_id(app_id)
        from kubernetes.client.rest import ApiException

        try:
            job = self._custom().get_namespaced_custom_object_status(
                group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=name
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return describe_from_job(app_id, job)

    def _cancel_existing(self, app_id: str) -> None:
        namespace, name = _split_app_id(app_id)
        self._custom().delete_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL, name=name
        )

    def list(self) -> List[ListAppResponse]:
        namespace = "default"
        resp = self._custom().list_namespaced_custom_object(
            group=GROUP, version=VERSION, namespace=namespace, plural=PLURAL
        )
        return [
            ListAppResponse(app_id=f"{namespace}:{item['metadata']['name']}",
                            state=state_from_status(item.get("status")))
            for item in resp.get("items", [])
        ]

    def log_iter(
        self,
        app_id: str,
        role_name: str,
        k: int = 0,
        regex: Optional[str] = None,
        since: Optional[datetime] = None,
        until: Optional[datetime] = None,
        should_tail: bool = False,
        streams: Optional[Stream] = None,
    ) -> Iterable[str]:
        """Logs of replica k: 0 is the Master pod, k >= 1 is Worker k-1 (pods are named <job>-master-0 ...)."""
        if streams not in (None, Stream.COMBINED):
            raise ValueError("pytorchjob only supports the combined log stream")
        namespace, name = _split_app_id(app_id)
        pod = f"{name}-master-0" if k == 0 else f"{name}-worker-{k - 1}"
        args: Dict[str, Any] = {"name": pod, "namespace": namespace, "timestamps": False,
                                "container": CONTAINER_NAME}
        if since is not None:
            args["since_seconds"] = max(1, int((datetime.now() - since).total_seconds()))
        core = self._core()
        if should_tail:
            from kubernetes import watch

            iterator: Iterable[str] = watch.Watch().stream(core.read_namespaced_pod_log, follow=True, **args)
        else:
            iterator = split_lines(core.read_namespaced_pod_log(**args))
        return filter_regex(regex, iterator) if regex else iterator


def describe_from_job(app_id: str, job: Mapping[str, Any]) -> DescribeAppResponse:
    status = job.get("status") or {}
    state = state_from_status(status)
    conditions = status.get("conditions") or []
    msg = conditions[-1].get("message", "") if conditions else ""
    roles_statuses = []
    for rtype, rs in (status.get("replicaStatuses") or {}).items():
        replicas = []
        for i in range(int(rs.get("failed", 0))):
            replicas.append(ReplicaStatus(id=len(replicas), state=AppState.FAILED, role=rtype, hostname=""))
        for i in range(int(rs.get("succeeded", 0))):
            replicas.append(ReplicaStatus(id=len(replicas), state=AppState.SUCCEEDED, role=rtype, hostname=""))
        for i in range(int(rs.get("active", 0))):
            replicas.append(ReplicaStatus(id=len(replicas), state=AppState.RUNNING, role=rtype, hostname=""))
        roles_statuses.append(RoleStatus(role=rtype, replicas=replicas))
    restarts = sum(1 for c in conditions if c.get("type") == "Restarting")
    return DescribeAppResponse(app_id=app_id, state=state, msg=msg, num_restarts=restarts,
                               roles_statuses=roles_statuses)


def create_scheduler(session_name: str, client: Optional[Any] = None, **kwargs: Any) -> PyTorchJobScheduler:
    return PyTorchJobScheduler(session_name=session_name, client=client)
