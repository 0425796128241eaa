"""One description of a distributed training job, whichever operator runs it.

``JobSpec`` holds what a cluster job needs (image, nodes, processes per node, GPUs, per-pod resources, environment,
store Secret/ConfigMap, placement, priority, gang scheduling, deadline, restarts, owner). ``trainjob.py`` renders it
as a Kubeflow Trainer v2 TrainJob and ``pytorchjob.py`` as a training-operator v1 PyTorchJob; ``pod.py`` holds the
pod pieces both share. ``from_app`` turns a torchx AppDef (our component or torchx's stock ``dist.ddp``) into a
JobSpec, unwrapping the torchrun the app already carries so the container never runs torchrun inside torchrun.
"""

from __future__ import annotations

import os
import re
import shlex
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

DEFAULT_IMAGE = "registry.example.com/clipline/clipline:0.1.0"
TRAINER_SERVICE_ACCOUNT = "clipline-trainer"  # bound to nothing; pods get no API token (pod.py)
STORE_SECRET = "clipline-store-credentials"
STORE_CONFIG = "clipline-store"
# The in-cluster namespace of this pod's service account (kubelet mounts it with the token).
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SUFFIX_LEN = 6
# Generated names leave room for the pods' suffixes ("-worker-NNN", "-node-0-NNN-xxxxx") within a 63-char label.
GENERATED_NAME_MAX = 40

# torchrun flags that the launch code owns: the rendezvous and the shape come from the JobSpec, never from the app.
_TORCHRUN_OWN_WITH_VALUE = {"--nnodes", "--nproc_per_node", "--nproc-per-node", "--rdzv_backend", "--rdzv-backend",
                            "--rdzv_endpoint", "--rdzv-endpoint", "--rdzv_id", "--rdzv-id", "--node_rank",
                            "--node-rank", "--master_addr", "--master-addr", "--master_port", "--master-port",
                            "--max_restarts", "--max-restarts", "--rdzv_conf", "--rdzv-conf"}
_TORCHRUN_OWN_FLAGS = {"--standalone"}
_SHELL_OPERATORS = {";", "&&", "||", "|", "&", ">", "<", ">>"}

# NCCL defaults: errors surface as exceptions instead of hangs. No interface is forced (NCCL_SOCKET_IFNAME differs
# per cluster: set it with nccl_env when the default route is not the fabric).
DEFAULT_NCCL_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


class JobSpecError(ValueError):
    """A job description that cannot be turned into a cluster job; the message names the field."""


@dataclass(frozen=True)
class PodResources:
    """Per training pod (one node). Kubernetes quantities; requests equal limits (Guaranteed QoS on GPU nodes)."""

    cpu: str
    memory: str
    shm: str  # sizeLimit of the memory-backed /dev/shm (DataLoader workers); counts against ``memory``
    ephemeral: str  # ephemeral-storage request/limit: /tmp (compile caches, HOME) lives there
    gpus: int = 0

    def requests(self, gpu_resource: str = "nvidia.com/gpu") -> dict[str, str]:
        out = {"cpu": self.cpu, "memory": self.memory, "ephemeral-storage": self.ephemeral}
        if self.gpus:
            out[gpu_resource] = str(self.gpus)
        return out


# Sizing defaults, not measurements: per GPU, a share of a typical 8-GPU node (48 cores, 384 GiB, 64 GiB /dev/shm
# for the loader workers' prefetched batches); per process on a CPU node, what the CPU recipes use. Override them
# (cpu/memory/shm_size) to fit your nodes.
PER_GPU = {"cpu": 6, "memory_gi": 48, "shm_gi": 8}
PER_CPU_PROCESS = {"cpu": 2, "memory_gi": 4, "shm_gi": 1}
EPHEMERAL_GI = 50


def derived_resources(gpus_per_node: int, nproc_per_node: int, *, cpu: str = "", memory: str = "", shm: str = "",
                      ephemeral: str = "") -> PodResources:
    """Per-pod resources from the GPU count (or, without GPUs, the process count); any given value wins."""
    per, n = (PER_GPU, gpus_per_node) if gpus_per_node > 0 else (PER_CPU_PROCESS, max(1, nproc_per_node))
    res = PodResources(cpu=cpu or str(per["cpu"] * n), memory=memory or f"{per['memory_gi'] * n}Gi",
                       shm=shm or f"{per['shm_gi'] * n}Gi", ephemeral=ephemeral or f"{EPHEMERAL_GI}Gi",
                       gpus=max(0, gpus_per_node))
    for name in ("cpu", "memory", "shm", "ephemeral"):
        _check_quantity(name, getattr(res, name))
    return res


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def _check_quantity(name: str, value: str) -> None:
    if not _QUANTITY.match(value):
        raise JobSpecError(f"{name}: {value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")


@dataclass(frozen=True)
class JobSpec:
    name: str
    namespace: str
    image: str
    program: tuple[str, ...]  # torchrun pass-through flags, then the program and its arguments
    nnodes: int
    nproc_per_node: int
    resources: PodResources
    env: Mapping[str, str] = field(default_factory=dict)
    store_secret: str = STORE_SECRET  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    store_config: str = STORE_CONFIG  # AWS_ENDPOINT_URL / AWS_REGION
    service_account: str = TRAINER_SERVICE_ACCOUNT
    image_pull_secrets: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, str], ...] = ()
    priority_class: str = ""
    queue: str = ""
    gang_scheduler: str = ""
    active_deadline_s: Optional[int] = None
    max_restarts: int = 0  # torchrun restarts of all ranks (each resumes from the latest checkpoint)
    owner: Optional[Mapping[str, Any]] = None  # ownerReference (the KFP step's pod)
    labels: Mapping[str, str] = field(default_factory=dict)
    run_as_user: int = 1000

    def __post_init__(self) -> None:
        if not DNS_1035.match(self.name) or len(self.name) > 63:
            raise JobSpecError(f"name: {self.name!r} must be a DNS-1035 label of at most 63 characters")
        for key in ("nnodes", "nproc_per_node"):
            if getattr(self, key) < 1:
                raise JobSpecError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.resources.gpus and self.nproc_per_node > self.resources.gpus:
            raise JobSpecError(f"nproc_per_node {self.nproc_per_node} exceeds the {self.resources.gpus} GPUs per "
                               f"node: every rank needs its own GPU")
        if self.max_restarts < 0:
            raise JobSpecError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if not self.program:
            raise JobSpecError("program: nothing to run")

    def with_name(self, name: str) -> "JobSpec":
        return replace(self, name=name)

    def torchrun(self, master_addr_env: str = "PET_MASTER_ADDR", master_port_env: str = "PET_MASTER_PORT") -> list[str]:
        """The container command on every node. Both operators inject the master's address and port; c10d
        rendezvous over them lets ``--max-restarts`` restart every node's ranks together after a failure (static
        rendezvous cannot: the other nodes would wait out the collective timeout). Kubernetes expands $(VAR)
        from the container's environment, which the operators fill before the pod is created."""
        return ["torchrun", f"--nnodes={self.nnodes}", f"--nproc_per_node={self.nproc_per_node}",
                f"--max-restarts={self.max_restarts}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=$({master_addr_env}):$({master_port_env})", f"--rdzv_id={self.name}",
                *self.program]

    def container_env(self) -> list[dict[str, Any]]:
        """Plain values, then the store endpoint (ConfigMap) and credentials (Secret) by reference: credentials
        never appear in the job object."""
        env = {**DEFAULT_NCCL_ENV, "HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/cache", "PYTHONUNBUFFERED": "1",
               **self.env}
        out: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in env.items()]
        if self.store_config:
            for key, optional in (("AWS_ENDPOINT_URL", False), ("AWS_REGION", True)):
                if key not in env:
                    out.append({"name": key, "valueFrom": {"configMapKeyRef": {
                        "name": self.store_config, "key": key, "optional": optional}}})
        if self.store_secret:
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                out.append({"name": key, "valueFrom": {"secretKeyRef": {"name": self.store_secret, "key": key}}})
        return out


# ------------------------------------------------------------------------------------------------------- helpers
def job_name(app_name: str, suffix: Optional[str] = None) -> str:
    """A DNS-1035 label from the app name plus a short unique suffix."""
    suffix = suffix if suffix is not None else uuid.uuid4().hex[:SUFFIX_LEN]
    base = re.sub(r"[^a-z0-9-]+", "-", app_name.lower()).strip("-")
    base = re.sub(r"-{2,}", "-", base).lstrip("0123456789-") or "job"
    base = base[: GENERATED_NAME_MAX - len(suffix) - 1].rstrip("-")
    return f"{base}-{suffix}"


def parse_kv(spec: str, what: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` -> dict; an item without ``=`` is an error naming ``what``."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise JobSpecError(f"{what}: {item!r} is not KEY=VALUE")
        out[key] = value
    return out


_EFFECTS = {"NoSchedule", "PreferNoSchedule", "NoExecute"}


def parse_tolerations(spec: str) -> tuple[dict[str, str], ...]:
    """``key=value:Effect,key:Effect`` -> tolerations (operator Exists when no value, any effect when none)."""
    out = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        kv, _, effect = item.partition(":")
        key, eq, value = kv.partition("=")
        if not key or (effect and effect not in _EFFECTS):
            raise JobSpecError(f"tolerations: {item!r} must be key[=value][:{'|'.join(sorted(_EFFECTS))}]")
        tol = {"key": key, "operator": "Equal" if eq else "Exists"}
        if eq:
            tol["value"] = value
        if effect:
            tol["effect"] = effect
        out.append(tol)
    return tuple(out)


def current_namespace(default: str = "default") -> str:
    """The namespace this process runs in: POD_NAMESPACE (downward API), else the service account's namespace file,
    else ``default``. KFP runs a step in the run's namespace (standalone: KFP's own; multi-user: the profile's), so
    jobs default to where the step is, where its Role and the store Secret/ConfigMap are."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def owner_from_env(namespace: str) -> Optional[dict[str, Any]]:
    """An ownerReference to this pod (POD_NAME/POD_UID from the downward API) when the job lives in its namespace:
    deleting the step's pod (run stopped, pod evicted and collected) then garbage-collects the job. Owners must be
    in the same namespace. No blockOwnerDeletion: setting it needs update on pods/finalizers (the
    OwnerReferencesPermissionEnforcement admission plugin), a right the launcher's Role does not grant."""
    name, uid, ns = os.environ.get("POD_NAME"), os.environ.get("POD_UID"), os.environ.get("POD_NAMESPACE")
    if not (name and uid and ns == namespace):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


# ------------------------------------------------------------------------------------------------------- torchx
def unwrap_torchrun(entrypoint: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(program, the app's own values of the torchrun flags we own: nnodes, nproc_per_node, max_restarts, ...) from a
    torchx role's command.

    Handles ``torchrun ARGS``, ``python -m torch.distributed.run ARGS`` and torchx's ``dist.ddp`` shape,
    ``bash -c "torchrun ... script.py ..."``: the launch code's own torchrun replaces the app's, keeping the app's
    pass-through flags (e.g. ``--tee``) and its program. Anything else is run by torchrun as the program."""
    entry = os.path.basename(entrypoint)
    if entry in ("bash", "sh") and len(args) == 2 and args[0] == "-c":
        words = shlex.split(args[1])
        if words and os.path.basename(words[0]) == "torchrun":
            bad = sorted(set(words) & _SHELL_OPERATORS)
            if bad:
                raise JobSpecError(f"the app's shell command holds {bad}: only a single torchrun command can be "
                                   f"run under the cluster's torchrun; put the rest in a script")
            return _torchrun_args(words[1:])
    if entry == "torchrun":
        return _torchrun_args(list(args))
    if entry.startswith("python") and args[:2] == ["-m", "torch.distributed.run"]:
        return _torchrun_args(list(args[2:]))
    if entry.startswith("python"):
        return list(args), {}
    return ["--no-python", entrypoint, *args], {}


def _torchrun_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    program: list[str] = []
    owned: dict[str, str] = {}
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if not key.startswith("-") or key == "-m":  # the program starts here: the rest is its own
            program.extend(args[i:])
            break
        if key in _TORCHRUN_OWN_FLAGS:
            i += 1
            continue
        if key in _TORCHRUN_OWN_WITH_VALUE:
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 1
            owned[key.lstrip("-").replace("-", "_")] = value
            i += 1
            continue
        program.append(args[i])  # a pass-through flag (--tee 3, --role x, --log-dir ...) with its value
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-") and key not in _NO_VALUE_FLAGS:
            program.append(args[i + 1])
            i += 1
        i += 1
    return program, owned


# torchrun flags that take no value (so the next word is not swallowed as theirs)
_NO_VALUE_FLAGS = {"--no-python", "--no_python", "--run-path", "--run_path", "--module", "-m",
                   "--virtual-local-rank", "--virtual_local_rank"}


def from_app(app: Any, cfg: Mapping[str, Any], *, suffix: Optional[str] = None) -> JobSpec:
    """A JobSpec from a single-role torchx AppDef and the scheduler's run options (see ``scheduler.run_options``)."""
    from torchx.specs import macros

    if len(app.roles) != 1:
        raise JobSpecError(f"a cluster job runs exactly one role (a DDP/SPMD app), got {len(app.roles)}")
    role = app.roles[0]
    nnodes = max(1, int(role.num_replicas))
    if role.min_replicas is not None and role.min_replicas != nnodes:
        raise JobSpecError(f"elastic node counts ({role.min_replicas}:{nnodes}) are not supported: Trainer v2 has no "
                           f"elastic policy; give a fixed count (-j {nnodes}xN)")
    name = job_name(app.name, suffix)
    values = macros.Values(img_root="", app_id=name, replica_id="$(PET_NODE_RANK)", rank0_env="PET_MASTER_ADDR")
    role = values.apply(role)
    program, owned = unwrap_torchrun(role.entrypoint, list(role.args))
    if owned.get("nnodes", str(nnodes)) != str(nnodes):
        raise JobSpecError(f"the app's torchrun says --nnodes {owned['nnodes']} but the role has {nnodes} replicas")
    gpus = max(0, int(role.resource.gpu))
    nproc_flag = owned.get("nproc_per_node", "")
    if nproc_flag and not nproc_flag.isdigit():
        raise JobSpecError(f"--nproc_per_node {nproc_flag!r}: give a number of processes per node")
    nproc = int(nproc_flag) if nproc_flag else (gpus if gpus > 0 else 1)
    restarts = owned.get("max_restarts", "")
    max_restarts = max(int(role.max_retries), int(restarts) if restarts.isdigit() else 0)
    namespace = cfg.get("namespace") or current_namespace()
    cpu_default = "" if gpus else (str(int(role.resource.cpu)) if role.resource.cpu > 0 else "")
    mem_default = "" if gpus else (f"{int(role.resource.memMB)}Mi" if role.resource.memMB > 0 else "")
    resources = derived_resources(gpus, nproc, cpu=cfg.get("cpu") or cpu_default,
                                  memory=cfg.get("memory") or mem_default, shm=cfg.get("shm_size") or "",
                                  ephemeral=cfg.get("ephemeral_storage") or "")
    env = {**role.env, **parse_kv(cfg.get("nccl_env") or "", "nccl_env"),
           "TORCHX_JOB_ID": f"{cfg.get('_scheme', 'job')}://{namespace}:{name}"}
    deadline = cfg.get("active_deadline_seconds")
    return JobSpec(
        name=name, namespace=namespace, image=role.image, program=tuple(program), nnodes=nnodes,
        nproc_per_node=nproc, resources=resources, env=env,
        store_secret=cfg.get("store_secret", STORE_SECRET) or "",
        store_config=cfg.get("store_config", STORE_CONFIG) or "",
        service_account=cfg.get("service_account") or TRAINER_SERVICE_ACCOUNT,
        image_pull_secrets=tuple(s for s in (cfg.get("image_pull_secret") or "").split(",") if s),
        node_selector=parse_kv(cfg.get("node_selector") or "", "node_selector"),
        tolerations=parse_tolerations(cfg.get("tolerations") or ""), priority_class=cfg.get("priority_class") or "",
        queue=cfg.get("queue") or "", gang_scheduler=cfg.get("gang_scheduler") or "",
        active_deadline_s=int(deadline) if deadline else None, max_restarts=max_restarts,
        owner=cfg.get("owner"), labels={"app.kubernetes.io/name": "clipline", "app.kubernetes.io/component": "train",
                                        "app.kubernetes.io/managed-by": "torchx", "torchx.pytorch.org/app-name": name,
                                        "torchx.pytorch.org/role-name": role.name[:63]},
        run_as_user=int(cfg.get("run_as_user") or 1000))
