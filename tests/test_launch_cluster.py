"""The cluster train step against a Kubernetes API (tests/fake_kube.py) that records every call.

Both targets (Trainer v2 TrainJob, training-operator PyTorchJob) through ``steps.train_on_cluster``, the real
kubernetes client and HTTP: the job is created with an ownerReference and a deadline, its status read through the
status subresource, its rank-0 log followed across a missing pod, a container still starting and dropped streams
(every line printed once), and the job deleted however the step ends: success, failure, timeout, SIGTERM. A failed
TrainJob is resubmitted (Trainer v2 restarts nothing); a failed PyTorchJob is not (its operator restarts pods).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from fake_kube import FakeKube, stamp

from components.common import store
from components.common.recipe import load_recipe
from components.train.launch import component, pytorchjob, trainjob
from components.train.launch.kube import KubeApi
from components.train.launch.validation import validate_object
from pipelines import steps

REPO = Path(__file__).resolve().parents[1]
RECIPE = load_recipe(REPO / "configs" / "demo.yaml")
DATA = "s3://clipline/run/train-data/manifest.json"
LINES = [f"train step={i}/6 loss={1 - i / 10:.1f}" for i in range(1, 7)]


def rank0_pod(target, name: str) -> tuple[str, dict[str, str]]:
    """The rank-0 pod's name and labels as the operators create them (see pod_selector in each target)."""
    labels = dict(item.split("=", 1) for item in target.pod_selector(name, 0).split(","))
    pod = f"{name}-node-0-0-x7k2p" if target is trainjob.TARGET else f"{name}-master-0"
    return pod, labels


def running_status(target) -> dict:
    if target is trainjob.TARGET:
        return {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0}]}
    return {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}


def final_status(target, ok: bool, message: str = "") -> dict:
    if target is trainjob.TARGET:
        ctype, reason = ("Complete", "AllJobsCompleted") if ok else ("Failed", "FailedJobs")
    else:
        ctype, reason = ("Succeeded", "PyTorchJobSucceeded") if ok else ("Failed", "PyTorchJobFailed")
    return {"conditions": [{"type": ctype, "status": "True", "reason": reason, "message": message}]}


def scripted(target, outcomes: list[bool | None]):
    """on_poll for a cluster where attempt k of the job ends as outcomes[k] (None: never ends) once the third
    stream of its log was served. The rank-0 pod appears on the first poll; its log refuses twice (404 as if the
    pod were missing, 400 while the container starts), then streams the lines in three pieces, dropping the
    connection after each."""
    def on_poll(fake: FakeKube, key, obj, polls: int) -> None:
        name = key[3]
        attempt = len({k for k in fake.polls if k[1] == key[1]}) - 1
        pod, labels = rank0_pod(target, name)
        if polls == 1:
            fake.add_pod(key[2], pod, labels, "Running", created=attempt)
            lines = [f"{stamp(i)} [attempt {attempt}] {text}" for i, text in enumerate(LINES)]
            fake.script_log(key[2], pod, [lines[:2], lines[2:4], lines[4:]], errors=(404, 400))
            obj["status"] = running_status(target)
        elif fake.streams.get((key[2], pod), 0) >= 3 and outcomes[attempt] is not None:
            obj["status"] = final_status(target, outcomes[attempt], "node 0 exited 1")
            fake.pods[(key[2], pod)]["status"]["phase"] = "Succeeded" if outcomes[attempt] else "Failed"
    return on_poll


@pytest.fixture
def fake():
    with FakeKube() as server:
        yield server


@pytest.fixture
def step_pod(monkeypatch):
    """The step's own pod, as the downward API tells it (pipelines/pipeline.py sets these on the train task)."""
    env = {"POD_NAME": "clip-pretrain-abc-train-123", "POD_NAMESPACE": "team-a", "POD_UID": "0b1c-uid"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def output(tmp_path):
    out = (tmp_path / "train").as_uri()
    store.put_bytes(store.join(out, "metrics.json"), json.dumps(
        {"samples_seen": 48000, "stages": [{"samples_per_s": 812.5, "steps": 12}], "final_loss": 0.41}).encode())
    return out


def train(fake: FakeKube, output: str, launcher: str, **kw):
    recipe_uri = store.join(output, "recipe.yaml")
    store.put_bytes(recipe_uri, yaml.safe_dump(RECIPE.document()).encode())
    call = dict(launcher=launcher, nodes=2, gpus_per_node=4, image="registry.example.com/clipline/clipline:1",
                api=KubeApi(fake.api_client()), poll_s=0.05, timeout_s=60)
    return steps.train_on_cluster(RECIPE, recipe_uri, DATA, output, **{**call, **kw})


TARGETS = [pytest.param(trainjob.TARGET, id="trainjob"), pytest.param(pytorchjob.TARGET, id="pytorchjob")]


@pytest.mark.parametrize("target", TARGETS)
def test_success_owned_job_status_subresource_log_reconnect_deleted(target, fake, step_pod, output, capsys):
    fake.on_poll = scripted(target, [True])
    doc = train(fake, output, target.name)
    assert doc["samples_seen"] == 48000 and doc["metrics"]["stages.0.samples_per_s"] == 812.5
    assert doc["attempts"] == 1
    (job,) = [c for c in fake.calls if c["verb"] == "create"]
    assert job["namespace"] == "team-a"  # the step pod's own namespace
    (created,) = [o for o in fake.calls_of("create", target.plural)]
    name = created["name"] or doc["job"].split(":")[1]
    assert doc["job"] == f"team-a:{name}"
    # status only through the subresource; the job is gone at the end
    assert fake.calls_of("get", target.plural, "status") and not fake.calls_of("get", target.plural)
    assert [c["name"] for c in fake.calls_of("delete", target.plural)] == [name] and fake.jobs(target.plural) == []
    # log: 404 and 400 retried, three dropped streams re-opened, each line printed once, in order
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "[attempt" in ln]
    assert printed == [f"[attempt 0] {text}" for text in LINES]
    assert fake.streams[("team-a", rank0_pod(target, name)[0])] >= 3
    requests = {(r["timestamps"], r["follow"], r["container"]) for r in fake.log_requests}
    assert requests == {("True", "True", target.container)}
    assert any("sinceSeconds" in r for r in fake.log_requests)  # re-opened streams ask only for recent lines


@pytest.mark.parametrize("target", TARGETS)
def test_created_job_is_valid_owned_and_has_a_deadline(target, fake, step_pod, output):
    fake.on_poll = scripted(target, [True])
    train(fake, output, target.name, max_restarts=3, timeout_s=None)  # the deadline derived from the recipe
    body = fake.last_created
    validate_object(body)
    assert body["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": step_pod["POD_NAME"], "uid": step_pod["POD_UID"]}]
    deadline = steps.train_timeout_s(RECIPE, 2, 4)
    if target is trainjob.TARGET:
        assert body["spec"]["activeDeadlineSeconds"] == deadline
        command = body["spec"]["trainer"]["command"]
    else:
        assert body["spec"]["runPolicy"]["activeDeadlineSeconds"] == deadline
        assert body["spec"]["runPolicy"]["backoffLimit"] == 2 * 3  # nodes x restarts
        command = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["torchrun", "--nnodes=2", "--nproc_per_node=4", "--max-restarts=3"]
    assert command.count("torchrun") == 1 and "components.train.main" in command


def test_failed_trainjob_is_resubmitted_until_it_succeeds(fake, step_pod, output, capsys):
    fake.on_poll = scripted(trainjob.TARGET, [False, False, True])
    doc = train(fake, output, "trainjob", max_restarts=2)
    created = [c["name"] for c in fake.calls_of("create", "trainjobs")]
    deleted = [c["name"] for c in fake.calls_of("delete", "trainjobs")]
    assert doc["attempts"] == 3 and len(set(n for n in fake.polls)) == 3
    assert len(deleted) == 3 and fake.jobs("trainjobs") == []
    assert created == [""] * 3  # names travel in the body: POST goes to the collection
    out = capsys.readouterr().out
    for attempt in range(3):
        assert f"[attempt {attempt}] {LINES[-1]}" in out


@pytest.mark.parametrize("target, restarts, attempts", [pytest.param(trainjob.TARGET, 1, 2, id="trainjob"),
                                                        pytest.param(pytorchjob.TARGET, 2, 1, id="pytorchjob")])
def test_failed_job_fails_the_step_and_is_deleted(target, restarts, attempts, fake, step_pod, output):
    fake.on_poll = scripted(target, [False] * 3)
    with pytest.raises(steps.StepError, match=rf"ended FAILED: node 0 exited 1 \(after {attempts} attempt"):
        train(fake, output, target.name, max_restarts=restarts)
    assert len(fake.calls_of("create", target.plural)) == attempts
    assert len(fake.calls_of("delete", target.plural)) == attempts and fake.jobs(target.plural) == []


@pytest.mark.parametrize("target", TARGETS)
def test_timeout_fails_the_step_and_deletes_the_job(target, fake, step_pod, output):
    fake.on_poll = scripted(target, [None])
    with pytest.raises(steps.StepError, match="did not finish within 1 s"):
        train(fake, output, target.name, timeout_s=1)
    assert len(fake.calls_of("delete", target.plural)) == 1 and fake.jobs(target.plural) == []


def test_job_namespace_defaults_to_the_service_account_namespace_file(fake, output, monkeypatch, tmp_path):
    ns_file = tmp_path / "namespace"
    ns_file.write_text("kubeflow\n")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    monkeypatch.setattr("components.train.launch.jobspec.SA_NAMESPACE_FILE", str(ns_file))
    fake.on_poll = scripted(trainjob.TARGET, [True])
    train(fake, output, "trainjob")
    assert {c["namespace"] for c in fake.calls} == {"kubeflow"}
    assert "ownerReferences" not in fake.last_created["metadata"]  # no downward API: no owner


SIGTERM_CHILD = textwrap.dedent("""
    import sys
    from kubernetes import client
    from components.common.recipe import load_recipe
    from components.train.launch.kube import KubeApi
    from pipelines import steps
    cfg = client.Configuration(); cfg.host = sys.argv[1]
    recipe = load_recipe("configs/demo.yaml")
    try:
        steps.train_on_cluster(recipe, sys.argv[4], "s3://clipline/run/d.json", sys.argv[2],
                               launcher=sys.argv[3], nodes=1, gpus_per_node=0, image="r.example.com/c:1",
                               api=KubeApi(client.ApiClient(cfg)), poll_s=0.05, timeout_s=600)
    except steps.StepError as exc:
        print(exc, file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.parametrize("target", TARGETS)
def test_sigterm_deletes_the_job(target, fake, output, tmp_path):
    fake.on_poll = scripted(target, [None])
    script = tmp_path / "child.py"
    script.write_text(SIGTERM_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "POD_NAMESPACE": "team-a"}
    recipe_uri = store.join(output, "recipe.yaml")
    store.put_bytes(recipe_uri, yaml.safe_dump(RECIPE.document()).encode())
    child = subprocess.Popen([sys.executable, str(script), fake.url, output, target.name, recipe_uri], cwd=REPO,
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not fake.created.wait(0.2):
            assert child.poll() is None, f"the child ended before creating the job: {child.communicate()[1]}"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 3, err
    assert "stopped by SIGTERM" in err
    assert len(fake.calls_of("delete", target.plural)) == 1 and fake.jobs(target.plural) == []


@pytest.mark.parametrize("overlay", ["standalone", "multi-user"])
def test_every_call_the_launcher_makes_is_allowed_by_the_overlays_rbac(overlay, output, monkeypatch):
    """Run the train step (success, a resubmitted failure) and the torchx schedulers' operations for both targets
    against the fake API with the step's identity of ``overlay``, then evaluate Kubernetes RBAC over the overlay's
    rendered Roles/Bindings (tests/rbac.py) for every recorded call: each must be allowed for the account KFP runs
    the step as, in the job namespace, and nothing may have been called elsewhere."""
    from rbac import STEP_IDENTITY, allowed, rendered

    from components.train.launch.scheduler import create_pytorchjob_scheduler, create_trainjob_scheduler

    sa_namespace, sa_name, job_namespace = STEP_IDENTITY[overlay]
    monkeypatch.setenv("POD_NAMESPACE", job_namespace)
    monkeypatch.setenv("POD_NAME", "step-pod")
    monkeypatch.setenv("POD_UID", "uid-1")
    calls = []
    for target, create in ((trainjob.TARGET, create_trainjob_scheduler),
                           (pytorchjob.TARGET, create_pytorchjob_scheduler)):
        with FakeKube() as fake:
            fake.on_poll = scripted(target, [False, True] if target.resubmit else [True])
            train(fake, output, target.name, max_restarts=1)
            s = create("t", api=KubeApi(fake.api_client()))
            app_id = s.schedule(s.submit_dryrun(component.train("configs/demo.yaml", DATA, output, nnodes=2), {}))
            s.describe(app_id)
            s.list()
            pod, labels = rank0_pod(target, app_id.split(":")[1])
            fake.add_pod(job_namespace, pod, labels, "Succeeded")
            fake.script_log(job_namespace, pod, [[f"{stamp(0)} done"]])
            list(s.log_iter(app_id, "trainer"))
            s.cancel(app_id)
            calls += fake.calls
    kinds = {(c["verb"], c["group"], c["resource"], c["subresource"]) for c in calls}
    assert len(kinds) >= 10, kinds  # create/get status/list/delete of both kinds, pods list, pods/log
    objects = rendered(overlay)
    denied = [c for c in calls if not allowed(objects, sa_namespace, sa_name, verb=c["verb"], group=c["group"],
                                              resource=c["resource"], subresource=c["subresource"],
                                              namespace=c["namespace"], name=c["name"])]
    assert denied == [], f"{overlay}: {sa_namespace}/{sa_name} may not make {denied[:3]}"
    assert {c["namespace"] for c in calls} == {job_namespace}
    # and the rules bite: the same calls from the training pods' account are all denied
    assert not any(allowed(objects, job_namespace, "clipline-trainer", verb=c["verb"], group=c["group"],
                           resource=c["resource"], subresource=c["subresource"], namespace=c["namespace"])
                   for c in calls)
