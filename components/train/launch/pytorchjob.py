"""A JobSpec as a Kubeflow training-operator v1 PyTorchJob (kubeflow.org/v1, training-operator v1.8/v1.9).

Legacy target (``launcher=pytorchjob``, torchx scheduler ``pytorchjob``): Kubeflow manifests v1.11 install Trainer v2
instead, but many clusters still run the operator. What the operator does with the job (training-operator@v1.9.0):
- injects MASTER_ADDR/MASTER_PORT, PET_MASTER_ADDR/PET_MASTER_PORT (the master pod's headless Service,
  ``<job>-master-0``, port 23456 from the defaulter), PET_NODE_RANK, PET_NNODES and, with ``nprocPerNode`` set,
  PET_NPROC_PER_NODE and WORLD_SIZE = replicas x nprocPerNode (pkg/controller.v1/pytorch/envvar.go, master.go);
- restarts: a replica's ``OnFailure`` restarts its container in place, and the job fails once the restarts summed
  over running pods reach ``runPolicy.backoffLimit`` (pkg/core/job.go). torchrun's ``--max-restarts`` restarts
  every node's ranks together through c10d rendezvous first; only when a node's torchrun gives up does its
  container restart, so the limit is nodes x restarts.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

from torchx.specs import AppState

from components.train.launch import pod
from components.train.launch.jobspec import DNS_1035, JobSpec
from components.train.launch.kube import Target

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the trainer container by this name
TTL_AFTER_FINISHED_S = 86400


def build(spec: JobSpec, options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:  # noqa: ARG001
    """``options``: none apply to a PyTorchJob (a TrainJob takes its runtime there; Target.build's signature)."""
    container = {
        "name": CONTAINER, "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "command": spec.torchrun(), "env": spec.container_env(), "resources": pod.resources(spec),
        "volumeMounts": pod.volume_mounts(), "securityContext": pod.container_security(),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container], "volumes": pod.volumes(spec), "securityContext": pod.pod_security(spec),
        "automountServiceAccountToken": False, **pod.placement(spec),
    }
    if spec.priority_class:
        pod_spec["priorityClassName"] = spec.priority_class
    if spec.gang_scheduler:
        pod_spec["schedulerName"] = spec.gang_scheduler

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure" if spec.max_restarts else "Never",
                "template": {"metadata": pod.metadata(spec), "spec": copy.deepcopy(pod_spec)}}

    replicas = {"Master": replica(1)}
    if spec.nnodes > 1:
        replicas["Worker"] = replica(spec.nnodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
                                  "backoffLimit": spec.nnodes * spec.max_restarts}
    if spec.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = spec.active_deadline_s
    if spec.gang_scheduler:
        policy = {"minAvailable": spec.nnodes}
        if spec.queue:
            policy["queue"] = spec.queue
        if spec.priority_class:
            policy["priorityClass"] = spec.priority_class
        run_policy["schedulingPolicy"] = policy
    metadata: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": dict(spec.labels)}
    if spec.owner:
        metadata["ownerReferences"] = [dict(spec.owner)]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata,
            "spec": {"nprocPerNode": str(spec.nproc_per_node), "runPolicy": run_policy,
                     "pytorchReplicaSpecs": replicas}}


def webhook_rules(job: Mapping[str, Any]) -> list[str]:
    """training-operator@v1.9.0 pkg/webhooks/pytorch/pytorchjob_webhook.go (validatePyTorchJob): a DNS-1035 name,
    a Master of exactly one replica, every replica's container named ``pytorch``, elasticPolicy only with Workers
    and not together with a top-level nprocPerNode in elasticPolicy."""
    problems = []
    name = (job.get("metadata") or {}).get("name") or ""
    if len(name) > 63 or not DNS_1035.match(name):
        problems.append(f"DNS-1035 name: {name!r} must be at most 63 characters matching [a-z]([-a-z0-9]*[a-z0-9])?")
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "Master" not in replicas:
        problems.append("Master replicas: a Master replica spec (replicas 1) is required")
    elif replicas["Master"].get("replicas", 1) != 1:
        problems.append(f"Master replicas: must be exactly 1, got {replicas['Master'].get('replicas')}")
    for rtype, rspec in replicas.items():
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == CONTAINER for c in containers):
            problems.append(f"container name: {rtype} needs a container named {CONTAINER!r}, has "
                            f"{[c.get('name') for c in containers]}")
    elastic = spec.get("elasticPolicy")
    if elastic is not None and "Worker" not in replicas:
        problems.append("elasticPolicy: elasticPolicy requires a Worker replica spec")
    if elastic is not None and elastic.get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
        problems.append("elasticPolicy: nProcPerNode must not be set with spec.nprocPerNode")
    return problems


def state(status: Optional[Mapping[str, Any]]) -> AppState:
    """The latest true condition; terminal ones win (the operator appends Created, Running, Restarting, ...)."""
    conditions = [c for c in ((status or {}).get("conditions") or []) if str(c.get("status", "True")) == "True"]
    if not conditions:
        return AppState.SUBMITTED if status is not None else AppState.UNKNOWN
    types = {c.get("type") for c in conditions}
    ctype = "Failed" if "Failed" in types else "Succeeded" if "Succeeded" in types else conditions[-1].get("type")
    return {"Created": AppState.SUBMITTED, "Running": AppState.RUNNING, "Restarting": AppState.PENDING,
            "Succeeded": AppState.SUCCEEDED, "Failed": AppState.FAILED,
            "Suspended": AppState.PENDING}.get(ctype, AppState.UNKNOWN)


def pod_selector(name: str, rank: int) -> str:
    """Node rank 0 is the Master, rank k the Worker of index k-1. Labels of training-operator@v1.9.0
    (pkg/controller.v1/common/pod.go): job-name, replica-type in lower case, replica-index."""
    rtype, index = ("master", 0) if rank == 0 else ("worker", rank - 1)
    return f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type={rtype}," \
           f"training.kubeflow.org/replica-index={index}"


TARGET = Target(name="pytorchjob", group=GROUP, version=VERSION, plural=PLURAL, kind=KIND, container=CONTAINER,
                build=build, state=state, pod_selector=pod_selector, resubmit=False)
