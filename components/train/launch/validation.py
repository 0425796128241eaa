"""Check a job or runtime object the way the cluster would, before anything is submitted.

Two layers, both offline:
- the upstream CRD (shipped in ``crds/`` as package data, so the image checks too): its OpenAPI v3 schema with
  jsonschema, fields it does not declare (which the API server would prune silently), and its
  ``x-kubernetes-validations`` CEL rules with cel-python (transition rules, which compare with ``oldSelf``, only
  apply to updates and are skipped);
- the operator's admission-webhook rules, which the CRD does not express: ``pytorchjob.webhook_rules`` and
  ``trainjob.webhook_rules`` (each cites the upstream source it encodes).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterator, Mapping

import yaml

CRDS = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1.9.0.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.v2.3.0.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"):
        "trainer.kubeflow.org_clustertrainingruntimes.v2.3.0.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.v2.3.0.yaml",
}
MAX_ERRORS = 10


class JobValidationError(ValueError):
    """An object the CRD schema, a CRD rule or the operator's webhook would refuse; the message names the rule."""


def crd_text(file_name: str) -> str:
    return resources.files("components.train.launch").joinpath("crds", file_name).read_text()


@lru_cache(maxsize=None)
def schema(api_version: str, kind: str) -> dict[str, Any]:
    if (api_version, kind) not in CRDS:
        known = ", ".join(f"{k} ({v})" for v, k in CRDS)
        raise JobValidationError(f"no CRD shipped for {kind} {api_version}; known: {known}")
    crd = yaml.load(crd_text(CRDS[(api_version, kind)]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = api_version.rpartition("/")[2]
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


def _path(parts) -> str:
    return ".".join(map(str, parts)) or "<root>"


def schema_errors(obj: Mapping[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema(obj.get("apiVersion", ""), obj.get("kind", "")))
    return [f"{_path(e.absolute_path)}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


@lru_cache(maxsize=None)
def _cel_program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _rules(node: Mapping[str, Any], value: Any, path: tuple) -> Iterator[tuple[tuple, dict[str, Any], Any]]:
    """(path, rule, value) for every CEL rule of the schema that applies to a part of the object."""
    for rule in node.get("x-kubernetes-validations") or []:
        yield path, rule, value
    if isinstance(value, Mapping):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, Mapping) else None)
            if sub:
                yield from _rules(sub, item, (*path, key))
    elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
        for i, item in enumerate(value):
            yield from _rules(node["items"], item, (*path, i))


def cel_errors(obj: Mapping[str, Any]) -> list[str]:
    import celpy

    errors = []
    for path, rule, value in _rules(schema(obj.get("apiVersion", ""), obj.get("kind", "")), obj, ()):
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: only evaluated on update
        try:
            ok = _cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as exc:
            ok = exc
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            errors.append(f"{_path(path)}: {rule.get('message') or rule['rule']} (CEL rule {rule['rule']!r})")
    return errors


def unknown_fields(node: Mapping[str, Any], value: Any, path: tuple = ()) -> list[str]:
    """Fields the schema does not declare. The API server prunes them silently (strict field validation is
    opt-in per request), so a setting the operator does not support would be lost without a word."""
    if isinstance(value, Mapping) and node.get("properties") is not None \
            and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
        props = node["properties"]
        out = [f"{_path((*path, key))}: unknown field" for key in value if key not in props]
        for key, item in value.items():
            if key in props:
                out += unknown_fields(props[key], item, (*path, key))
        return out
    if isinstance(value, Mapping) and isinstance(node.get("additionalProperties"), Mapping):
        return [e for key, item in value.items() for e in unknown_fields(node["additionalProperties"], item,
                                                                         (*path, key))]
    if isinstance(value, list) and isinstance(node.get("items"), Mapping):
        return [e for i, item in enumerate(value) for e in unknown_fields(node["items"], item, (*path, i))]
    return []


def _webhook(kind: str) -> Callable[[Mapping[str, Any]], list[str]]:
    if kind == "PyTorchJob":
        from components.train.launch.pytorchjob import webhook_rules
    else:
        from components.train.launch.trainjob import webhook_rules
    return webhook_rules


def validate_object(obj: Mapping[str, Any]) -> None:
    """Raise JobValidationError listing every problem (CRD schema, CRD rules, webhook rules) of ``obj``."""
    kind = obj.get("kind", "")
    problems = [f"CRD schema: {e}" for e in schema_errors(obj)]
    problems += [f"CRD schema: {e}" for e in unknown_fields(schema(obj.get("apiVersion", ""), kind), obj)]
    problems += [f"CRD rule: {e}" for e in cel_errors(obj)]
    problems += [f"webhook rule {e}" for e in _webhook(kind)(obj)]
    if problems:
        name = (obj.get("metadata") or {}).get("name")
        more = f" (and {len(problems) - MAX_ERRORS} more)" if len(problems) > MAX_ERRORS else ""
        raise JobValidationError(f"{kind} {name!r} would be refused: " + "; ".join(problems[:MAX_ERRORS]) + more)
