"""The Kubeflow pipeline ``clip-pretrain``: gather URL lists -> ingest -> preprocess -> train (CLIPA stage 1 then 2)
-> evaluate -> promote.

Each component is a thin typed wrapper over a function in ``pipelines/steps.py`` and runs in our image with no
run-time pip install (``install_kfp_package=False``), so the same pipeline runs on a cluster and under kfp's local
SubprocessRunner (``clipline run``). Steps hand each other small JSON manifests as artifacts; shards, checkpoints and
models stay in the object store under the run prefix. Store credentials reach every pod from the Kubernetes Secret
``clipline-store-credentials`` and the endpoint from the ConfigMap ``clipline-store`` (see manifests/), never as
pipeline parameters. Caching is off: downloads, training and evaluation are not pure functions of their inputs.

Every step runs the image given to ``make_pipeline`` (``clipline compile --image REF``; default ``DEFAULT_IMAGE``),
which is also the default of the ``image`` parameter (the training job's pods), and every step declares CPU and
memory requests and limits (``STEP_RESOURCES``), as a namespace with a ResourceQuota requires.

``clipline compile`` writes ``pipelines/compiled/clip_pretrain.yaml`` (committed; a test fails when it is stale).
"""

# No `from __future__ import annotations`: kfp reads the components' type annotations as objects.
import re
from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output

from components.train.launch.jobspec import DEFAULT_IMAGE, STORE_CONFIG, STORE_SECRET

IMAGE = DEFAULT_IMAGE  # the committed pipeline's image (registry-qualified; override with `clipline compile --image`)


class ImageRefError(ValueError):
    """An image reference that is not registry-qualified with a tag or a digest."""


# The reference grammar of distribution/reference (docker's regexp.go), restricted to what a cluster can pull
# without guessing: an explicit registry host (with a dot or a port, or localhost), a path, and a tag and/or a
# sha256 digest. "clipline:0.1.0" would silently mean docker.io/library/clipline:0.1.0.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = rf"(?:(?:localhost|{_DOMAIN_PART}(?:\.{_DOMAIN_PART})+)(?::[0-9]+)?|{_DOMAIN_PART}:[0-9]+)"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(rf"^(?P<registry>{_REGISTRY})/(?P<repository>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
                       rf"(?::(?P<tag>[\w][\w.-]{{0,127}}))?(?:@(?P<digest>sha256:[0-9a-f]{{64}}))?$")


def check_image_ref(ref: str) -> str:
    """``ref`` if it is REGISTRY/REPOSITORY@sha256:<64 hex> or REGISTRY/REPOSITORY:TAG (or both); else an error
    that says what is wrong."""
    expected = ("give REGISTRY/REPOSITORY@sha256:DIGEST or REGISTRY/REPOSITORY:TAG, e.g. "
                "registry.example.com/clipline/clipline@sha256:<64 hex digits> or ...:0.1.0")
    match = IMAGE_REF.match(ref or "")
    if not match:
        first = (ref or "").split("/", 1)[0]
        if ref and ("/" not in ref or not re.fullmatch(_REGISTRY, first)):
            why = (f"it names no registry, so a cluster pulls it from Docker Hub "
                   f"(docker.io/{'library/' if '/' not in ref else ''}{ref.split('@')[0]})")
        elif "@" in (ref or "") and not re.search(r"@sha256:[0-9a-f]{64}$", ref):
            why = "its digest is not sha256: followed by 64 lowercase hex digits"
        else:
            why = "it is not a valid image reference (lowercase repository path, tag of [A-Za-z0-9_.-])"
        raise ImageRefError(f"image {ref!r}: {why}; {expected}")
    if not (match["tag"] or match["digest"]):
        raise ImageRefError(f"image {ref!r} has neither a tag nor a digest (it would mean the mutable :latest); "
                            f"{expected}")
    return ref


def gather_url_lists(url_list: str, run_prefix: str) -> str:
    """Concatenate several URL lists (a comma-separated list of URIs, or an s3:// prefix ending in "/") into one
    parquet under the run prefix, batch by batch; returns the list ingest reads (a single list or "demo" as is)."""
    from pipelines import steps

    return steps.gather_url_lists_step(url_list, run_prefix)["url_list"]


def ingest(url_list: str, run_prefix: str, demo_limit: int, seed: int, part: int, parts: int, allow_networks: str,
           max_image_bytes: int, raw: Output[Artifact]):
    """Download the URL list (or its part-th of parts contiguous parts) with img2dataset into webdataset shards;
    url_list "demo" builds the offline demo source."""
    import json

    from pipelines import steps

    doc = steps.ingest_step(url_list, run_prefix, demo_limit=demo_limit, seed=seed, part=part, parts=parts,
                            allow_networks=allow_networks, max_image_bytes=max_image_bytes)
    with open(raw.path, "w") as f:
        json.dump(doc, f)
    raw.metadata.update({"manifest": doc["manifest"], "success": doc["counts"].get("success")})


def merge_ingest(run_prefix: str, parts: int, url_list: str, raw: Output[Artifact]):
    """Join the ingest parts' manifests into one, in part order (so preprocess numbers samples as for one part)."""
    import json

    from pipelines import steps

    doc = steps.merge_ingest_step(run_prefix, parts, demo=url_list == steps.DEMO_SOURCE)
    with open(raw.path, "w") as f:
        json.dump(doc, f)
    raw.metadata.update({"manifest": doc["manifest"], "success": doc["counts"].get("success")})


def preprocess(raw: Input[Artifact], recipe: str, objective: str, run_prefix: str, train_data: Output[Artifact]):
    """Filter, deduplicate, densely index and resize the raw shards into training shards at the recipe's sizes."""
    import json

    from pipelines import steps

    with open(raw.path) as f:
        ingested = json.load(f)
    effective, _ = steps.effective_recipe(recipe, objective, run_prefix)
    doc = steps.preprocess_step(ingested["manifest"], run_prefix.rstrip("/") + "/train-data", effective)
    with open(train_data.path, "w") as f:
        json.dump(doc, f)
    train_data.metadata.update({"manifest": doc["manifest"], "num_samples": doc["num_samples"]})


def filter_part(raw: Input[Artifact], recipe: str, objective: str, run_prefix: str, part: int, parts: int) -> int:
    """Preprocess's filter phase (decode, reject, hash, resize, POS-tag) for one group of raw shards; returns the
    candidates kept. The preprocess step then merges the parts."""
    import json

    from pipelines import steps

    with open(raw.path) as f:
        ingested = json.load(f)
    effective, _ = steps.effective_recipe(recipe, objective, run_prefix)
    doc = steps.preprocess_part_step(ingested["manifest"], run_prefix.rstrip("/") + "/train-data", effective, part,
                                     parts)
    return doc["candidates"]


def train(train_data: Input[Artifact], recipe: str, objective: str, run_prefix: str, nodes: int, gpus_per_node: int,
          launcher: str, runtime: str, image: str, namespace: str, cpu_per_node: str, memory_per_node: str,
          shm_size: str, ephemeral_storage: str, node_selector: str, tolerations: str, priority_class: str,
          queue: str, gang_scheduler: str, nccl_env: str, max_restarts: int, model: Output[Artifact],
          metrics: Output[Metrics]):
    """Train the recipe's CLIPA stages: a Trainer v2 TrainJob (launcher=trainjob) or a PyTorchJob
    (launcher=pytorchjob) that this step submits and watches, or torchrun inside the step (launcher=local)."""
    import json

    from pipelines import steps

    if launcher not in ("trainjob", "pytorchjob", "local"):
        raise ValueError(f"launcher must be 'trainjob', 'pytorchjob' or 'local', got {launcher!r}")
    with open(train_data.path) as f:
        data = json.load(f)
    effective, recipe_uri = steps.effective_recipe(recipe, objective, run_prefix)
    output = run_prefix.rstrip("/") + "/train"
    if launcher == "local":
        doc = steps.train_step(recipe_uri, data["manifest"], output, nproc_per_node=max(1, gpus_per_node))
    else:
        # The job namespace defaults to this pod's own (POD_NAMESPACE from the downward API).
        doc = steps.train_on_cluster(effective, recipe_uri, data["manifest"], output, launcher=launcher, nodes=nodes,
                                     gpus_per_node=gpus_per_node, image=image, namespace=namespace, runtime=runtime,
                                     cpu=cpu_per_node, memory=memory_per_node, shm=shm_size,
                                     ephemeral=ephemeral_storage, node_selector=node_selector,
                                     tolerations=tolerations, priority_class=priority_class, queue=queue,
                                     gang_scheduler=gang_scheduler, nccl_env=nccl_env, max_restarts=max_restarts)
    with open(model.path, "w") as f:
        json.dump(doc, f)
    model.metadata.update({"model_manifest": doc["model"], "samples_seen": doc["samples_seen"],
                           "job": doc.get("job", "")})
    for name, value in (doc.get("metrics") or {}).items():
        metrics.log_metric(name, float(value))


def evaluate(model: Input[Artifact], raw: Input[Artifact], eval_datasets: str, run_prefix: str,
             evaluation: Output[Artifact], metrics: Output[Metrics], report: Output[HTML]):
    """Zero-shot classification and retrieval; the HTML report and the metrics show in the KFP UI."""
    import json

    from components.common import store
    from components.evaluate.report import log_kfp_metrics
    from pipelines import steps

    with open(model.path) as f:
        trained = json.load(f)
    with open(raw.path) as f:
        ingested = json.load(f)
    datasets = [d.strip() for d in eval_datasets.split(",") if d.strip()]
    doc = steps.evaluate_step(trained["model"], run_prefix.rstrip("/") + "/evaluate", datasets=datasets,
                              demo_ingest_manifest=ingested["manifest"] if ingested["demo"] else None,
                              training_log=trained["log"])
    with open(evaluation.path, "w") as f:
        json.dump(doc, f)
    with open(report.path, "wb") as f:
        f.write(store.get_bytes(doc["report"]))
    log_kfp_metrics(metrics, store.get_json(doc["metrics"]))


def promote(model: Input[Artifact], evaluation: Input[Artifact], models_prefix: str, metric: str, tolerance: float,
            decision: Output[Markdown]) -> bool:
    """Make the model the `latest` under models_prefix unless it scores worse than the current one by more than
    the tolerance; the decision and both scores go into the step's Markdown output."""
    import json

    from pipelines import steps

    with open(model.path) as f:
        trained = json.load(f)
    with open(evaluation.path) as f:
        evaluated = json.load(f)
    doc = steps.promote_step(trained["model"], evaluated, models_prefix, metric=metric, tolerance=tolerance)
    baseline = "none" if doc["baseline"] is None else f"{doc['baseline']:.4f}"
    with open(decision.path, "w") as f:
        f.write(f"# Promotion\n\n| | {metric} |\n|---|---:|\n| new model | {doc['score']:.4f} |\n"
                f"| current latest | {baseline} |\n\n**{'promoted' if doc['promoted'] else 'not promoted'}**: "
                f"{doc['reason']}\n")
    return doc["promoted"]


STEP_FUNCTIONS = (gather_url_lists, ingest, merge_ingest, filter_part, preprocess, train, evaluate, promote)

# CPU and memory (request, limit) per step. Every container declares both: a namespace whose ResourceQuota covers
# cpu/memory (a Kubeflow Profile's resourceQuotaSpec) rejects pods that do not. Memory limit = request where a step's
# peak is known (no overcommit to be OOM-killed on a busy node); CPU may burst to the limit.
STEP_RESOURCES = {
    # streams the lists batch by batch; the merged parquet is written to its /scratch emptyDir
    "gather_url_lists": {"cpu": ("500m", "1"), "memory": ("1Gi", "2Gi")},
    # img2dataset: one worker process per CPU of the limit, 32 download threads each
    "ingest": {"cpu": ("2", "4"), "memory": ("4Gi", "8Gi")},
    "merge_ingest": {"cpu": ("250m", "1"), "memory": ("512Mi", "1Gi")},
    # decode, resize, hash, POS-tag: one process per CPU of the limit (components/preprocess/options.py)
    "filter_part": {"cpu": ("4", "4"), "memory": ("8Gi", "8Gi")},
    "preprocess": {"cpu": ("4", "4"), "memory": ("8Gi", "8Gi")},
    # on the cluster it only submits and watches the job (and streams its log); it must outlive the job
    "train": {"cpu": ("250m", "1"), "memory": ("1Gi", "2Gi")},
    # zero-shot classification and retrieval on CPU (torch threads = the CPU limit)
    "evaluate": {"cpu": ("4", "8"), "memory": ("16Gi", "16Gi")},
    "promote": {"cpu": ("100m", "500m"), "memory": ("256Mi", "512Mi")},
}
GATHER_SCRATCH = {"volume_name": "scratch", "mount_path": "/scratch", "size_limit": "64Gi"}
# The train step's own pod, from the downward API: the job's ownerReference and default namespace.
POD_FIELDS = {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_UID": "metadata.uid"}


def components(image: str = IMAGE) -> SimpleNamespace:
    """The pipeline's components, each running ``image``."""
    check_image_ref(image)
    return SimpleNamespace(**{fn.__name__: dsl.component(base_image=image, install_kfp_package=False)(fn)
                              for fn in STEP_FUNCTIONS})


def _size(task, step: str):
    cpu, memory = STEP_RESOURCES[step]["cpu"], STEP_RESOURCES[step]["memory"]
    return (task.set_cpu_request(cpu[0]).set_cpu_limit(cpu[1])
            .set_memory_request(memory[0]).set_memory_limit(memory[1]))


def make_pipeline(parts: int = 1, image: str = IMAGE):
    """The pipeline with ingest and preprocess's filter phase fanned out over ``parts`` pods each (built here, at
    construction, rather than with dsl.ParallelFor, which kfp's local runner cannot run), every step running
    ``image`` (also the default of the ``image`` parameter, the training job's)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    c = components(image)

    @dsl.pipeline(name="clip-pretrain")
    def clip_pretrain(
        run_prefix: str,
        url_list: str = "demo",
        recipe: str = "configs/demo.yaml",
        objective: str = "",
        nodes: int = 1,
        gpus_per_node: int = 0,
        eval_datasets: str = "",
        models_prefix: str = "s3://clipline/models",
        promote_metric: str = "acc1",
        promote_tolerance: float = 0.01,
        demo_limit: int = 3000,
        seed: int = 0,
        allow_networks: str = "",
        max_image_bytes: int = 33554432,
        launcher: str = "trainjob",
        runtime: str = "clipline-torch",
        image: str = image,
        namespace: str = "",
        cpu_per_node: str = "",
        memory_per_node: str = "",
        shm_size: str = "",
        ephemeral_storage: str = "",
        node_selector: str = "",
        tolerations: str = "",
        priority_class: str = "",
        queue: str = "",
        gang_scheduler: str = "",
        nccl_env: str = "",
        max_restarts: int = 2,
    ) -> NamedTuple("Outputs", [("raw", Artifact), ("train_data", Artifact), ("model", Artifact),
                                ("evaluation", Artifact), ("promoted", bool)]):
        """Train a CLIP model from lists of image URLs with captions, evaluate it zero-shot, and promote it.

        Args:
            run_prefix: s3:// prefix for everything this run writes (shards, checkpoints, model, report); a new one
                per run.
            url_list: URL list (parquet, csv, tsv or jsonl with url and caption columns, csv/tsv/jsonl optionally
                .gz; s3:// URI); several lists as comma-separated URIs or an s3:// prefix ending in "/" (the
                gather step concatenates them, same columns required); or "demo" for the offline demo images.
            recipe: training recipe YAML: a path inside the image (configs/...) or an s3:// URI.
            objective: override the recipe's objective (clip, siglip, fastclip, amorlip, with that objective's
                defaults); empty keeps the recipe's.
            nodes: training nodes (pods of the training job).
            gpus_per_node: GPUs per training node (0 trains on CPUs, one process per node).
            eval_datasets: comma-separated s3:// prefixes of zero-shot benchmarks in CLIP_benchmark's webdataset
                layout; a demo run also evaluates on the demo's held-out split.
            models_prefix: where the promoted model pointer (latest.json) and the decisions live.
            promote_metric: evaluation metric averaged over the datasets that report it (acc1, acc5,
                mean_per_class_recall, image_retrieval_recall@5, ...); higher is better.
            promote_tolerance: promote unless the new score is below the latest model's by more than this.
            demo_limit: demo source only: images per source.
            seed: seed of the demo's held-out split.
            allow_networks: comma-separated CIDRs ingest may fetch from although they are not public (e.g. your
                own image servers, 10.20.0.0/16); loopback, private, link-local (cloud metadata), CGNAT and
                multicast addresses are refused otherwise. Only http and https URLs are ever fetched.
            max_image_bytes: responses larger than this are dropped before decoding (counted as refused: size).
            launcher: trainjob (a Kubeflow Trainer v2 TrainJob, Kubeflow >= 1.11), pytorchjob (a training-operator
                v1 PyTorchJob), or local (torchrun inside the step: for clipline run on one machine).
            runtime: launcher trainjob: the ClusterTrainingRuntime the TrainJob references (clipline-torch, shipped
                in manifests/, or the stock torch-distributed).
            image: container image of the training job's pods (registry-qualified, ideally by digest); defaults to
                the image this pipeline was compiled with.
            namespace: Kubernetes namespace of the training job; empty = the train step's own namespace (the KFP
                namespace on standalone KFP, the profile namespace on multi-user Kubeflow).
            cpu_per_node: CPU request and limit of each training pod (e.g. 48); empty = derived from the GPU count.
            memory_per_node: memory request and limit of each training pod (e.g. 384Gi); empty = derived from the
                GPU count.
            shm_size: size of each training pod's memory-backed /dev/shm (e.g. 64Gi; counts against its memory);
                empty = derived from the GPU count.
            ephemeral_storage: ephemeral-storage request and limit of each training pod (e.g. 100Gi); empty = the
                default.
            node_selector: node labels the training pods must match, "key=value,key2=value2"; empty = none.
            tolerations: taints the training pods tolerate, "key=value:Effect,key:Effect" (no value: operator
                Exists; no effect: any effect); empty = none.
            priority_class: priority of the training pods: pytorchjob: their PriorityClass; trainjob: the Kueue
                WorkloadPriorityClass (needs queue); empty = the cluster default.
            queue: trainjob: the Kueue LocalQueue (label kueue.x-k8s.io/queue-name; Kueue admits the whole job at
                once); pytorchjob with gang_scheduler: the scheduler's queue (e.g. a Volcano queue); empty = none.
            gang_scheduler: pytorchjob only: the gang scheduler the pods use (schedulerName, e.g. volcano; all nodes
                start together); empty = the default scheduler. A TrainJob gets gang admission through queue.
            nccl_env: extra NCCL/torch environment of the training pods, "NCCL_SOCKET_IFNAME=eth0,NCCL_IB_HCA=mlx5"
                (nothing is forced by default).
            max_restarts: restarts of the whole job after a failure, each resuming from the latest checkpoint.
        """
        gathered = c.gather_url_lists(url_list=url_list, run_prefix=run_prefix).set_display_name("gather URL lists")
        lists = gathered.output
        if parts == 1:
            raw = c.ingest(url_list=lists, run_prefix=run_prefix, demo_limit=demo_limit, seed=seed, part=0,
                           parts=1, allow_networks=allow_networks, max_image_bytes=max_image_bytes)
            fan_out = []
        else:
            fan_out = [c.ingest(url_list=lists, run_prefix=run_prefix, demo_limit=demo_limit, seed=seed, part=k,
                                parts=parts, allow_networks=allow_networks, max_image_bytes=max_image_bytes)
                       .set_display_name(f"ingest part {k + 1}/{parts}") for k in range(parts)]
            raw = c.merge_ingest(run_prefix=run_prefix, parts=parts, url_list=lists).after(*fan_out)
        filtered = [c.filter_part(raw=raw.outputs["raw"], recipe=recipe, objective=objective, run_prefix=run_prefix,
                                  part=k, parts=parts).set_display_name(f"preprocess filter part {k + 1}/{parts}")
                    for k in range(parts)] if parts > 1 else []
        data = c.preprocess(raw=raw.outputs["raw"], recipe=recipe, objective=objective,
                            run_prefix=run_prefix).after(*filtered)
        trained = c.train(train_data=data.outputs["train_data"], recipe=recipe, objective=objective,
                          run_prefix=run_prefix, nodes=nodes, gpus_per_node=gpus_per_node, launcher=launcher,
                          runtime=runtime, image=image, namespace=namespace, cpu_per_node=cpu_per_node,
                          memory_per_node=memory_per_node, shm_size=shm_size, ephemeral_storage=ephemeral_storage,
                          node_selector=node_selector, tolerations=tolerations, priority_class=priority_class,
                          queue=queue, gang_scheduler=gang_scheduler, nccl_env=nccl_env, max_restarts=max_restarts)
        evaluated = c.evaluate(model=trained.outputs["model"], raw=raw.outputs["raw"], eval_datasets=eval_datasets,
                               run_prefix=run_prefix)
        promoted = c.promote(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"],
                             models_prefix=models_prefix, metric=promote_metric, tolerance=promote_tolerance)
        steps = [(gathered, "gather_url_lists"), *((t, "ingest") for t in fan_out),
                 (raw, "ingest" if parts == 1 else "merge_ingest"), *((t, "filter_part") for t in filtered),
                 (data, "preprocess"), (trained, "train"), (evaluated, "evaluate"), (promoted, "promote")]
        for task, step in steps:
            _size(task, step)
            task.set_caching_options(False)
            kubernetes.use_secret_as_env(task, secret_name=STORE_SECRET, secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
            kubernetes.use_config_map_as_env(task, config_map_name=STORE_CONFIG, config_map_key_to_env={
                "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_REGION": "AWS_REGION"})
        kubernetes.empty_dir_mount(gathered, **GATHER_SCRATCH)
        gathered.set_env_variable("CLIPLINE_SCRATCH", GATHER_SCRATCH["mount_path"])
        trained.set_display_name("train (CLIPA stage 1 then 2)")
        for env_name, field_path in POD_FIELDS.items():
            kubernetes.use_field_path_as_env(trained, env_name=env_name, field_path=field_path)
        outputs = NamedTuple("Outputs", [("raw", Artifact), ("train_data", Artifact), ("model", Artifact),
                                         ("evaluation", Artifact), ("promoted", bool)])
        return outputs(raw.outputs["raw"], data.outputs["train_data"], trained.outputs["model"],
                       evaluated.outputs["evaluation"], promoted.outputs["Output"])

    return clip_pretrain


DEFAULT_PARTS = 4  # the compiled pipeline's fan-out of ingest and preprocess (clipline compile --parts)
clip_pretrain = make_pipeline(DEFAULT_PARTS)
