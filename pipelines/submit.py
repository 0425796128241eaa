"""``clipline compile`` and ``clipline submit``: the compiled pipeline YAML, and runs of it on a KFP server.

Compiling: every step runs the image given with ``--image`` (registry-qualified, ideally by digest), which is also the
default of the pipeline's ``image`` parameter (the training job's pods). The YAML is made acceptable to the oldest
KFP backend we support, ``MIN_KFP_BACKEND`` (see ``for_min_backend``).

Submitting (the retraining CronJob in manifests/ runs this): the client authenticates with the pod's projected
ServiceAccount token when one is given (``--token-path``, default ``$KF_PIPELINES_SA_TOKEN_PATH``), as
``kfp.client.ServiceAccountTokenVolumeCredentials(path)``: kfp 2.16.1's ``Client(host=...)`` sends no credentials of
its own (kfp/client/client.py:296-299, ``_load_config``: ``if host: return config`` unless ``credentials`` or
``existing_token`` was given). On multi-user Kubeflow ``--namespace`` is the profile:
the experiment and the pipeline live there (the API server refuses an experiment without a namespace). The pipeline
is uploaded as a pipeline VERSION named after the image and the YAML's hash (reused when it exists), and the run
references pipeline_id + version_id, so every run traces back to a versioned pipeline.

Scheduled retraining: ``--url-lists PREFIX`` only lists the URL lists under the prefix (cheap) and passes their URIs,
comma-separated, as the run's ``url_list``; the pipeline's ``gather_url_lists`` step concatenates them in a sized
pod. ``--skip-if-unchanged`` submits nothing when the set of lists (URIs and sizes) is the one of the last
submission, recorded in ``<prefix>/_clipline_submitted.json``. The promote step compares the new model with the
current ``latest`` under ``models_prefix``, so each run's baseline is the previous promoted model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from components.common import store
from components.ingest.gather import URL_LIST_SUFFIXES, url_lists_under

log = logging.getLogger("clipline.submit")

COMPILED = Path(__file__).parent / "compiled" / "clip_pretrain.yaml"
SUBMITTED = "_clipline_submitted.json"
PIPELINE_NAME = "clip-pretrain"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
# The oldest KFP backend the compiled YAML is made for (Kubeflow 1.10 ships it). Older ones cannot run it:
# KFP 2.2.0/2.3.0 drivers parse --container and --kubernetes_config with jsonpb.UnmarshalString, which rejects unknown
# fields (kubeflow/pipelines@2.3.0 backend/src/v2/cmd/driver/main.go:110-138), and their pipeline-spec module
# (api v0.0.0-20231027040853-58ce09e07d03 in @2.3.0 go.mod) has no resource_cpu_limit & co., which kfp 2.16.1 writes
# for every step with a CPU/memory setting; 2.2.0's launcher also writes artifacts under /s3 (uid 1000 cannot).
# 2.4.1 parses both with AllowUnknownFields (@2.4.1 backend/src/common/util/json.go:70-74) and reads resources from
# resourceCpuLimit/... first, cpuLimit/... otherwise (@2.4.1 backend/src/v2/driver/driver.go:365-497).
MIN_KFP_BACKEND = "2.4.1"


class SubmitError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------------ compile


def for_min_backend(platform: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes platform spec with the fields KFP ``MIN_KFP_BACKEND`` does not know removed where that changes
    nothing, in place.

    kfp-kubernetes 2.16.1 writes ``secretNameParameter``/``configMapNameParameter`` (a constant repeating
    ``secretName``/``configMapName``) and ``optional: false`` into secretAsEnv/configMapAsEnv. The 2.4.1 driver would
    drop them as unknown anyway (its proto, kubeflow/pipelines@2.4.1 kubernetes_platform/proto/
    kubernetes_executor_config.proto, has neither) and reads ``secretName``/``configMapName``, and a key reference
    without ``optional`` is required, as ``optional: false`` says. Newer drivers use the plain name when there is no
    parameter (@2.16.1 backend/src/v2/driver/k8s.go:351-366, 447-459). Anything else 2.4.1 lacks is an error here
    rather than a silent drop on the cluster; tests/test_kfp_compat.py checks the result field by field."""
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    for executor, config in executors.items():
        for key, name_field in (("secretAsEnv", "secretName"), ("configMapAsEnv", "configMapName")):
            for item in config.get(key, []):
                parameter = item.pop(f"{name_field}Parameter", None)
                if parameter is not None and parameter != {"runtimeValue": {"constant": item.get(name_field)}}:
                    raise SubmitError(f"{executor}: {key} {name_field}Parameter {parameter} is not the constant "
                                      f"{name_field}; KFP {MIN_KFP_BACKEND} cannot resolve it")
                if item.pop("optional", False):
                    raise SubmitError(f"{executor}: {key} {item.get(name_field)} is optional, which KFP "
                                      f"{MIN_KFP_BACKEND} cannot express (it would make it required)")
    return platform


def compile_pipeline(path: Path = COMPILED, parts: int | None = None, image: str | None = None) -> Path:
    """Write the pipeline YAML; ``parts``: the fan-out of ingest and preprocess (default: the committed one's);
    ``image``: every step's image and the ``image`` parameter's default (default: ``DEFAULT_IMAGE``)."""
    from kfp import compiler

    from pipelines.pipeline import DEFAULT_PARTS, IMAGE, make_pipeline

    pipeline = make_pipeline(parts or DEFAULT_PARTS, IMAGE if image is None else image)  # checks the image
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(path))
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    header = "".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    documents = list(yaml.safe_load_all(text))
    for document in documents:
        if "platforms" in document:
            for_min_backend(document)
    with open(path, "w") as f:  # written as kfp writes it (pipeline_spec_builder.write_pipeline_spec_to_file)
        f.write(header)
        yaml.dump_all(documents, f, sort_keys=True)
    return path


# ------------------------------------------------------------------------------------------------------------- submit


def pipeline_image(spec_text: str) -> str:
    """The default of the compiled pipeline's ``image`` parameter (the image it was compiled with)."""
    spec = next(yaml.safe_load_all(spec_text))
    return spec["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"]


def version_name(image: str, spec_text: str) -> str:
    """The pipeline version's name: the image's repository and tag (or digest prefix) and the YAML's hash, as a
    DNS-1123 label (KFP stores version names in a 127-character column, and its Kubernetes-native pipeline store
    keeps versions as objects named this way)."""
    from pipelines.pipeline import IMAGE_REF

    match = IMAGE_REF.match(image)
    if not match:
        raise SubmitError(f"the pipeline's image {image!r} is not a registry-qualified reference")
    ref = "-".join(filter(None, (match["tag"], (match["digest"] or "").replace("sha256:", "sha256-")[:19])))
    digest = hashlib.sha256(spec_text.encode()).hexdigest()[:10]
    base = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", f"{match['repository'].rsplit('/', 1)[-1]}-{ref}".lower()))
    return f"{base.strip('-')[:63 - len(digest) - 1].rstrip('-')}-{digest}"


def token_path_from(token_path: str | None) -> str | None:
    """The ServiceAccount token file to authenticate with: ``token_path``, else $KF_PIPELINES_SA_TOKEN_PATH, else
    none (standalone KFP without auth); a named file must exist."""
    path = token_path or os.environ.get(TOKEN_PATH_ENV) or None
    if path and not Path(path).is_file():
        origin = "--token-path" if token_path else f"${TOKEN_PATH_ENV}"
        raise SubmitError(f"{origin}: no token file at {path} (mount a projected serviceAccountToken volume with "
                          f"audience pipelines.kubeflow.org there)")
    return path


def typed_params(params: dict[str, Any], spec_text: str) -> dict[str, Any]:
    """``params`` checked against the pipeline's parameters and converted to their types (KFP checks a run's
    parameter values against the declared types: "2" is no integer)."""
    declared = next(yaml.safe_load_all(spec_text))["root"]["inputDefinitions"]["parameters"]
    out = {}
    for key, value in params.items():
        if key not in declared:
            raise SubmitError(f"the pipeline has no parameter {key!r}; it has {', '.join(sorted(declared))}")
        kind = declared[key]["parameterType"]
        try:
            if kind == "NUMBER_INTEGER":
                out[key] = int(value)
            elif kind == "NUMBER_DOUBLE":
                out[key] = float(value)
            elif kind == "BOOLEAN":
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = str(value).lower() in ("true", "1")
            else:
                out[key] = str(value)
        except ValueError:
            raise SubmitError(f"parameter {key}: {value!r} is not a {kind}") from None
    return out


def _one(items: list | None, what: str) -> Any:
    items = items or []
    if len(items) > 1:
        raise SubmitError(f"{len(items)} {what}; the name must be unique")
    return items[0] if items else None


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def ensure_pipeline_version(client: Any, package: Path, *, pipeline_name: str, version: str, namespace: str | None,
                            description: str) -> tuple[str, str, bool]:
    """(pipeline_id, version_id, uploaded): the pipeline ``pipeline_name`` (uploaded when absent; in ``namespace``
    on multi-user) and its version ``version`` (uploaded when absent, else reused)."""
    found = _one(client.list_pipelines(filter=_name_filter(pipeline_name), namespace=namespace).pipelines,
                 f"pipelines named {pipeline_name!r}")
    if found is None:
        found = client.upload_pipeline(str(package), pipeline_name=pipeline_name, namespace=namespace,
                                       description="CLIP pretraining: ingest, preprocess, train, evaluate, promote")
        log.info("uploaded pipeline %s (%s)", pipeline_name, found.pipeline_id)
    pipeline_id = found.pipeline_id

    def existing():
        return _one(client.list_pipeline_versions(pipeline_id, filter=_name_filter(version)).pipeline_versions,
                    f"versions named {version!r}")

    current = existing()
    if current is not None:
        return pipeline_id, current.pipeline_version_id, False
    try:
        created = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id,
                                                 description=description)
    except Exception:
        current = existing()
        if current is None:
            raise
        return pipeline_id, current.pipeline_version_id, False
    log.info("uploaded pipeline version %s (%s)", version, created.pipeline_version_id)
    return pipeline_id, created.pipeline_version_id, True


def make_client(host: str, *, namespace: str | None, token_path: str | None):
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if token_path:
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=token_path)
    return kfp.Client(**kwargs)


def submit(host: str, *, params: dict[str, Any], experiment: str, runs_root: str, namespace: str | None = None,
           token_path: str | None = None, image: str | None = None, pipeline: Path = COMPILED,
           pipeline_name: str = PIPELINE_NAME, url_lists: str | None = None,
           skip_if_unchanged: bool = False) -> dict[str, Any]:
    """Create a run of the pipeline on the KFP server at ``host`` from a pipeline version (compiled with ``image``
    when given, else the YAML at ``pipeline``); returns what was submitted (or why not)."""
    token = token_path_from(token_path)
    params = dict(params)
    params.setdefault("run_prefix", f"{runs_root.rstrip('/')}/clip-pretrain-{time.strftime('%Y%m%d-%H%M%S')}")
    record = None
    if url_lists:
        lists = url_lists_under(url_lists)
        if not lists:
            raise SubmitError(f"no URL list ({', '.join(URL_LIST_SUFFIXES)}) under {url_lists}")
        record_uri = store.join(url_lists.rstrip("/"), SUBMITTED)
        if skip_if_unchanged and store.exists(record_uri):
            previous = store.get_json(record_uri)
            if previous.get("lists") == lists:
                log.info("the URL lists under %s are unchanged since %s: nothing submitted", url_lists,
                         previous.get("run_prefix"))
                return {"submitted": False, "reason": "URL lists unchanged", "lists": lists}
        params["url_list"] = ",".join(item["uri"] for item in lists)  # gathered by the pipeline's first step
        record = (record_uri, {"lists": lists, "run_prefix": params["run_prefix"]})
    with tempfile.TemporaryDirectory(prefix="clipline-submit-") as tmp:
        if image:
            package = compile_pipeline(Path(tmp) / "clip_pretrain.yaml", image=image)
        else:
            package = Path(pipeline)
        spec_text = package.read_text()
        params = typed_params(params, spec_text)
        compiled_image = pipeline_image(spec_text)
        version = version_name(compiled_image, spec_text)
        client = make_client(host, namespace=namespace, token_path=token)
        pipeline_id, version_id, uploaded = ensure_pipeline_version(
            client, package, pipeline_name=pipeline_name, version=version, namespace=namespace,
            description=f"image {compiled_image}; YAML sha256 {hashlib.sha256(spec_text.encode()).hexdigest()}")
    found = client.create_experiment(name=experiment, namespace=namespace)
    run = client.run_pipeline(experiment_id=found.experiment_id, job_name=params["run_prefix"].rsplit("/", 1)[-1],
                              params=params, pipeline_id=pipeline_id, version_id=version_id, enable_caching=False)
    if record:  # recorded only once the server accepted the run
        store.put_json(record[0], {**record[1], "run_id": run.run_id})
    return {"submitted": True, "run_id": run.run_id, "experiment_id": found.experiment_id,
            "pipeline_id": pipeline_id, "version_id": version_id, "version": version, "version_uploaded": uploaded,
            "image": compiled_image, "params": params}
