"""torchx component for the trainer.

Locally: ``torchx run -s local_cwd components/train/launch/component.py:train --recipe configs/demo.yaml
--data s3://bucket/run/train-data/manifest.json --output s3://bucket/run/train --nproc_per_node 2``.
On Kubeflow: ``torchx run -s trainjob ... components/train/launch/component.py:train --recipe ... --nnodes 3``
(Trainer v2; ``-s pytorchjob`` for training-operator v1).

The recipe is checked here, before anything is launched, when its file is readable from where torchx runs
(batch divisible by the world size, text lengths within the model's context, ...): a bad value fails in seconds.

The single role runs ``torchrun`` with explicit ``--nnodes``/``--nproc_per_node`` on ``components.train.main``.
The cluster schedulers (scheduler.py) keep the role's program and process count and replace its rendezvous with
one over the operator's injected PET_MASTER_ADDR/PET_MASTER_PORT (jobspec.JobSpec.torchrun).
"""


import os
from typing import Dict, Optional

import torchx.specs as specs

from components.train.launch.jobspec import DEFAULT_IMAGE

TRAIN_MODULE = "components.train.main"
ROLE_NAME = "trainer"


def train(
    recipe: str,
    data: str,
    output: str,
    *,
    resume: str = "auto",
    deterministic: bool = False,
    max_restarts: int = 0,
    pg_timeout_minutes: float = 30.0,
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = DEFAULT_IMAGE,
    name: str = "clipline-train",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Train a CLIP model from a recipe.

    Args:
        recipe: path of the training recipe (YAML) inside the image / working directory, or a store URI
        data: URI of the training data's manifest (preprocess's manifest.json)
        output: URI prefix for checkpoints, logs, TensorBoard and the exported model
        resume: auto (latest checkpoint under output), never, or a checkpoint URI
        deterministic: deterministic kernels (a resumed run repeats the uninterrupted run's losses)
        max_restarts: times torchrun restarts the ranks after a failure (each restart resumes from a checkpoint)
        pg_timeout_minutes: how long a collective waits for a dead or slow rank
        nnodes: number of nodes (pods)
        nproc_per_node: processes per node (usually the GPU count per node)
        image: container image holding the project (ignored by local_cwd)
        name: job name
        cpu: CPUs per node of a CPU-only job (with GPUs the cluster schedulers derive CPU, memory and /dev/shm from
            the GPU count; -cfg cpu=/memory= override)
        gpu: GPUs per node
        memMB: memory per node in MB of a CPU-only job (as cpu)
        env: extra environment variables (e.g. A=1,B=2)
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on rank 0 (multi-node only)
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    _check_recipe_if_readable(recipe, nnodes * nproc_per_node)
    args = [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}", f"--max-restarts={max_restarts}"]
    # Locally (local_cwd) every replica runs on this host: c10d rendezvous on localhost. The pytorchjob scheduler
    # drops these rendezvous flags and uses the operator's injected PET_MASTER_ADDR/PET_MASTER_PORT/PET_NODE_RANK.
    if nnodes == 1:
        args += ["--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    else:
        args += ["--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{rdzv_port}", f"--rdzv_id={specs.macros.app_id}"]
    args += ["-m", TRAIN_MODULE, "--recipe", recipe, "--data", data, "--output", output, "--resume", resume,
             f"--pg-timeout-minutes={pg_timeout_minutes}"]
    if deterministic:
        args.append("--deterministic")
    role = specs.Role(
        name=ROLE_NAME,
        image=image,
        entrypoint="torchrun",
        args=args,
        num_replicas=nnodes,
        min_replicas=nnodes,
        resource=specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB),
        env={"LOGLEVEL": "INFO", **(env or {})},
        max_retries=max_retries,
        port_map={"c10d": rdzv_port},
    )
    return specs.AppDef(name=name, roles=[role])


def _check_recipe_if_readable(recipe: str, world_size: int) -> None:
    """Fail before launching when the recipe is readable here and does not fit the job (ConfigError names the key).

    A recipe path that exists only inside the image (a cluster launch from a laptop) is checked by the ranks."""
    if "://" not in recipe and not os.path.isfile(recipe):
        return
    from components.train.main import read_recipe
    from components.train.plan import check_recipe

    check_recipe(read_recipe(recipe), world_size, source=recipe)
