"""torchx schedulers ``trainjob`` (Kubeflow Trainer v2, the default) and ``pytorchjob`` (training-operator v1).

Registered through the ``torchx.schedulers`` entry-point group (pyproject.toml), so both our component and torchx's
stock ones run on a cluster:
    torchx run -s trainjob -cfg namespace=team-a components/train/launch/component.py:train --recipe ... --nnodes 2
    torchx run -s pytorchjob dist.ddp -j 2x2 --gpu 2 --script train.py
torchx's built-in ``kubernetes`` scheduler targets Volcano, not Kubeflow. The AppDef becomes a ``JobSpec``
(jobspec.from_app: the app's own torchrun is unwrapped, its process count kept) and then the target's object,
validated before anything is sent. app_id is ``<namespace>:<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Optional

import yaml
from torchx.schedulers.api import DescribeAppResponse, ListAppResponse, Scheduler, Stream, filter_regex
from torchx.specs import AppDef, AppDryRunInfo, AppState, ReplicaStatus, RoleStatus, runopts

from components.train.launch import pytorchjob, trainjob
from components.train.launch.jobspec import STORE_CONFIG, STORE_SECRET, TRAINER_SERVICE_ACCOUNT, from_app
from components.train.launch.kube import KubeApi, Target
from components.train.launch.validation import validate_object


@dataclass
class JobRequest:
    namespace: str
    resource: dict[str, Any]

    def __str__(self) -> str:
        return yaml.safe_dump(self.resource, sort_keys=False)


def split_app_id(app_id: str) -> tuple[str, str]:
    namespace, _, name = app_id.rpartition(":")
    return namespace or "default", name


def run_options(target: Target) -> runopts:
    opts = runopts()
    opts.add("namespace", type_=str, default=None,
             help="namespace of the job (default: this pod's namespace in a cluster, else 'default')")
    if target is trainjob.TARGET:
        opts.add("runtime", type_=str, default=trainjob.DEFAULT_RUNTIME,
                 help=f"ClusterTrainingRuntime to run on ({trainjob.DEFAULT_RUNTIME} from manifests/, or the stock "
                      f"{trainjob.STOCK_RUNTIME})")
    else:
        opts.add("gang_scheduler", type_=str, default=None,
                 help="gang scheduler (volcano, scheduler-plugins-scheduler): schedulerName + schedulingPolicy")
    opts.add("queue", type_=str, default=None,
             help="queue: Kueue LocalQueue (TrainJob, gang admission) or the gang scheduler's queue (PyTorchJob)")
    opts.add("priority_class", type_=str, default=None,
             help="PriorityClass (PyTorchJob) or Kueue WorkloadPriorityClass (TrainJob, needs queue)")
    opts.add("service_account", type_=str, default=TRAINER_SERVICE_ACCOUNT, help="service account of the pods")
    opts.add("image_pull_secret", type_=str, default=None, help="image pull secret name(s), comma separated")
    opts.add("store_secret", type_=str, default=STORE_SECRET,
             help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the object store ('' for none)")
    opts.add("store_config", type_=str, default=STORE_CONFIG,
             help="ConfigMap with AWS_ENDPOINT_URL (and AWS_REGION) of the object store ('' for none)")
    opts.add("node_selector", type_=str, default=None, help="node selector, k1=v1,k2=v2")
    opts.add("tolerations", type_=str, default=None, help="tolerations, key=value:Effect,key:Effect")
    opts.add("cpu", type_=str, default=None, help="CPU per pod (default: 6 per GPU, or the role's CPUs)")
    opts.add("memory", type_=str, default=None, help="memory per pod (default: 48Gi per GPU, or the role's)")
    opts.add("shm_size", type_=str, default=None, help="/dev/shm size per pod (default: 8Gi per GPU, 1Gi per CPU rank)")
    opts.add("ephemeral_storage", type_=str, default=None, help="ephemeral storage per pod (default: 50Gi)")
    opts.add("nccl_env", type_=str, default=None, help="extra env, e.g. NCCL_SOCKET_IFNAME=eth0,NCCL_IB_HCA=mlx5")
    opts.add("active_deadline_seconds", type_=int, default=None, help="the job's activeDeadlineSeconds")
    opts.add("run_as_user", type_=int, default=1000, help="uid/gid of the pods (non-root)")
    return opts


class JobScheduler(Scheduler[dict]):
    """Submits a single-role torchx AppDef as a ``target`` job."""

    def __init__(self, target: Target, session_name: str, api: Optional[KubeApi] = None) -> None:
        super().__init__(target.name, session_name)
        self.target = target
        self.api = api or KubeApi()

    def _run_opts(self) -> runopts:
        return run_options(self.target)

    def _submit_dryrun(self, app: AppDef, cfg: dict[str, Any]) -> AppDryRunInfo:
        spec = from_app(app, {**cfg, "_scheme": self.target.name})
        job = self.target.build(spec, cfg)
        validate_object(job)
        return AppDryRunInfo(JobRequest(namespace=spec.namespace, resource=job), str)

    def schedule(self, dryrun_info: AppDryRunInfo) -> str:
        req: JobRequest = dryrun_info.request
        created = self.api.create(self.target, req.namespace, req.resource)
        return f"{req.namespace}:{created['metadata']['name']}"

    def _validate(self, app: AppDef, scheduler: str) -> None:
        super()._validate(app, scheduler)
        if len(app.roles) != 1:
            raise ValueError(f"{self.target.name} runs exactly one role, got {len(app.roles)}")

    def describe(self, app_id: str) -> Optional[DescribeAppResponse]:
        namespace, name = split_app_id(app_id)
        status = self.api.status(self.target, namespace, name)
        if status is None:
            return None
        conditions = status.get("conditions") or []
        replicas = [ReplicaStatus(id=i, state=state, role=str(j.get("name", "")), hostname="")
                    for j in _replica_counts(status)
                    for i, state in enumerate([AppState.RUNNING] * j["active"] + [AppState.SUCCEEDED] * j["succeeded"]
                                              + [AppState.FAILED] * j["failed"])]
        return DescribeAppResponse(
            app_id=app_id, state=self.target.state(status),
            msg=(conditions[-1].get("message") or "") if conditions else "",
            num_restarts=sum(1 for c in conditions if c.get("type") == "Restarting"),
            roles_statuses=[RoleStatus(role="trainer", replicas=replicas)])

    def _cancel_existing(self, app_id: str) -> None:
        self.api.delete(self.target, *split_app_id(app_id))

    def list(self) -> list[ListAppResponse]:
        from components.train.launch.jobspec import current_namespace

        namespace = current_namespace()
        return [ListAppResponse(app_id=f"{namespace}:{item['metadata']['name']}",
                                state=self.target.state(item.get("status") or {}))
                for item in self.api.list(self.target, namespace)]

    def log_iter(self, app_id: str, role_name: str, k: int = 0, regex: Optional[str] = None,
                 since: Optional[datetime] = None, until: Optional[datetime] = None, should_tail: bool = False,
                 streams: Optional[Stream] = None) -> Iterable[str]:
        """Logs of node rank ``k`` (its newest pod)."""
        if streams not in (None, Stream.COMBINED):
            raise ValueError(f"{self.target.name} only supports the combined log stream")
        namespace, name = split_app_id(app_id)
        pods = sorted(self.api.pods(namespace, self.target.pod_selector(name, k)),
                      key=lambda p: p["metadata"].get("creationTimestamp") or "")
        if not pods:
            raise ValueError(f"no pod of node {k} for {app_id} yet")
        since_s = max(1, int((datetime.now() - since).total_seconds())) if since else None
        lines = (line.partition(" ")[2] + "\n" for line in self.api.log_lines(
            namespace, pods[-1]["metadata"]["name"], self.target.container, follow=should_tail,
            since_seconds=since_s))
        return filter_regex(regex, lines) if regex else lines


def _replica_counts(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Per replicated job / replica type: active, succeeded, failed pod counts (TrainJob jobsStatus or PyTorchJob
    replicaStatuses)."""
    if "jobsStatus" in status:
        rows = [{"name": j.get("name"), **{k: int(j.get(k) or 0) for k in ("active", "succeeded", "failed")}}
                for j in status.get("jobsStatus") or []]
    else:
        rows = [{"name": rtype, **{k: int(rs.get(k) or 0) for k in ("active", "succeeded", "failed")}}
                for rtype, rs in (status.get("replicaStatuses") or {}).items()]
    return rows


def create_trainjob_scheduler(session_name: str, **kwargs: Any) -> JobScheduler:
    return JobScheduler(trainjob.TARGET, session_name, api=kwargs.get("api"))


def create_pytorchjob_scheduler(session_name: str, **kwargs: Any) -> JobScheduler:
    return JobScheduler(pytorchjob.TARGET, session_name, api=kwargs.get("api"))


TARGETS = {t.name: t for t in (trainjob.TARGET, pytorchjob.TARGET)}
