"""What a run tells people while it trains (rank 0 only).

- a progress bar when stderr is a terminal, otherwise one structured line per log interval
  (``train step=120/750 stage=pretrain epoch=3 loss=3.2154 lr=1.00e-03 temperature=0.0712 samples_per_s=812.3``);
- ``log.jsonl`` under the run's output prefix: one JSON object per log interval (what ``clipline evaluate
  --training-log`` plots), plus "event" lines for stage switches, checkpoints and resumes;
- TensorBoard scalars under ``<output>/tensorboard/``;
- ``metrics.json`` at the end (``write_metrics``).

Objects in a store cannot be appended to, so the log and the TensorBoard files are written locally and uploaded
whole at every checkpoint and at the end. A resumed run starts from the uploaded copies, cut back to the checkpoint's
step, so the final log has each step once.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from components.common import store

log = logging.getLogger("clipline.train")

LOG_NAME = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
METRICS_NAME = "metrics.json"


class TrainLog:
    def __init__(self, output: str, total_steps: int, resume_step: int | None, interactive: bool | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.output = output
        self.total_steps = total_steps
        self.local = Path(tempfile.mkdtemp(prefix="clipline-train-log-"))
        self.jsonl = self.local / LOG_NAME
        self.tb_dir = self.local / TENSORBOARD_DIR
        self.tb_dir.mkdir()
        if resume_step is not None:
            self._restore(resume_step)
        # purge_step hides events a killed attempt logged after the checkpoint it resumes from.
        self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step)
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step or 0, unit="step", dynamic_ncols=True)

    def _restore(self, step: int) -> None:
        uri = store.join(self.output, LOG_NAME)
        if store.exists(uri):
            kept = [line for line in store.get_bytes(uri).decode().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.jsonl.write_text("".join(line + "\n" for line in kept))
        prefix = store.join(self.output, TENSORBOARD_DIR) + "/"
        for info in store.list_objects(prefix):
            store.get_file(info.uri, self.tb_dir / info.uri[len(prefix):])

    def _append(self, record: dict[str, Any]) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def scalars(self, record: dict[str, Any]) -> None:
        """One log interval: ``record`` has step, stage, epoch, loss, lr, temperature, samples_per_s, ..."""
        record = {"time": round(time.time(), 3), **record}
        self._append(record)
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "time", "epoch"):
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", stage=record["stage"], refresh=False)
            self.bar.refresh()
        else:
            shown = " ".join(f"{k}={_fmt(record[k])}" for k in
                             ("stage", "epoch", "loss", "lr", "temperature", "samples_per_s") if k in record)
            log.info("train step=%d/%d %s", step, self.total_steps, shown)

    def event(self, step: int, event: str, **details: Any) -> None:
        self._append({"time": round(time.time(), 3), "step": step, "event": event, **details})
        message = f"{event} at step {step}" + "".join(f" {k}={v}" for k, v in details.items())
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def upload(self) -> None:
        self.writer.flush()
        if self.jsonl.exists():
            store.put_file(store.join(self.output, LOG_NAME), self.jsonl)
        for path in sorted(self.tb_dir.iterdir()):
            store.put_file(store.join(self.output, TENSORBOARD_DIR, path.name), path)

    def close(self) -> None:
        self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def write_metrics(output: str, metrics: dict[str, Any]) -> str:
    uri = store.join(output, METRICS_NAME)
    store.put_json(uri, metrics)
    return uri
