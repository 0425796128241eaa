"""torchx component for the trainer.

Locally: ``torchx run -s local_cwd components/train/launch/component.py:train --recipe configs/demo.yaml``.
On Kubeflow: ``torchx run -s pytorchjob ... components/train/launch/component.py:train --recipe ... --nnodes 3``.

The single role runs ``torchrun`` with explicit ``--nnodes``/``--nproc_per_node`` on ``components.train.main``.
The ``pytorchjob`` scheduler re-uses the role's args after ``torchrun`` and supplies the rendezvous flags that the
training operator's injected environment (MASTER_ADDR, MASTER_PORT, ...) calls for.
"""


from typing import Dict, Optional

import torchx.specs as specs

DEFAULT_IMAGE = "clipline-train:0.1.0"
TRAIN_MODULE = "components.train.main"
ROLE_NAME = "trainer"


def train(
    recipe: str,
    *,
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
        recipe: path of the training recipe (YAML) inside the image / working directory
        nnodes: number of nodes (pods)
        nproc_per_node: processes per node (usually the GPU count per node)
        image: container image holding the project (ignored by local_cwd)
        name: job name
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables (e.g. A=1,B=2)
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on rank 0 (multi-node only)
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    args = [f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}"]
    # Locally (local_cwd) every replica runs on this host: c10d rendezvous on localhost. The pytorchjob scheduler
    # drops these rendezvous flags and uses the operator's injected PET_MASTER_ADDR/PET_MASTER_PORT/PET_NODE_RANK.
    if nnodes == 1:
        args += ["--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    else:
        args += ["--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{rdzv_port}", f"--rdzv_id={specs.macros.app_id}"]
    args += ["-m", TRAIN_MODULE, "--recipe", recipe]
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
