"""Kubernetes RBAC evaluated offline over rendered objects, and the rendered clipline manifests it is applied to.

Import from tests (pytest puts tests/ on sys.path): ``from rbac import allowed, rendered, STEP_IDENTITY``.

The evaluator answers "may this service account make this API request?" the way kube-apiserver's RBAC authorizer
does, given the Roles, ClusterRoles, RoleBindings and ClusterRoleBindings in ``objects`` (and nothing else: no
other authorizer, no built-in cluster roles unless they are in ``objects``):

- kubernetes/kubernetes plugin/pkg/auth/authorizer/rbac/rbac.go ``RuleAllows``: a resource request is allowed by a
  rule when ``VerbMatches && APIGroupMatches && ResourceMatches(rule, "resource/subresource", subresource) &&
  ResourceNameMatches``; any one allowing rule allows the request (RBAC has no deny).
- kubernetes/kubernetes pkg/apis/rbac/v1/evaluation_helpers.go: ``VerbMatches`` / ``APIGroupMatches``: the value or
  "*". ``ResourceMatches``: "*" matches every resource and subresource; otherwise the rule's entry must equal the
  combined "resource/subresource" string (so "pods" does not allow "pods/log"), or be "*/subresource" when the request
  has that subresource. ``ResourceNameMatches``: a rule without resourceNames matches any name; one with
  resourceNames matches only a request naming one of them (create and list requests carry no name, so they never
  match such a rule).
- kubernetes/kubernetes pkg/registry/rbac/validation/rule.go ``VisitRulesFor`` / ``GetRoleReferenceRules`` /
  ``appliesToUser``: ClusterRoleBindings apply in every namespace and to cluster-scoped requests; RoleBindings apply
  only to requests in their own namespace; a RoleBinding's roleRef is a Role of its own namespace or a ClusterRole
  (whose rules then apply in the binding's namespace only); a ClusterRoleBinding can only reference a ClusterRole.
  Subjects: ServiceAccount (namespace, defaulting to the binding's, and name), User (the service account's user name
  ``system:serviceaccount:<ns>:<name>``), Group (a service account is in ``system:serviceaccounts``,
  ``system:serviceaccounts:<ns>`` and ``system:authenticated``: k8s.io/apiserver pkg/authentication/serviceaccount
  ``MakeGroupNames`` plus the authenticated group the authenticator adds).
- ClusterRole ``aggregationRule``: the clusterrole-aggregation controller replaces the role's rules with the union
  of the rules of the ClusterRoles its clusterRoleSelectors select (kubernetes/kubernetes
  pkg/controller/clusterroleaggregation/clusterroleaggregation_controller.go), so the evaluator does the same,
  recursively (aggregated roles may select aggregated roles).

Only resource requests are modelled (nonResourceURLs rules never allow anything here).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import yaml

RBAC_GROUP = "rbac.authorization.k8s.io"
ALL = "*"


# ------------------------------------------------------------------------------------------------ rule matching
def verb_matches(rule: Mapping[str, Any], verb: str) -> bool:
    return any(v in (ALL, verb) for v in rule.get("verbs") or [])


def api_group_matches(rule: Mapping[str, Any], group: str) -> bool:
    return any(g in (ALL, group) for g in rule.get("apiGroups") or [])


def resource_matches(rule: Mapping[str, Any], resource: str, subresource: str = "") -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for entry in rule.get("resources") or []:
        if entry in (ALL, combined):
            return True
        if subresource and entry == f"*/{subresource}":
            return True
    return False


def resource_name_matches(rule: Mapping[str, Any], name: str) -> bool:
    names = rule.get("resourceNames") or []
    return not names or name in names


def rule_allows(rule: Mapping[str, Any], *, verb: str, group: str, resource: str, subresource: str = "",
                name: str = "") -> bool:
    """RuleAllows for a resource request."""
    return (verb_matches(rule, verb) and api_group_matches(rule, group)
            and resource_matches(rule, resource, subresource) and resource_name_matches(rule, name))


# ------------------------------------------------------------------------------------------------ subjects
def service_account_user(sa_namespace: str, sa_name: str) -> str:
    return f"system:serviceaccount:{sa_namespace}:{sa_name}"


def service_account_groups(sa_namespace: str) -> set:
    return {"system:serviceaccounts", f"system:serviceaccounts:{sa_namespace}", "system:authenticated"}


def subject_applies(subject: Mapping[str, Any], sa_namespace: str, sa_name: str, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and namespace == sa_namespace and subject.get("name") == sa_name
    if kind == "User":
        return subject.get("name") == service_account_user(sa_namespace, sa_name)
    if kind == "Group":
        return subject.get("name") in service_account_groups(sa_namespace)
    return False


# ------------------------------------------------------------------------------------------------ roles
def _of_kind(objects: Iterable[Mapping[str, Any]], kind: str) -> Iterator[Mapping[str, Any]]:
    return (o for o in objects if o.get("kind") == kind and (o.get("apiVersion") or "").startswith(RBAC_GROUP))


def _namespace(obj: Mapping[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("namespace") or ""


def _name(obj: Mapping[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("name") or ""


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels AND matchExpressions). An empty selector selects everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def cluster_role_rules(objects: Sequence[Mapping[str, Any]], name: str,
                       _path: frozenset = frozenset()) -> List[dict]:
    """The effective rules of ClusterRole ``name`` (aggregated where it has an aggregationRule); [] if absent.
    The controller skips the role itself among those its selectors match; ``_path`` stops selector cycles."""
    if name in _path:
        return []
    roles = [r for r in _of_kind(objects, "ClusterRole") if _name(r) == name]
    if not roles:
        return []
    role = roles[0]
    aggregation = role.get("aggregationRule")
    if not aggregation:
        return list(role.get("rules") or [])
    rules: List[dict] = []
    for other in _of_kind(objects, "ClusterRole"):
        labels = (other.get("metadata") or {}).get("labels") or {}
        if _name(other) != name and any(_selects(s, labels) for s in aggregation.get("clusterRoleSelectors") or []):
            for rule in cluster_role_rules(objects, _name(other), _path | {name}):
                if rule not in rules:
                    rules.append(rule)
    return rules


def _role_ref_rules(objects: Sequence[Mapping[str, Any]], role_ref: Mapping[str, Any],
                    binding_namespace: str) -> List[dict]:
    if (role_ref.get("apiGroup") or "") != RBAC_GROUP:
        return []
    if role_ref.get("kind") == "Role":
        if not binding_namespace:  # a ClusterRoleBinding cannot reference a Role
            return []
        for role in _of_kind(objects, "Role"):
            if _name(role) == role_ref.get("name") and _namespace(role) == binding_namespace:
                return list(role.get("rules") or [])
        return []
    if role_ref.get("kind") == "ClusterRole":
        return cluster_role_rules(objects, role_ref.get("name") or "")
    return []


def rules_for(objects: Sequence[Mapping[str, Any]], sa_namespace: str, sa_name: str,
              namespace: str) -> List[Tuple[str, dict]]:
    """(source, rule) for every rule that applies to the service account for requests in ``namespace``
    ("" = a cluster-scoped request: ClusterRoleBindings only)."""
    out: List[Tuple[str, dict]] = []
    for binding in _of_kind(objects, "ClusterRoleBinding"):
        if any(subject_applies(s, sa_namespace, sa_name, "") for s in binding.get("subjects") or []):
            source = f"ClusterRoleBinding/{_name(binding)}"
            out += [(source, r) for r in _role_ref_rules(objects, binding.get("roleRef") or {}, "")]
    if namespace:
        for binding in _of_kind(objects, "RoleBinding"):
            ns = _namespace(binding)
            if ns != namespace:
                continue
            if any(subject_applies(s, sa_namespace, sa_name, ns) for s in binding.get("subjects") or []):
                source = f"RoleBinding/{ns}/{_name(binding)}"
                out += [(source, r) for r in _role_ref_rules(objects, binding.get("roleRef") or {}, ns)]
    return out


def allowed(objects: Sequence[Mapping[str, Any]], sa_namespace: str, sa_name: str, *, verb: str, group: str,
            resource: str, subresource: str = "", namespace: str, name: str = "") -> bool:
    """Whether service account ``sa_namespace/sa_name`` may make the resource request, by the RBAC objects in
    ``objects``. ``group`` "" is the core API group; ``namespace`` "" a cluster-scoped request; ``name`` "" a request
    without a name (create, list, watch of a collection)."""
    return any(rule_allows(rule, verb=verb, group=group, resource=resource, subresource=subresource, name=name)
               for _, rule in rules_for(objects, sa_namespace, sa_name, namespace))


def bindings_for(objects: Sequence[Mapping[str, Any]], sa_namespace: str, sa_name: str) -> List[str]:
    """Every RoleBinding/ClusterRoleBinding (any namespace) that has a subject matching the service account, directly
    or through one of its groups."""
    out = []
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for binding in _of_kind(objects, kind):
            ns = _namespace(binding) if kind == "RoleBinding" else ""
            if any(subject_applies(s, sa_namespace, sa_name, ns) for s in binding.get("subjects") or []):
                out.append(f"{kind}/{ns + '/' if ns else ''}{_name(binding)}")
    return out


def expand(rules: Iterable[Mapping[str, Any]]) -> set:
    """{(apiGroup, resource, verb)} a list of rules spells out (wildcards stay "*")."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups") or [] for r in rule.get("resources") or []
            for v in rule.get("verbs") or []}


# ------------------------------------------------------------------------------------------------ clipline
# The calls the train step's launch and watch code makes (issue 14 contract), as (group, resource, subresource, verb).
LAUNCHER_CALLS: Tuple[Tuple[str, str, str, str], ...] = (
    *(("trainer.kubeflow.org", "trainjobs", "", v) for v in ("create", "get", "delete", "list")),
    ("trainer.kubeflow.org", "trainjobs", "status", "get"),
    *(("kubeflow.org", "pytorchjobs", "", v) for v in ("create", "get", "delete", "list")),
    ("kubeflow.org", "pytorchjobs", "status", "get"),
    *(("", "pods", "", v) for v in ("get", "list", "watch")),
    ("", "pods", "log", "get"),
)

# Per deployment shape: (step service account namespace, its name, the namespace the train step creates jobs in).
# Standalone KFP runs steps in its own namespace as pipeline-runner; multi-user KFP in the profile namespace as
# default-editor; the job namespace defaults to the step pod's own.
STEP_IDENTITY: Dict[str, Tuple[str, str, str]] = {
    "standalone": ("kubeflow", "pipeline-runner", "kubeflow"),
    "multi-user": ("clipline", "default-editor", "clipline"),
    "local-dev": ("kubeflow", "pipeline-runner", "kubeflow"),
}
TRAINER_SERVICE_ACCOUNT = "clipline-trainer"
RETRAIN_SERVICE_ACCOUNT = "clipline-retrain"

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
KUBECTL = shutil.which("kubectl")

# What `rendered(target)` renders: a directory under manifests/, or an overlay composed on the fly
# (resources and components, paths relative to manifests/), the way a user adds a component in an overlay of theirs.
OVERLAYS = {"standalone": "overlays/standalone", "multi-user": "overlays/multi-user", "local-dev": "overlays/local-dev"}
COMPOSED = {
    "standalone+gpu-cluster": {"resources": ["overlays/standalone"], "components": ["components/gpu-cluster"]},
    "multi-user+gpu-cluster": {"resources": ["overlays/multi-user"], "components": ["components/gpu-cluster"]},
}
EXAMPLES = {"examples": "examples", "examples/local-dev": "examples/local-dev", "examples/gpu": "examples/gpu"}
TARGETS: Dict[str, Any] = {**OVERLAYS, **COMPOSED, **EXAMPLES}
PATH_FIELDS = ("resources", "components", "transformers")


class RenderError(RuntimeError):
    pass


def kustomize(directory: Path) -> Tuple[dict, ...]:
    """`kubectl kustomize DIRECTORY` (kubectl's built-in kustomize, v5.5 here) as parsed objects."""
    if KUBECTL is None:
        raise RenderError("kubectl not found: `kubectl kustomize` renders the manifests")
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render_kustomization(kustomization: Mapping[str, Any], files: Optional[Mapping[str, str]] = None) -> List[dict]:
    """Render a kustomization written to a fresh temporary directory. Entries of resources/components/transformers
    that name a path under manifests/ (e.g. "overlays/standalone") are rewritten relative to that directory (kustomize
    refuses absolute paths); ``files`` are extra files next to it (patches)."""
    with tempfile.TemporaryDirectory(prefix="clipline-kustomize-") as tmp:
        doc = dict(kustomization)
        for key in PATH_FIELDS:
            if key in doc:
                doc[key] = [os.path.relpath(MANIFESTS / p, tmp) if (MANIFESTS / p).exists() else p for p in doc[key]]
        doc.setdefault("apiVersion", "kustomize.config.k8s.io/v1beta1")
        doc.setdefault("kind", "Kustomization")
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        for name, text in (files or {}).items():
            Path(tmp, name).write_text(text)
        return list(kustomize(Path(tmp)))


@lru_cache(maxsize=None)
def _rendered(target: str) -> Tuple[dict, ...]:
    where = TARGETS[target]
    if isinstance(where, str):
        return kustomize(MANIFESTS / where)
    return tuple(render_kustomization(where))


def rendered(target: str) -> List[dict]:
    """The objects `kubectl kustomize` renders for ``target`` (a key of TARGETS), rendered once per session; a fresh
    deep copy each call, so callers may mutate it."""
    return copy.deepcopy(list(_rendered(target)))
