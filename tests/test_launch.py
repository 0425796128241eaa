"""The launch package without a cluster: the torchx component, JobSpec from torchx apps (ours and torchx's stock
``dist.ddp``), both targets' objects over a grid of shapes checked against the upstream CRDs (schema + CEL rules)
and the operators' webhook rules, and the torchx schedulers through torchx's own CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torchx.components.dist import ddp
from torchx.specs import AppState

from components.train.launch import pytorchjob, trainjob
from components.train.launch.component import train
from components.train.launch.jobspec import (
    DEFAULT_IMAGE,
    JobSpecError,
    derived_resources,
    from_app,
    job_name,
    parse_tolerations,
    unwrap_torchrun,
)
from components.train.launch.scheduler import create_pytorchjob_scheduler, create_trainjob_scheduler
from components.train.launch.validation import JobValidationError, validate_object

REPO = Path(__file__).resolve().parents[1]
DATA, OUTPUT = "s3://clipline/run/train-data/manifest.json", "s3://clipline/run/train"
TARGETS = {"trainjob": trainjob.TARGET, "pytorchjob": pytorchjob.TARGET}


def _spec(nnodes=1, nproc=1, gpu=0, **cfg):
    app = train("configs/demo.yaml", DATA, OUTPUT, nnodes=nnodes, nproc_per_node=nproc, gpu=gpu)
    return from_app(app, {"namespace": "ml", **cfg})


def _command(job):
    if job["kind"] == "TrainJob":
        return job["spec"]["trainer"]["command"]
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]


def _pod_specs(job):
    """(pod-level fields, trainer container) as the operator will create them, for either target."""
    if job["kind"] == "TrainJob":
        patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        tmpl = patch["template"]["spec"]["template"]
        yield tmpl["metadata"], tmpl["spec"], {**tmpl["spec"]["containers"][0], **job["spec"]["trainer"],
                                               "resources": job["spec"]["trainer"]["resourcesPerNode"]}
    else:
        for rs in job["spec"]["pytorchReplicaSpecs"].values():
            yield rs["template"]["metadata"], rs["template"]["spec"], rs["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------------------------------------------ component
def test_component_builds_torchrun_appdef():
    app = train("configs/demo.yaml", DATA, OUTPUT, nnodes=2, nproc_per_node=4, gpu=4)
    (role,) = app.roles
    assert role.entrypoint == "torchrun" and role.num_replicas == 2 and role.image == DEFAULT_IMAGE
    assert "--nnodes=2" in role.args and "--nproc_per_node=4" in role.args
    i = role.args.index("-m")
    assert role.args[i:] == ["-m", "components.train.main", "--recipe", "configs/demo.yaml", "--data", DATA,
                             "--output", OUTPUT, "--resume", "auto", "--pg-timeout-minutes=30.0"]


def test_component_resolves_under_local_cwd():
    out = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "--dryrun", "-s", "local_cwd", "--workspace", "",
         "components/train/launch/component.py:train", "--recipe", "configs/demo.yaml", "--data", DATA,
         "--output", OUTPUT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "components.train.main" in out.stdout and "torchrun" in out.stdout


# ------------------------------------------------------------------------------------------------------ JobSpec
def test_our_component_keeps_program_and_drops_its_rendezvous():
    spec = _spec(nnodes=4, nproc=2, gpu=2)
    assert (spec.nnodes, spec.nproc_per_node, spec.resources.gpus) == (4, 2, 2)
    assert spec.program[:2] == ("-m", "components.train.main")
    assert not any(a.startswith(("--rdzv", "--nnodes", "--nproc")) for a in spec.program)


def test_stock_ddp_is_unwrapped_not_nested():
    app = ddp("--lr", "0.1", script="train.py", j="2x4", gpu=4, max_retries=2)
    (role,) = app.roles
    assert role.entrypoint == "bash" and "torchrun" in role.args[1]  # torchx wraps torchrun in bash -c
    spec = from_app(app, {"namespace": "ml"})
    assert (spec.nnodes, spec.nproc_per_node, spec.max_restarts) == (2, 4, 2)
    assert spec.program == ("--tee", "3", "--role", "", "train.py", "--lr", "0.1")
    command = spec.torchrun()
    assert command.count("torchrun") == 1 and "--nproc_per_node=4" in command
    assert "--rdzv_endpoint=$(PET_MASTER_ADDR):$(PET_MASTER_PORT)" in command


@pytest.mark.parametrize("entrypoint, args, program, owned", [
    ("torchrun", ["--nnodes", "2", "--nproc-per-node=3", "--max-restarts", "1", "-m", "pkg.mod", "--nnodes", "9"],
     ["-m", "pkg.mod", "--nnodes", "9"], {"nnodes": "2", "nproc_per_node": "3", "max_restarts": "1"}),
    ("python3", ["-m", "torch.distributed.run", "--standalone", "x.py"], ["x.py"], {}),
    ("python", ["train.py", "--epochs", "2"], ["train.py", "--epochs", "2"], {}),
    ("/bin/myprog", ["--flag"], ["--no-python", "/bin/myprog", "--flag"], {}),
    ("bash", ["-c", "torchrun --no-python --virtual-local-rank myexe --x 1"],
     ["--no-python", "--virtual-local-rank", "myexe", "--x", "1"], {}),
], ids=["torchrun", "python-m-run", "python-script", "binary", "bash-no-python"])
def test_unwrap_torchrun(entrypoint, args, program, owned):
    assert unwrap_torchrun(entrypoint, args) == (program, owned)


def test_shell_pipelines_are_refused_by_name():
    with pytest.raises(JobSpecError, match=r"\['&&'\]"):
        unwrap_torchrun("bash", ["-c", "torchrun x.py && echo done"])


def test_elastic_node_range_is_refused():
    with pytest.raises(JobSpecError, match="elastic"):
        from_app(ddp(script="t.py", j="1:2x2"), {"namespace": "ml"})


def test_resources_scale_with_gpus_and_can_be_overridden():
    eight = derived_resources(8, 8)
    assert (eight.cpu, eight.memory, eight.shm, eight.gpus) == ("48", "384Gi", "64Gi", 8)
    assert derived_resources(0, 2).cpu == "4"
    assert derived_resources(8, 8, cpu="90", memory="900Gi", shm="100Gi").requests()["memory"] == "900Gi"
    with pytest.raises(JobSpecError, match="cpu: 'lots'"):
        derived_resources(1, 1, cpu="lots")


def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(JobSpecError, match="nproc_per_node 4 exceeds the 2 GPUs"):
        _spec(nproc=4, gpu=2)


def test_tolerations_and_bad_values_name_the_option():
    assert parse_tolerations("nvidia.com/gpu:NoSchedule,pool=a100:NoExecute,x") == (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoExecute"},
        {"key": "x", "operator": "Exists"})
    with pytest.raises(JobSpecError, match="tolerations"):
        parse_tolerations("gpu:Sometimes")
    with pytest.raises(JobSpecError, match="node_selector: 'gpu' is not KEY=VALUE"):
        _spec(node_selector="gpu")


def test_job_name_is_short_dns1035_and_unique():
    a, b = job_name("My_Train.Run"), job_name("My_Train.Run")
    assert a != b and a.startswith("my-train-run-")
    assert len(job_name("9" + "x" * 200)) <= 40 and job_name("9x")[0].isalpha()


# ------------------------------------------------------------------------------------------------------ objects
GRID = [(nodes, procs, gpus) for nodes in (1, 2, 16) for procs in (1, 8) for gpus in (0, procs)]


@pytest.mark.parametrize("target", ["trainjob", "trainjob-stock", "pytorchjob"])
@pytest.mark.parametrize("nodes, procs, gpus", GRID, ids=[f"{n}x{p}-gpu{g}" for n, p, g in GRID])
def test_every_shape_passes_crd_and_webhook_rules(target, nodes, procs, gpus):
    spec = _spec(nnodes=nodes, nproc=procs, gpu=gpus, tolerations="nvidia.com/gpu:NoSchedule",
                 node_selector="pool=gpu", queue="team-a" if target != "pytorchjob" else "",
                 active_deadline_seconds=7200)
    options = {"runtime": trainjob.STOCK_RUNTIME} if target == "trainjob-stock" else {}
    job = TARGETS[target.split("-")[0]].build(spec, options)
    validate_object(job)
    command = _command(job)
    assert command[:3] == ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={procs}"]
    assert command.count("torchrun") == 1
    if job["kind"] == "TrainJob":
        assert job["spec"]["trainer"]["numNodes"] == nodes and job["spec"]["trainer"]["numProcPerNode"] == procs
        assert job["spec"]["runtimeRef"]["name"] == options.get("runtime", trainjob.DEFAULT_RUNTIME)
    else:
        assert job["spec"]["nprocPerNode"] == str(procs)
        assert job["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0) == nodes - 1
    for meta, pod_spec, container in _pod_specs(job):
        assert meta["annotations"]["sidecar.istio.io/inject"] == "false"
        assert pod_spec["serviceAccountName"] == "clipline-trainer"
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        shm = next(v for v in pod_spec["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm == {"medium": "Memory", "sizeLimit": f"{8 * gpus if gpus else procs}Gi"}
        limits = container["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        assert limits == container["resources"]["requests"]
        env = {e["name"]: e for e in container["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "clipline-store-credentials"
        assert env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "clipline-store"
        assert "NCCL_SOCKET_IFNAME" not in env
        if job["kind"] == "PyTorchJob":
            assert pod_spec["automountServiceAccountToken"] is False


def test_nccl_env_reaches_the_container():
    job = trainjob.build(_spec(gpu=1, nccl_env="NCCL_SOCKET_IFNAME=ib0,NCCL_IB_HCA=mlx5"))
    env = {e["name"]: e.get("value") for e in job["spec"]["trainer"]["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["NCCL_IB_HCA"] == "mlx5"


def test_gang_and_priority_per_target():
    job = pytorchjob.build(_spec(nnodes=4, gpu=1, gang_scheduler="volcano", queue="q", priority_class="high"))
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "queue": "q", "priorityClass": "high"}
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["schedulerName"] == "volcano" and master["priorityClassName"] == "high"
    job = trainjob.build(_spec(nnodes=4, gpu=1, queue="q", priority_class="high"))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
    with pytest.raises(JobSpecError, match="gang_scheduler"):
        trainjob.build(_spec(gang_scheduler="volcano"))
    with pytest.raises(JobSpecError, match="priority_class"):
        trainjob.build(_spec(priority_class="high"))


def _tj():
    return trainjob.build(_spec(nnodes=2, nproc=2, gpu=2))


def _pj():
    return pytorchjob.build(_spec(nnodes=2, nproc=2, gpu=2))


def _patch_pod(job):
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("make, mutate, rule", [
    (_tj, lambda j: j["spec"]["trainer"].__setitem__("numNodes", "2"), "CRD schema: spec.trainer.numNodes"),
    (_tj, lambda j: j["spec"].__setitem__("managedBy", "me"), "CRD rule: spec.managedBy"),
    (_tj, lambda j: j["metadata"].__setitem__("name", "a" * 64), "must be no more than 63 characters"),
    (_tj, lambda j: j["metadata"].__setitem__("name", "a" * 50), "JobSet pod names"),
    (_tj, lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"}), "torch reserved env"),
    (_tj, lambda j: _patch_pod(j)["containers"][0].__setitem__("env", [{"name": "A", "value": "1"}]),
     "must go in trainer.env"),
    (_tj, lambda j: j["spec"]["runtimePatches"][0].__setitem__("manager", "clipline"), "domain-prefixed"),
    (_tj, lambda j: _patch_pod(j).__setitem__("priorityClassName", "high"), "CRD schema"),
    (_pj, lambda j: j["metadata"].__setitem__("name", "bad_name"), "DNS-1035"),
    (_pj, lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].__setitem__("replicas", 2), "Master replicas"),
    (_pj, lambda j: j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
     .__setitem__("name", "trainer"), "container name"),
    (_pj, lambda j: (j["spec"].__setitem__("elasticPolicy", {"minReplicas": 1}),
                     j["spec"]["pytorchReplicaSpecs"].pop("Worker")), "elasticPolicy requires a Worker"),
    (_pj, lambda j: j["spec"].__setitem__("nprocPerNode", 4), "CRD schema: spec.nprocPerNode"),
], ids=["tj-schema-type", "tj-cel-managedby", "tj-cel-name", "tj-jobset-names", "tj-reserved-env",
        "tj-patch-env", "tj-patch-manager", "tj-patch-field", "pj-name", "pj-masters", "pj-container",
        "pj-elastic", "pj-schema-type"])
def test_broken_objects_fail_naming_the_rule(make, mutate, rule):
    job = copy.deepcopy(make())
    validate_object(job)
    mutate(job)
    with pytest.raises(JobValidationError, match=rule):
        validate_object(job)


def test_stock_and_shipped_runtimes_validate():
    stock = yaml.safe_load((REPO / "components/train/launch/crds/torch_distributed_runtime.yaml").read_text())
    validate_object(stock)
    broken = copy.deepcopy(stock)
    broken["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["name"] = "trainer"
    with pytest.raises(JobValidationError, match="needs a container 'node'"):
        validate_object(broken)


def test_crds_are_package_data():
    from importlib import resources

    from components.train.launch.validation import CRDS

    for name in CRDS.values():
        assert resources.files("components.train.launch").joinpath("crds", name).is_file()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"components.train.launch" = ["crds/*.yaml"]' in pyproject


# ------------------------------------------------------------------------------------------------------ states
def _cond(*types, false=()):
    return {"conditions": [{"type": t, "status": "False" if t in false else "True"} for t in types]}


@pytest.mark.parametrize("target, status, state", [
    ("pytorchjob", _cond("Created"), AppState.SUBMITTED),
    ("pytorchjob", _cond("Created", "Running"), AppState.RUNNING),
    ("pytorchjob", _cond("Created", "Running", "Restarting", false=("Running",)), AppState.PENDING),
    ("pytorchjob", _cond("Created", "Running", "Succeeded", false=("Running",)), AppState.SUCCEEDED),
    ("pytorchjob", _cond("Created", "Running", "Failed", false=("Running",)), AppState.FAILED),
    ("trainjob", {}, AppState.SUBMITTED),
    ("trainjob", {"jobsStatus": [{"name": "node", "active": 2}]}, AppState.RUNNING),
    ("trainjob", _cond("Suspended"), AppState.PENDING),
    ("trainjob", _cond("Suspended", "Complete", false=("Suspended",)), AppState.SUCCEEDED),
    ("trainjob", _cond("Failed"), AppState.FAILED),
])
def test_conditions_to_appstate(target, status, state):
    assert TARGETS[target].state(status) == state


# ------------------------------------------------------------------------------------------------------ torchx CLI
def _torchx_env(tmp_path):
    """torchx reads schedulers from the installed entry points; register ours for a subprocess if this checkout
    is not installed (torchx drops its defaults once the group has entries, so local_cwd is listed too)."""
    from importlib import metadata

    env = dict(os.environ)
    names = {ep.name for ep in metadata.entry_points().select(group="torchx.schedulers")}
    if {"trainjob", "pytorchjob"} <= names:
        return env
    dist = tmp_path / "clipline_torchx_test-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: clipline-torchx-test\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[torchx.schedulers]\n"
        "trainjob = components.train.launch.scheduler:create_trainjob_scheduler\n"
        "pytorchjob = components.train.launch.scheduler:create_pytorchjob_scheduler\n"
        "local_cwd = torchx.schedulers.local_scheduler:create_scheduler\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("scheduler", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("app", [["dist.ddp", "-j", "2x2", "--gpu", "2", "--script", "train.py"],
                                 ["components/train/launch/component.py:train", "--recipe", "configs/demo.yaml",
                                  "--data", DATA, "--output", OUTPUT, "--nnodes", "2", "--nproc_per_node", "2",
                                  "--gpu", "2"]], ids=["dist.ddp", "clipline"])
def test_torchx_cli_dryrun_gives_a_valid_job_with_one_torchrun(scheduler, app, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "--dryrun", "-s", scheduler, "--workspace", "",
         "-cfg", "namespace=team-a", *app], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=_torchx_env(tmp_path))
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load(out.stdout[out.stdout.index("apiVersion: "):])
    validate_object(job)
    assert job["metadata"]["namespace"] == "team-a"
    command = _command(job)
    assert command[:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=2"]
    assert sum("torchrun" in part for part in command) == 1, command  # no torchrun inside torchrun
    assert (job["spec"]["trainer"]["numProcPerNode"] if scheduler == "trainjob"
            else int(job["spec"]["nprocPerNode"])) == 2


def test_schedulers_create_describe_list_logs_cancel_against_the_fake_api():
    from fake_kube import FakeKube, stamp

    from components.train.launch.kube import KubeApi

    for create, target in ((create_trainjob_scheduler, trainjob.TARGET),
                           (create_pytorchjob_scheduler, pytorchjob.TARGET)):
        with FakeKube() as fake:
            s = create("t", api=KubeApi(fake.api_client()))
            app_id = s.schedule(s.submit_dryrun(train("configs/demo.yaml", DATA, OUTPUT, nnodes=2),
                                                {"namespace": "ml"}))
            ns, name = app_id.split(":")
            assert ns == "ml" and s.describe(app_id).state == AppState.SUBMITTED
            labels = dict(kv.split("=", 1) for kv in target.pod_selector(name, 1).split(","))
            fake.add_pod("ml", f"{name}-rank1", labels, "Running")
            fake.script_log("ml", f"{name}-rank1", [[f"{stamp(0)} step 1", f"{stamp(1)} loss 0.5"]])
            assert [ln.strip() for ln in s.log_iter(app_id, "trainer", k=1, regex="step")] == ["step 1"]
            os.environ["POD_NAMESPACE"] = "ml"
            try:
                assert [r.app_id for r in s.list()] == [app_id]
            finally:
                del os.environ["POD_NAMESPACE"]
            s.cancel(app_id)
            assert fake.jobs(target.plural) == [] and s.describe(app_id) is None
            verbs = {(c["verb"], c["resource"], c["subresource"]) for c in fake.calls}
            assert verbs == {("create", target.plural, ""), ("get", target.plural, "status"),
                             ("list", target.plural, ""), ("delete", target.plural, ""), ("list", "pods", ""),
                             ("get", "pods", "log")}, json.dumps(sorted(verbs))
