"""The pod pieces every training job shares, whichever operator creates the pods.

Restricted Pod Security Standard (non-root, RuntimeDefault seccomp, no privilege escalation, all capabilities
dropped, read-only root filesystem), a memory-backed /dev/shm for DataLoader workers, a sized /tmp for HOME and
caches, no service-account token (training needs no Kubernetes API) and no Istio sidecar: a sidecar keeps running
after the trainer exits, so the pod never completes (istio/istio#11045), and it would proxy NCCL/c10d traffic.
"""

from __future__ import annotations

from typing import Any

from components.train.launch.jobspec import JobSpec

# Profile namespaces are labelled istio-injection=enabled (kubeflow/kubeflow profile-controller).
SIDECAR_OFF = {"sidecar.istio.io/inject": "false"}
GPU_RESOURCE = "nvidia.com/gpu"


def metadata(spec: JobSpec) -> dict[str, Any]:
    return {"labels": dict(spec.labels), "annotations": dict(SIDECAR_OFF)}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def pod_security(spec: JobSpec) -> dict[str, Any]:
    uid = spec.run_as_user
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"}}


def volumes(spec: JobSpec) -> list[dict[str, Any]]:
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm}},
            {"name": "tmp", "emptyDir": {"sizeLimit": spec.resources.ephemeral}}]


def volume_mounts() -> list[dict[str, Any]]:
    return [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]


def resources(spec: JobSpec) -> dict[str, dict[str, str]]:
    requests = spec.resources.requests(GPU_RESOURCE)
    return {"requests": dict(requests), "limits": dict(requests)}


def placement(spec: JobSpec) -> dict[str, Any]:
    """Pod-spec fields for where the pods may run and which account they use (both operators accept these)."""
    out: dict[str, Any] = {"serviceAccountName": spec.service_account}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    return out
