"""Run one training job on the cluster to the end: submit, follow the rank-0 log, wait, retry, clean up.

What the train step needs from a job, whichever operator runs it:
- validated before submission (CRD schema, CRD rules, webhook rules: ``validation.validate_object``);
- an ownerReference to the step's pod and an ``activeDeadlineSeconds`` (in the JobSpec), so a job never outlives
  its step by more than the garbage collector's delay, nor its time budget;
- the job deleted when the step ends in any way: success, failure, timeout, an exception, or SIGTERM (a run
  stopped in the KFP UI; Argo's executor signals the step's main process);
- the rank-0 log followed into the step's log: the pod may not exist yet (404) or still be pulling its image
  (400), and a long stream can drop, so the follower waits for the pod, re-opens the stream with backoff and skips
  the lines it already printed (by timestamp) until the job has finished;
- for targets whose operator restarts nothing (TrainJob), a failed job resubmitted up to ``resubmits`` times: the
  trainer's ``--resume auto`` continues from the latest checkpoint in the store.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional, TextIO

from torchx.specs import AppState

from components.train.launch.jobspec import JobSpec
from components.train.launch.kube import KubeApi, Target
from components.train.launch.validation import validate_object

log = logging.getLogger("clipline.launch")

TERMINAL = (AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED)


class JobFailed(RuntimeError):
    """The job failed, timed out or was stopped; the message says which and how to continue."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the step so its cleanup runs (BaseException, so no handler swallows it)."""


@dataclass
class Outcome:
    app_id: str  # <namespace>:<name> of the last job
    attempts: int
    state: AppState
    log_lines: int = 0
    jobs: list[str] = field(default_factory=list)


def _timestamp(text: str) -> tuple[datetime, int]:
    """An RFC 3339 log timestamp as (seconds, nanoseconds): kubelet trims trailing zeros of the fraction, so
    the strings do not sort."""
    head, _, frac = text.rstrip("Z").partition(".")
    when = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return when, int((frac + "000000000")[:9])


class LogFollower(threading.Thread):
    """Streams the job's rank-0 pod log to ``out`` until ``finish()``; survives missing pods and dropped streams."""

    def __init__(self, api: KubeApi, target: Target, namespace: str, name: str, out: TextIO, *,
                 backoff_s: float = 1.0, max_backoff_s: float = 15.0) -> None:
        super().__init__(daemon=True, name=f"log-{name}")
        self.api, self.target, self.namespace, self.name, self.out = api, target, namespace, name, out
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.lines = 0
        self._done = threading.Event()
        self._last: Optional[tuple[str, tuple[datetime, int]]] = None  # (pod, timestamp) of the last line

    def finish(self, grace_s: float = 10.0) -> None:
        """The job is over: drain what the pod still streams (up to ``grace_s``), then stop."""
        self._done.set()
        self.join(grace_s)

    def _rank0_pod(self) -> Optional[str]:
        pods = [p for p in self.api.pods(self.namespace, self.target.pod_selector(self.name, 0))
                if (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")]
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        return pods[-1]["metadata"]["name"] if pods else None

    def run(self) -> None:
        delay = self.backoff_s
        while True:
            done_before = self._done.is_set()
            try:
                pod = self._rank0_pod()
                if pod:
                    since = None
                    if self._last and self._last[0] == pod:
                        since = max(1, int((datetime.now(timezone.utc) - self._last[1][0]).total_seconds()) + 1)
                    for line in self.api.log_lines(self.namespace, pod, self.target.container, follow=True,
                                                   since_seconds=since):
                        self._emit(pod, line)
                        delay = self.backoff_s
            except Exception as exc:  # noqa: BLE001 - not started (400), gone (404), dropped: retry until done
                log.debug("log stream of %s: %s", self.name, exc)
            if done_before:
                return
            self._done.wait(delay)  # once done is set, one last pass picks up what the pod printed before it ended
            delay = min(delay * 2, self.max_backoff_s)

    def _emit(self, pod: str, line: str) -> None:
        stamp, _, text = line.partition(" ")
        try:
            when = _timestamp(stamp)
        except ValueError:
            when, text = None, line
        if when is not None and self._last and self._last[0] == pod and when <= self._last[1]:
            return  # printed before the stream was re-opened
        if when is not None:
            self._last = (pod, when)
        self.lines += 1
        print(text, file=self.out, flush=True)


def _install_sigterm() -> Callable[[], None]:
    """SIGTERM raises Terminated in the main thread (so ``finally`` deletes the job); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_job(target: Target, spec: JobSpec, *, api: KubeApi, timeout_s: float, resubmits: int = 0,
            options: Optional[Mapping[str, Any]] = None, poll_s: float = 15.0, out: Optional[TextIO] = None,
            on_submit: Optional[Callable[[str], None]] = None) -> Outcome:
    """Submit ``spec`` as a ``target`` job and wait for it; raise JobFailed unless it succeeds. The job (each
    attempt's) is deleted before this returns or raises."""
    started = time.monotonic()
    retries = resubmits if target.resubmit else 0
    outcome = Outcome(app_id="", attempts=0, state=AppState.UNKNOWN)
    undo = _install_sigterm()
    current: Optional[str] = None
    try:
        for attempt in range(retries + 1):
            attempt_spec = spec if attempt == 0 else spec.with_name(f"{spec.name}-r{attempt}")
            body = target.build(attempt_spec, options)
            validate_object(body)
            current = attempt_spec.name  # before create: a SIGTERM during the call still deletes the job
            api.create(target, spec.namespace, body)
            outcome.app_id = f"{spec.namespace}:{current}"
            outcome.attempts, outcome.jobs = attempt + 1, [*outcome.jobs, outcome.app_id]
            log.info("submitted %s %s (attempt %d of %d)", target.kind, outcome.app_id, attempt + 1, retries + 1)
            if on_submit:
                on_submit(outcome.app_id)
            follower = LogFollower(api, target, spec.namespace, current, out or sys.stdout,
                                   backoff_s=min(1.0, poll_s))
            follower.start()
            try:
                state, message = _wait(api, target, spec.namespace, current, started, timeout_s, poll_s)
            finally:
                follower.finish()
                outcome.log_lines += follower.lines
            outcome.state = state
            api.delete(target, spec.namespace, current)
            current = None
            if state == AppState.SUCCEEDED:
                return outcome
            if attempt < retries:
                log.warning("%s %s ended %s (%s): resubmitting; training resumes from the latest checkpoint",
                            target.kind, outcome.app_id, state.name, message)
                continue
            raise JobFailed(f"{target.kind} {outcome.app_id} ended {state.name}: {message or 'see the log above'}"
                            f" (after {attempt + 1} attempt(s)); rerunning resumes from the latest checkpoint")
        raise AssertionError("unreachable")
    except Terminated:
        raise JobFailed(f"stopped by SIGTERM: {target.kind} {outcome.app_id} deleted") from None
    finally:
        undo()
        if current is not None:
            api.delete(target, spec.namespace, current)


def _wait(api: KubeApi, target: Target, namespace: str, name: str, started: float, timeout_s: float,
          poll_s: float) -> tuple[AppState, str]:
    while True:
        status = api.status(target, namespace, name)
        if status is None:
            return AppState.CANCELLED, "the job was deleted by someone else"
        state = target.state(status)
        if state in TERMINAL:
            conditions = status.get("conditions") or []
            return state, (conditions[-1].get("message") or conditions[-1].get("reason") or "") if conditions else ""
        if time.monotonic() - started > timeout_s:
            raise JobFailed(f"{target.kind} {namespace}:{name} did not finish within {int(timeout_s)} s")
        time.sleep(poll_s)
