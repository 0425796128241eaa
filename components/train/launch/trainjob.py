"""A JobSpec as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.3.0): the default target.

The TrainJob names a runtime (our ClusterTrainingRuntime ``clipline-torch`` from manifests/, or the stock
``torch-distributed``) and carries the rest itself, so either runtime gives the same pods:
- ``spec.trainer``: image, the torchrun command, nodes, processes per node, env, resources per node;
- ``spec.runtimePatches``: pod labels/annotations (no sidecar), security contexts, volumes, mounts, service account,
  node selector, tolerations, pull secrets: the pod fields a patch may set (the CRD's PodSpecPatch).
What Trainer does with it (kubeflow/trainer@v2.3.0): the torch plugin injects PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR=<job>-node-0-0.<job> and PET_MASTER_PORT=29500 into the ``node`` container
(pkg/runtime/framework/plugins/torch/torch.go); JobSet runs one Indexed Job ``<job>-node-0`` whose pods restart in
place (restartPolicy OnFailure, Job backoffLimit) and, with no failurePolicy in the runtime, the first failed Job
fails the JobSet and the TrainJob. There is no elastic policy, so a failed TrainJob is resubmitted by the train
step (``Target.resubmit``), resuming from the latest checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torchx.specs import AppState

from components.train.launch import pod
from components.train.launch.jobspec import DNS_1035, JobSpec, JobSpecError
from components.train.launch.kube import Target

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
CONTAINER = "node"  # the trainer container and replicatedJob in every torch runtime
REPLICATED_JOB = "node"
DEFAULT_RUNTIME = "clipline-torch"
STOCK_RUNTIME = "torch-distributed"
PATCH_MANAGER = "clipline.dev/launcher"  # runtimePatches managers must be domain-prefixed paths
# kubeflow/trainer@v2.3.0 pkg/constants/constants.go: the torch plugin owns these; trainer.env must not set them
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
# Kueue (kubernetes-sigs/kueue site/content/en/docs/tasks/run/trainjobs.md): admission by queue is all-or-nothing
# for the whole TrainJob, which is how a TrainJob gets gang scheduling without a runtime podGroupPolicy.
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"


def build(spec: JobSpec, options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    runtime = (options or {}).get("runtime") or DEFAULT_RUNTIME
    if spec.gang_scheduler:
        raise JobSpecError("gang_scheduler: a TrainJob cannot choose its scheduler (runtimePatches have no "
                           "schedulerName); use a runtime with a podGroupPolicy, or a Kueue queue (queue=...)")
    if spec.priority_class and not spec.queue:
        raise JobSpecError("priority_class: TrainJob pods take priorityClassName only from the runtime's template; "
                           "with Kueue (queue=...) it becomes the job's WorkloadPriorityClass label")
    env = spec.container_env()
    reserved = sorted({e["name"] for e in env} & set(RESERVED_ENV))
    if reserved:
        raise JobSpecError(f"env: {reserved} are set by Trainer's torch plugin")
    labels = dict(spec.labels)
    if spec.queue:
        labels[KUEUE_QUEUE] = spec.queue
    if spec.priority_class:
        labels[KUEUE_PRIORITY] = spec.priority_class
    metadata: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    if spec.owner:
        metadata["ownerReferences"] = [dict(spec.owner)]
    pod_patch: dict[str, Any] = {
        "securityContext": pod.pod_security(spec), "volumes": pod.volumes(spec), **pod.placement(spec),
        "containers": [{"name": CONTAINER, "securityContext": pod.container_security(),
                        "volumeMounts": pod.volume_mounts()}],
    }
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": runtime},
            "trainer": {"image": spec.image, "command": spec.torchrun(), "numNodes": spec.nnodes,
                        "numProcPerNode": spec.nproc_per_node, "env": env, "resourcesPerNode": pod.resources(spec)},
            "runtimePatches": [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": REPLICATED_JOB, "template": {"spec": {"template": {
                    "metadata": pod.metadata(spec), "spec": pod_patch}}}}]}}}}],
        },
    }
    if spec.active_deadline_s:
        job["spec"]["activeDeadlineSeconds"] = spec.active_deadline_s
    return job


def webhook_rules(obj: Mapping[str, Any]) -> list[str]:
    """Admission rules of kubeflow/trainer@v2.3.0 the CRD does not hold (see the module docstring for the source
    of each): for a TrainJob the torch plugin's reserved env, the JobSet plugin's patch rules and JobSet's pod-name
    length; for a runtime, the replicatedJob rules of pkg/webhooks/trainingruntime_webhook.go."""
    if obj.get("kind") == KIND:
        return _trainjob_rules(obj)
    return _runtime_rules(obj)


def _trainjob_rules(job: Mapping[str, Any]) -> list[str]:
    problems = []
    name = (job.get("metadata") or {}).get("name") or ""
    spec = job.get("spec") or {}
    trainer = spec.get("trainer") or {}
    nodes = int(trainer.get("numNodes") or 1)
    # JobSet v0.12.0 pkg/webhooks/jobset_webhook.go: pod names <job>-node-0-<index>-<5 chars> must be DNS labels
    longest = f"{name}-{REPLICATED_JOB}-0-{nodes - 1}-abcde"
    if len(longest) > 63 or not DNS_1035.match(name):
        problems.append(f"JobSet pod names: {name!r} gives pod names like {longest!r} ({len(longest)} > 63 "
                        f"characters) or is not a DNS-1035 label")
    reserved = sorted({e.get("name") for e in trainer.get("env") or []} & set(RESERVED_ENV))
    if reserved:  # plugins/torch/torch.go Validate
        problems.append(f"torch reserved env: trainer.env must not set {reserved}")
    for i, patch in enumerate(spec.get("runtimePatches") or []):
        manager = patch.get("manager") or ""
        if "/" not in manager or not manager.split("/", 1)[0].count("."):  # plugins/jobset/jobset.go Validate
            problems.append(f"runtimePatches[{i}].manager: {manager!r} must be a domain-prefixed path (example.io/x)")
        template = ((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}
        for rj in template.get("replicatedJobs") or []:
            pod_spec = (((rj.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in pod_spec.get("containers") or []:
                if c.get("name") in (CONTAINER, "dataset-initializer", "model-initializer") and c.get("env"):
                    problems.append(f"runtimePatches[{i}]: env of container {c['name']!r} must go in trainer.env")
    return problems


def _runtime_rules(runtime: Mapping[str, Any]) -> list[str]:
    problems = []
    for rj in (((runtime.get("spec") or {}).get("template") or {}).get("spec") or {}).get("replicatedJobs") or []:
        step = ((rj.get("template") or {}).get("metadata") or {}).get("labels", {}).get(
            "trainer.kubeflow.org/trainjob-ancestor-step")
        containers = [c.get("name") for c in ((((rj.get("template") or {}).get("spec") or {}).get("template") or {})
                                              .get("spec") or {}).get("containers") or []]
        if step and rj.get("replicas", 1) != 1:
            problems.append(f"replicatedJob {rj.get('name')!r}: an ancestor-step job must have replicas 1")
        needed = {"trainer": CONTAINER}.get(step or "", step)
        if step and needed not in containers:
            problems.append(f"replicatedJob {rj.get('name')!r}: step {step!r} needs a container {needed!r}")
    return problems


def state(status: Optional[Mapping[str, Any]]) -> AppState:
    """Condition types are Suspended, Complete and Failed (pkg/apis/trainer/v1alpha1/trainjob_types.go); a TrainJob
    with none of them true is running (or waiting for its pods)."""
    if status is None:
        return AppState.UNKNOWN
    true = {c.get("type") for c in status.get("conditions") or [] if str(c.get("status")) == "True"}
    if "Failed" in true:
        return AppState.FAILED
    if "Complete" in true:
        return AppState.SUCCEEDED
    if "Suspended" in true:
        return AppState.PENDING
    active = sum(int(j.get("active") or 0) for j in status.get("jobsStatus") or [])
    return AppState.RUNNING if active else AppState.SUBMITTED


def pod_selector(name: str, rank: int) -> str:
    """JobSet v0.12.0's pod labels plus the Job controller's completion index, which is the node rank
    (PET_NODE_RANK comes from it)."""
    return f"jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name={REPLICATED_JOB}," \
           f"batch.kubernetes.io/job-completion-index={rank}"


TARGET = Target(name="trainjob", group=GROUP, version=VERSION, plural=PLURAL, kind=KIND, container=CONTAINER,
                build=build, state=state, pod_selector=pod_selector, resubmit=True)
