"""The Kubeflow pipeline ``clip-pretrain``: ingest -> preprocess -> train (CLIPA stage 1 then 2) -> evaluate -> promote.

Each component is a thin typed wrapper over a function in ``pipelines/steps.py`` and runs in our image with no
run-time pip install (``install_kfp_package=False``), so the same pipeline runs on a cluster and under kfp's local
SubprocessRunner (``clipline run``). Steps hand each other small JSON manifests as artifacts; shards, checkpoints and
models stay in the object store under the run prefix. Store credentials reach every pod from the Kubernetes Secret
``clipline-store-credentials`` and the endpoint from the ConfigMap ``clipline-store`` (see manifests/), never as
pipeline parameters. Caching is off: downloads, training and evaluation are not pure functions of their inputs.

``clipline compile`` writes ``pipelines/compiled/clip_pretrain.yaml`` (committed; a test fails when it is stale).
"""

# No `from __future__ import annotations`: kfp reads the components' type annotations as objects.
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output

IMAGE = "clipline:0.1.0"
STORE_SECRET = "clipline-store-credentials"
STORE_CONFIG = "clipline-store"
SERVICE_ACCOUNT = "clipline-pipeline"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(url_list: str, run_prefix: str, demo_limit: int, seed: int, part: int, parts: int,
           raw: Output[Artifact]):
    """Download the URL list (or its part-th of parts contiguous parts) with img2dataset into webdataset shards;
    url_list "demo" builds the offline demo source."""
    import json

    from pipelines import steps

    doc = steps.ingest_step(url_list, run_prefix, demo_limit=demo_limit, seed=seed, part=part, parts=parts)
    with open(raw.path, "w") as f:
        json.dump(doc, f)
    raw.metadata.update({"manifest": doc["manifest"], "success": doc["counts"].get("success")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_ingest(run_prefix: str, parts: int, url_list: str, raw: Output[Artifact]):
    """Join the ingest parts' manifests into one, in part order (so preprocess numbers samples as for one part)."""
    import json

    from pipelines import steps

    doc = steps.merge_ingest_step(run_prefix, parts, demo=url_list == steps.DEMO_SOURCE)
    with open(raw.path, "w") as f:
        json.dump(doc, f)
    raw.metadata.update({"manifest": doc["manifest"], "success": doc["counts"].get("success")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
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


@dsl.component(base_image=IMAGE, install_kfp_package=False)
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


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(train_data: Input[Artifact], recipe: str, objective: str, run_prefix: str, nodes: int,
          gpus_per_node: int, launcher: str, image: str, namespace: str, model: Output[Artifact]):
    """Train the recipe's CLIPA stages: a PyTorchJob on the cluster (launcher=pytorchjob), torchrun here (local)."""
    import json

    from pipelines import steps

    with open(train_data.path) as f:
        data = json.load(f)
    effective, recipe_uri = steps.effective_recipe(recipe, objective, run_prefix)
    output = run_prefix.rstrip("/") + "/train"
    if launcher == "local":
        doc = steps.train_step(recipe_uri, data["manifest"], output, nproc_per_node=max(1, gpus_per_node))
    elif launcher == "pytorchjob":
        # Literals, not the module's constants: kfp embeds only this function's source in the component.
        doc = steps.train_on_cluster(effective, recipe_uri, data["manifest"], output, nodes=nodes,
                                     gpus_per_node=gpus_per_node, image=image, namespace=namespace,
                                     secret="clipline-store-credentials", service_account="clipline-pipeline")
    else:
        raise ValueError(f"launcher must be 'pytorchjob' or 'local', got {launcher!r}")
    with open(model.path, "w") as f:
        json.dump(doc, f)
    model.metadata.update({"model_manifest": doc["model"], "samples_seen": doc["samples_seen"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
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
                              demo_ingest_prefix=ingested["prefix"] if ingested["demo"] else None,
                              training_log=trained["log"])
    with open(evaluation.path, "w") as f:
        json.dump(doc, f)
    with open(report.path, "wb") as f:
        f.write(store.get_bytes(doc["report"]))
    log_kfp_metrics(metrics, json.loads(store.get_bytes(doc["metrics"])))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
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


def make_pipeline(parts: int = 1):
    """The pipeline with ingest and preprocess's filter phase fanned out over ``parts`` pods each (built here, at
    construction, rather than with dsl.ParallelFor, which kfp's local runner cannot run)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")

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
        launcher: str = "pytorchjob",
        image: str = IMAGE,
        namespace: str = "clipline",
    ) -> NamedTuple("Outputs", [("raw", Artifact), ("train_data", Artifact), ("model", Artifact),
                                ("evaluation", Artifact), ("promoted", bool)]):
        """Train a CLIP model from a list of image URLs with captions, evaluate it zero-shot, and promote it.

        Args:
            run_prefix: s3:// prefix for everything this run writes (shards, checkpoints, model, report); a new one
                per run.
            url_list: URL list (parquet, csv, tsv or jsonl with url and caption columns; s3:// URI), or "demo" for the
                offline demo images.
            recipe: training recipe YAML: a path inside the image (configs/...) or an s3:// URI.
            objective: override the recipe's objective (clip, siglip, fastclip, amorlip, with that objective's
                defaults); empty keeps the recipe's.
            nodes: training nodes (pods of the PyTorchJob).
            gpus_per_node: GPUs per training node (0 trains on CPUs, one process per node).
            eval_datasets: comma-separated s3:// prefixes of zero-shot benchmarks in CLIP_benchmark's webdataset
                layout; a demo run also evaluates on the demo's held-out split.
            models_prefix: where the promoted model pointer (latest.json) and the decisions live.
            promote_metric: evaluation metric averaged over the datasets that report it (acc1, acc5,
                mean_per_class_recall, image_retrieval_recall@5, ...); higher is better.
            promote_tolerance: promote unless the new score is below the latest model's by more than this.
            demo_limit: demo source only: images per source.
            seed: seed of the demo's held-out split.
            launcher: pytorchjob (train on the cluster) or local (torchrun inside the step, for clipline run).
            image: container image of the training job.
            namespace: Kubernetes namespace of the training job.
        """
        if parts == 1:
            raw = ingest(url_list=url_list, run_prefix=run_prefix, demo_limit=demo_limit, seed=seed, part=0, parts=1)
            fan_out = []
        else:
            fan_out = [ingest(url_list=url_list, run_prefix=run_prefix, demo_limit=demo_limit, seed=seed, part=k,
                              parts=parts).set_display_name(f"ingest part {k + 1}/{parts}") for k in range(parts)]
            raw = merge_ingest(run_prefix=run_prefix, parts=parts, url_list=url_list).after(*fan_out)
        filtered = [filter_part(raw=raw.outputs["raw"], recipe=recipe, objective=objective, run_prefix=run_prefix,
                                part=k, parts=parts).set_display_name(f"preprocess filter part {k + 1}/{parts}")
                    for k in range(parts)] if parts > 1 else []
        fan_out += filtered
        data = preprocess(raw=raw.outputs["raw"], recipe=recipe, objective=objective,
                          run_prefix=run_prefix).after(*filtered)
        trained = train(train_data=data.outputs["train_data"], recipe=recipe, objective=objective,
                        run_prefix=run_prefix, nodes=nodes, gpus_per_node=gpus_per_node, launcher=launcher, image=image,
                        namespace=namespace)
        evaluated = evaluate(model=trained.outputs["model"], raw=raw.outputs["raw"], eval_datasets=eval_datasets,
                             run_prefix=run_prefix)
        promoted = promote(model=trained.outputs["model"], evaluation=evaluated.outputs["evaluation"],
                           models_prefix=models_prefix, metric=promote_metric, tolerance=promote_tolerance)
        for task in (*fan_out, raw, data, trained, evaluated, promoted):
            task.set_caching_options(False)
            kubernetes.use_secret_as_env(task, secret_name=STORE_SECRET, secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
            kubernetes.use_config_map_as_env(task, config_map_name=STORE_CONFIG, config_map_key_to_env={
                "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "AWS_REGION": "AWS_REGION"})
        trained.set_display_name("train (CLIPA stage 1 then 2)")
        # The train step only submits and watches the PyTorchJob: little CPU, but it must outlive the job.
        trained.set_cpu_limit("1").set_memory_limit("2G")
        outputs = NamedTuple("Outputs", [("raw", Artifact), ("train_data", Artifact), ("model", Artifact),
                                         ("evaluation", Artifact), ("promoted", bool)])
        return outputs(raw.outputs["raw"], data.outputs["train_data"], trained.outputs["model"],
                       evaluated.outputs["evaluation"], promoted.outputs["Output"])

    return clip_pretrain


DEFAULT_PARTS = 4  # the compiled pipeline's fan-out of ingest and preprocess (clipline compile --parts)
clip_pretrain = make_pipeline(DEFAULT_PARTS)
