"""The Kubernetes calls the launch code makes, in one place, and what differs between job kinds (``Target``).

Every call the launcher and the log follower make goes through ``KubeApi``; manifests/ grants exactly these
(Role ``clipline-launcher``) and tests/test_launch_cluster.py checks each recorded call against the rendered RBAC:
  <group> <plural>: create, get, list, delete;  <plural>/status: get
  pods: get, list;  pods/log: get
The client is created on first use, so importing this module touches no cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

from torchx.specs import AppState


@dataclass(frozen=True)
class Target:
    """A job kind the launcher can submit: its API coordinates and how to read it."""

    name: str  # the launcher value and torchx scheduler name
    group: str
    version: str
    plural: str
    kind: str
    container: str  # the trainer container in the job's pods
    build: Callable[..., dict]  # (JobSpec, options) -> the object to create
    state: Callable[[Optional[Mapping[str, Any]]], AppState]  # status -> state
    pod_selector: Callable[[str, int], str]  # (job name, node rank) -> label selector of that node's pods
    resubmit: bool  # the step resubmits a failed job (the operator restarts nothing itself)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


class KubeApi:
    """Thin wrapper over the kubernetes client: the only Kubernetes calls the launcher makes."""

    def __init__(self, api_client: Any = None) -> None:
        self._client = api_client

    def _api(self) -> Any:
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

        return client.CustomObjectsApi(self._api())

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api())

    @staticmethod
    def _not_found(exc: Exception) -> bool:
        return getattr(exc, "status", None) == 404

    def create(self, target: Target, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._custom().create_namespaced_custom_object(target.group, target.version, namespace,
                                                              target.plural, body)

    def status(self, target: Target, namespace: str, name: str) -> Optional[dict[str, Any]]:
        """The job's status through the status subresource (GET .../<name>/status); None when the job is gone."""
        from kubernetes.client.rest import ApiException

        try:
            job = self._custom().get_namespaced_custom_object_status(target.group, target.version, namespace,
                                                                     target.plural, name)
        except ApiException as exc:
            if self._not_found(exc):
                return None
            raise
        return job.get("status") or {}

    def delete(self, target: Target, namespace: str, name: str) -> bool:
        """Delete the job and, in the background, its pods; False when it was already gone."""
        from kubernetes.client.rest import ApiException

        try:
            self._custom().delete_namespaced_custom_object(target.group, target.version, namespace, target.plural,
                                                           name, propagation_policy="Background")
        except ApiException as exc:
            if self._not_found(exc):
                return False
            raise
        return True

    def list(self, target: Target, namespace: str) -> list[dict[str, Any]]:
        resp = self._custom().list_namespaced_custom_object(target.group, target.version, namespace, target.plural)
        return list(resp.get("items") or [])

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self._core().list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return list(json.loads(resp.data).get("items") or [])

    def log_lines(self, namespace: str, pod: str, container: str, *, follow: bool,
                  since_seconds: Optional[int] = None) -> Iterator[str]:
        """The pod's log, line by line, each prefixed with its RFC 3339 timestamp (for de-duplication when the
        stream is re-opened). Raises the client's ApiException for a pod that is missing or not started."""
        kwargs: dict[str, Any] = {"container": container, "follow": follow, "timestamps": True,
                                  "_preload_content": False}
        if since_seconds:
            kwargs["since_seconds"] = since_seconds
        resp = self._core().read_namespaced_pod_log(pod, namespace, **kwargs)
        try:
            pending = b""
            for chunk in resp.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            resp.release_conn()
