"""The compiled pipeline against the oldest KFP backend we support (pipelines.submit.MIN_KFP_BACKEND = 2.4.1, the one
Kubeflow 1.10.0 ships; kubeflow/manifests v1.10.0 README).

How 2.4.1 reads the two YAML documents (kubeflow/pipelines@2.4.1):
- backend/src/apiserver/template/v2_template.go:170-210: the pipeline spec and the platform spec are parsed with
  protojson.Unmarshal (strict: an unknown field fails the upload), but both deployment specs are
  google.protobuf.Struct there, so anything inside them passes the upload;
- backend/src/v2/cmd/driver/main.go:111-135,200-205: the driver parses each executor's container spec (--container)
  and Kubernetes config (--kubernetes_config) with util.UnmarshalString = jsonpb AllowUnknownFields
  (backend/src/common/util/json.go:70-74): a field 2.4.1 lacks is DROPPED SILENTLY, the pod is built without it.
So every field must be one 2.4.1 knows, or the cluster quietly ignores what the YAML asks for. The tables below are
the 2.4.1 messages, transcribed field by field (JSON names) from
  kubeflow/pipelines@2.4.1 api/v2alpha1/pipeline_spec.proto (identical at the api module 2.4.1's go.mod pins,
  v0.0.0-20250102152816-873e9dedd766), and
  kubeflow/pipelines@2.4.1 kubernetes_platform/proto/kubernetes_executor_config.proto (identical at the
  kubernetes_platform module 2.4.1's go.mod pins, v0.0.0-20240725205754-d911c8b73b49).
A self-check compares them with the installed (newer) protos, so a typo in a transcription fails too.

Field kinds: "s" scalar or enum, "[s]" repeated scalar, "{s}" map of scalars, "any" (Struct/Value: free JSON),
"Msg", "[Msg]" (repeated), "{Msg}" (map of string to Msg).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines.submit import COMPILED, MIN_KFP_BACKEND, SubmitError, for_min_backend

PS = "ml_pipelines."  # pipeline_spec.proto package
K8S = "kfp_kubernetes."  # kubernetes_executor_config.proto package

PIPELINE_SPEC_2_4_1: dict[str, dict[str, str]] = {
    "PipelineSpec": {"pipelineInfo": "PipelineInfo", "deploymentSpec": "PipelineDeploymentConfig",  # a Struct in
                     # the proto, read as PipelineDeploymentConfig by the compiler and driver
                     "sdkVersion": "s", "schemaVersion": "s", "components": "{ComponentSpec}",
                     "root": "ComponentSpec", "defaultPipelineRoot": "s"},
    "PipelineInfo": {"name": "s", "displayName": "s", "description": "s"},
    "ComponentSpec": {"inputDefinitions": "ComponentInputsSpec", "outputDefinitions": "ComponentOutputsSpec",
                      "dag": "DagSpec", "executorLabel": "s", "singlePlatformSpecs": "[SinglePlatformSpec]"},
    "DagSpec": {"tasks": "{PipelineTaskSpec}", "outputs": "DagOutputsSpec"},
    "DagOutputsSpec": {"artifacts": "{DagOutputsSpec.DagOutputArtifactSpec}",
                       "parameters": "{DagOutputsSpec.DagOutputParameterSpec}"},
    "DagOutputsSpec.ArtifactSelectorSpec": {"producerSubtask": "s", "outputArtifactKey": "s"},
    "DagOutputsSpec.DagOutputArtifactSpec": {"artifactSelectors": "[DagOutputsSpec.ArtifactSelectorSpec]"},
    "DagOutputsSpec.ParameterSelectorSpec": {"producerSubtask": "s", "outputParameterKey": "s"},
    "DagOutputsSpec.ParameterSelectorsSpec": {"parameterSelectors": "[DagOutputsSpec.ParameterSelectorSpec]"},
    "DagOutputsSpec.DagOutputParameterSpec": {"valueFromParameter": "DagOutputsSpec.ParameterSelectorSpec",
                                              "valueFromOneof": "DagOutputsSpec.ParameterSelectorsSpec"},
    "ComponentInputsSpec": {"artifacts": "{ComponentInputsSpec.ArtifactSpec}",
                            "parameters": "{ComponentInputsSpec.ParameterSpec}"},
    "ComponentInputsSpec.ArtifactSpec": {"artifactType": "ArtifactTypeSchema", "isArtifactList": "s",
                                         "isOptional": "s", "description": "s"},
    "ComponentInputsSpec.ParameterSpec": {"type": "s", "parameterType": "s", "defaultValue": "any",
                                          "isOptional": "s", "description": "s"},
    "ComponentOutputsSpec": {"artifacts": "{ComponentOutputsSpec.ArtifactSpec}",
                             "parameters": "{ComponentOutputsSpec.ParameterSpec}"},
    "ComponentOutputsSpec.ArtifactSpec": {"artifactType": "ArtifactTypeSchema",
                                          "properties": "{ValueOrRuntimeParameter}",
                                          "customProperties": "{ValueOrRuntimeParameter}", "metadata": "any",
                                          "isArtifactList": "s", "description": "s"},
    "ComponentOutputsSpec.ParameterSpec": {"type": "s", "parameterType": "s", "description": "s"},
    "TaskInputsSpec": {"parameters": "{TaskInputsSpec.InputParameterSpec}",
                       "artifacts": "{TaskInputsSpec.InputArtifactSpec}"},
    "TaskInputsSpec.InputArtifactSpec": {
        "taskOutputArtifact": "TaskInputsSpec.InputArtifactSpec.TaskOutputArtifactSpec",
        "componentInputArtifact": "s"},
    "TaskInputsSpec.InputArtifactSpec.TaskOutputArtifactSpec": {"producerTask": "s", "outputArtifactKey": "s"},
    "TaskInputsSpec.InputParameterSpec": {
        "taskOutputParameter": "TaskInputsSpec.InputParameterSpec.TaskOutputParameterSpec",
        "runtimeValue": "ValueOrRuntimeParameter", "componentInputParameter": "s",
        "taskFinalStatus": "TaskInputsSpec.InputParameterSpec.TaskFinalStatus",
        "parameterExpressionSelector": "s"},
    "TaskInputsSpec.InputParameterSpec.TaskOutputParameterSpec": {"producerTask": "s", "outputParameterKey": "s"},
    "TaskInputsSpec.InputParameterSpec.TaskFinalStatus": {"producerTask": "s"},
    "PipelineTaskSpec": {"taskInfo": "PipelineTaskInfo", "inputs": "TaskInputsSpec", "dependentTasks": "[s]",
                         "cachingOptions": "PipelineTaskSpec.CachingOptions", "componentRef": "ComponentRef",
                         "triggerPolicy": "PipelineTaskSpec.TriggerPolicy",
                         "artifactIterator": "ArtifactIteratorSpec", "parameterIterator": "ParameterIteratorSpec",
                         "retryPolicy": "PipelineTaskSpec.RetryPolicy",
                         "iteratorPolicy": "PipelineTaskSpec.IteratorPolicy"},
    "PipelineTaskSpec.CachingOptions": {"enableCache": "s", "cacheKey": "s"},
    "PipelineTaskSpec.TriggerPolicy": {"condition": "s", "strategy": "s"},
    "PipelineTaskSpec.RetryPolicy": {"maxRetryCount": "s", "backoffDuration": "s", "backoffFactor": "s",
                                     "backoffMaxDuration": "s"},
    "PipelineTaskSpec.IteratorPolicy": {"parallelismLimit": "s"},
    "ArtifactIteratorSpec": {"items": "ArtifactIteratorSpec.ItemsSpec", "itemInput": "s"},
    "ArtifactIteratorSpec.ItemsSpec": {"inputArtifact": "s"},
    "ParameterIteratorSpec": {"items": "ParameterIteratorSpec.ItemsSpec", "itemInput": "s"},
    "ParameterIteratorSpec.ItemsSpec": {"raw": "s", "inputParameter": "s"},
    "ComponentRef": {"name": "s"},
    "PipelineTaskInfo": {"name": "s"},
    "ArtifactTypeSchema": {"schemaTitle": "s", "schemaUri": "s", "instanceSchema": "s", "schemaVersion": "s"},
    "ValueOrRuntimeParameter": {"constantValue": "Value", "runtimeParameter": "s", "constant": "any"},
    "Value": {"intValue": "s", "doubleValue": "s", "stringValue": "s"},
    "PipelineDeploymentConfig": {"executors": "{PipelineDeploymentConfig.ExecutorSpec}"},
    "PipelineDeploymentConfig.ExecutorSpec": {"container": "PipelineDeploymentConfig.PipelineContainerSpec",
                                              "importer": "PipelineDeploymentConfig.ImporterSpec",
                                              "resolver": "PipelineDeploymentConfig.ResolverSpec",
                                              "customJob": "PipelineDeploymentConfig.AIPlatformCustomJobSpec"},
    "PipelineDeploymentConfig.PipelineContainerSpec": {
        "image": "s", "command": "[s]", "args": "[s]",
        "lifecycle": "PipelineDeploymentConfig.PipelineContainerSpec.Lifecycle",
        "resources": "PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec",
        "env": "[PipelineDeploymentConfig.PipelineContainerSpec.EnvVar]"},
    "PipelineDeploymentConfig.PipelineContainerSpec.Lifecycle": {
        "preCacheCheck": "PipelineDeploymentConfig.PipelineContainerSpec.Lifecycle.Exec"},
    "PipelineDeploymentConfig.PipelineContainerSpec.Lifecycle.Exec": {"command": "[s]", "args": "[s]"},
    "PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec": {
        "cpuLimit": "s", "memoryLimit": "s", "cpuRequest": "s", "memoryRequest": "s", "resourceCpuLimit": "s",
        "resourceMemoryLimit": "s", "resourceCpuRequest": "s", "resourceMemoryRequest": "s",
        "accelerator": "PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec.AcceleratorConfig"},
    "PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec.AcceleratorConfig": {
        "type": "s", "count": "s", "resourceType": "s", "resourceCount": "s"},
    "PipelineDeploymentConfig.PipelineContainerSpec.EnvVar": {"name": "s", "value": "s"},
    "PipelineDeploymentConfig.ImporterSpec": {"artifactUri": "ValueOrRuntimeParameter",
                                              "typeSchema": "ArtifactTypeSchema",
                                              "properties": "{ValueOrRuntimeParameter}",
                                              "customProperties": "{ValueOrRuntimeParameter}", "metadata": "any",
                                              "reimport": "s"},
    "PipelineDeploymentConfig.ResolverSpec": {
        "outputArtifactQueries": "{PipelineDeploymentConfig.ResolverSpec.ArtifactQuerySpec}"},
    "PipelineDeploymentConfig.ResolverSpec.ArtifactQuerySpec": {"filter": "s", "limit": "s"},
    "PipelineDeploymentConfig.AIPlatformCustomJobSpec": {"customJob": "any"},
    "PlatformSpec": {"platforms": "{SinglePlatformSpec}"},
    "SinglePlatformSpec": {"deploymentSpec": "PlatformDeploymentConfig", "platform": "s", "config": "any",
                           "pipelineConfig": "PipelineConfig"},
    # executors: map<string, Struct> in the proto; the driver reads each as a KubernetesExecutorConfig
    "PlatformDeploymentConfig": {"executors": "{kfp_kubernetes.KubernetesExecutorConfig}"},
    "PipelineConfig": {},
}
# The enum values 2.4.1 knows for the parameter types (ParameterType.ParameterTypeEnum).
PARAMETER_TYPES_2_4_1 = {"PARAMETER_TYPE_ENUM_UNSPECIFIED", "NUMBER_DOUBLE", "NUMBER_INTEGER", "STRING", "BOOLEAN",
                         "LIST", "STRUCT", "TASK_FINAL_STATUS"}

KUBERNETES_2_4_1: dict[str, dict[str, str]] = {
    "KubernetesExecutorConfig": {
        "secretAsVolume": "[SecretAsVolume]", "secretAsEnv": "[SecretAsEnv]", "pvcMount": "[PvcMount]",
        "nodeSelector": "NodeSelector", "podMetadata": "PodMetadata", "imagePullSecret": "[ImagePullSecret]",
        "imagePullPolicy": "s", "configMapAsVolume": "[ConfigMapAsVolume]", "configMapAsEnv": "[ConfigMapAsEnv]",
        "activeDeadlineSeconds": "s", "fieldPathAsEnv": "[FieldPathAsEnv]", "tolerations": "[Toleration]",
        "genericEphemeralVolume": "[GenericEphemeralVolume]", "nodeAffinity": "[NodeAffinityTerm]",
        "podAffinity": "[PodAffinityTerm]", "enabledSharedMemory": "EnabledSharedMemory",
        "emptyDirMounts": "[EmptyDirMount]"},
    "EnabledSharedMemory": {"volumeName": "s", "size": "s"},
    "SecretAsVolume": {"secretName": "s", "mountPath": "s", "optional": "s"},
    # no secretNameParameter and no optional (both arrive later): kfp-kubernetes 2.16.1 writes them, for_min_backend
    # removes them
    "SecretAsEnv": {"secretName": "s", "keyToEnv": "[SecretAsEnv.SecretKeyToEnvMap]"},
    "SecretAsEnv.SecretKeyToEnvMap": {"secretKey": "s", "envVar": "s"},
    "TaskOutputParameterSpec": {"producerTask": "s", "outputParameterKey": "s"},
    "PvcMount": {"taskOutputParameter": "TaskOutputParameterSpec", "constant": "s", "componentInputParameter": "s",
                 "mountPath": "s"},
    "NodeSelector": {"labels": "{s}"},
    "PodMetadata": {"labels": "{s}", "annotations": "{s}"},
    "ConfigMapAsVolume": {"configMapName": "s", "mountPath": "s", "optional": "s"},
    "ConfigMapAsEnv": {"configMapName": "s", "keyToEnv": "[ConfigMapAsEnv.ConfigMapKeyToEnvMap]"},
    "ConfigMapAsEnv.ConfigMapKeyToEnvMap": {"configMapKey": "s", "envVar": "s"},
    "GenericEphemeralVolume": {"volumeName": "s", "mountPath": "s", "accessModes": "[s]", "size": "s",
                               "defaultStorageClass": "s", "storageClassName": "s", "metadata": "PodMetadata"},
    "ImagePullSecret": {"secretName": "s"},
    "FieldPathAsEnv": {"name": "s", "fieldPath": "s"},
    "Toleration": {"key": "s", "operator": "s", "value": "s", "effect": "s", "tolerationSeconds": "s"},
    "SelectorRequirement": {"key": "s", "operator": "s", "values": "[s]"},
    "NodeAffinityTerm": {"matchExpressions": "[SelectorRequirement]", "matchFields": "[SelectorRequirement]",
                         "weight": "s"},
    "PodAffinityTerm": {"matchPodExpressions": "[SelectorRequirement]", "matchPodLabels": "{s}", "topologyKey": "s",
                        "namespaces": "[s]", "matchNamespaceExpressions": "[SelectorRequirement]",
                        "matchNamespaceLabels": "{s}", "weight": "s", "anti": "s"},
    "EmptyDirMount": {"volumeName": "s", "mountPath": "s", "medium": "s", "sizeLimit": "s"},
}

# Messages of 2.4.1 that the newer protos no longer have (kfp-kubernetes 2.16.1's PvcMount.taskOutputParameter is an
# ml_pipelines.TaskInputsSpec.InputParameterSpec.TaskOutputParameterSpec, with the same two fields).
REMOVED_SINCE_2_4_1 = {K8S + "TaskOutputParameterSpec"}

MESSAGES = {**{PS + name: fields for name, fields in PIPELINE_SPEC_2_4_1.items()},
            **{K8S + name: fields for name, fields in KUBERNETES_2_4_1.items()}}


def _qualify(kind: str, package: str) -> str:
    return kind if kind.startswith((PS, K8S)) else package + kind


def unknown_fields(value, message: str, where: str = "") -> list[str]:
    """Every field path in ``value`` (a message ``message``, fully qualified) that the 2.4.1 proto lacks."""
    package = message[: message.index(".") + 1]
    fields = MESSAGES[message]
    if not isinstance(value, dict):
        return [f"{where or message}: expected a {message} object, got {type(value).__name__}"]
    problems = []
    for key, item in value.items():
        path = f"{where}.{key}" if where else key
        kind = fields.get(key)
        if kind is None:
            problems.append(f"{path} (not a field of {message.removeprefix(package)} in KFP {MIN_KFP_BACKEND})")
            continue
        if kind in ("s", "any"):
            continue
        if kind in ("[s]", "{s}"):
            continue
        if kind.startswith("["):
            inner = _qualify(kind[1:-1], package)
            for i, element in enumerate(item):
                problems += unknown_fields(element, inner, f"{path}[{i}]")
        elif kind.startswith("{"):
            inner = _qualify(kind[1:-1], package)
            for name, element in item.items():
                problems += unknown_fields(element, inner, f"{path}.{name}")
        else:
            problems += unknown_fields(item, _qualify(kind, package), path)
    return problems


def _documents(path: Path = COMPILED) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform


def test_the_2_4_1_tables_are_transcribed_without_typos():
    """Every transcribed message and field exists in the installed, newer protos (kfp-pipeline-spec, kfp-kubernetes
    2.16.1), with the same cardinality: 2.4.1's are subsets of them."""
    from google.protobuf import descriptor_pool
    from kfp.kubernetes import kubernetes_executor_config_pb2  # noqa: F401 - registers kfp_kubernetes.*
    from kfp.pipeline_spec import pipeline_spec_pb2  # noqa: F401 - registers ml_pipelines.*

    pool = descriptor_pool.Default()
    for message, fields in MESSAGES.items():
        if message in REMOVED_SINCE_2_4_1:
            continue
        descriptor = pool.FindMessageTypeByName(message)
        by_json = {f.json_name: f for f in descriptor.fields}
        for name, kind in fields.items():
            assert name in by_json, f"{message}.{name} is in no kfp proto: a typo in the table"
            field = by_json[name]
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            repeated = field.is_repeated and not is_map
            assert kind.startswith("[") == repeated, f"{message}.{name}: repeated is {repeated}"
            assert kind.startswith("{") == is_map, f"{message}.{name}: map is {is_map}"


def test_compiled_yaml_uses_only_fields_the_minimum_backend_knows():
    spec, platform = _documents()
    problems = unknown_fields(spec, PS + "PipelineSpec") + unknown_fields(platform, PS + "PlatformSpec")
    assert not problems, f"fields KFP {MIN_KFP_BACKEND} does not know (it would drop them):\n" + "\n".join(problems)
    types = {p["parameterType"] for c in [spec["root"], *spec["components"].values()]
             for section in ("inputDefinitions", "outputDefinitions")
             for p in c.get(section, {}).get("parameters", {}).values()}
    assert types <= PARAMETER_TYPES_2_4_1
    assert spec["schemaVersion"] == "2.1.0"  # the only one 2.4.1 accepts (v2_template.go SCHEMA_VERSION_2_1_0)


def test_the_check_catches_what_kfp_kubernetes_2_16_writes_and_compile_strips_only_what_is_harmless(tmp_path):
    from kfp import compiler

    from pipelines.pipeline import make_pipeline

    raw = tmp_path / "raw.yaml"
    compiler.Compiler().compile(make_pipeline(1), str(raw))
    spec, platform = _documents(raw)
    problems = unknown_fields(platform, PS + "PlatformSpec")
    flagged = {re.sub(r"\[\d+\]", "", p.split(" ")[0]).rsplit(".", 1)[-1] for p in problems}
    assert flagged == {"secretNameParameter", "configMapNameParameter", "optional"}, problems

    stripped = for_min_backend(platform)
    assert not unknown_fields(stripped, PS + "PlatformSpec")
    for config in stripped["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        # the names 2.4.1 reads are still there
        assert [s["secretName"] for s in config["secretAsEnv"]] == ["clipline-store-credentials"]
        assert [c["configMapName"] for c in config["configMapAsEnv"]] == ["clipline-store"]

    parameterised = {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {"exec-x": {"secretAsEnv": [
        {"secretName": "", "secretNameParameter": {"componentInputParameter": "secret"}, "keyToEnv": []}]}}}}}}
    with pytest.raises(SubmitError, match="cannot resolve it"):
        for_min_backend(parameterised)
    optional = {"platforms": {"kubernetes": {"deploymentSpec": {"executors": {"exec-x": {"configMapAsEnv": [
        {"configMapName": "cm", "optional": True, "keyToEnv": []}]}}}}}}
    with pytest.raises(SubmitError, match="optional"):
        for_min_backend(optional)


def _quantity(value: str) -> float:
    units = {"m": 1e-3, "": 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "K": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", value).groups()
    return float(number) * units[unit]


def test_every_step_declares_resources_the_minimum_driver_reads():
    """2.4.1's driver takes each resource from resourceCpuLimit/... (strings, placeholders allowed) and falls back to
    cpuLimit/... (numbers: cores, GB) (backend/src/v2/driver/driver.go:365-497 getPodResource, initPodSpecPatch).
    kfp 2.16.1 writes both; they must agree, and every step must have all four (a ResourceQuota needs them)."""
    spec, _ = _documents()
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        for kind, old_unit in (("Cpu", 1), ("Memory", 1e9)):
            for bound in ("Request", "Limit"):
                new = resources[f"resource{kind}{bound}"]
                old = resources[f"{kind.lower()}{bound}"]
                assert _quantity(new) == pytest.approx(old * old_unit), (name, kind, bound)
            assert _quantity(resources[f"resource{kind}Request"]) <= _quantity(resources[f"resource{kind}Limit"])
        assert "accelerator" not in resources, name  # no step takes a GPU: the training job does
