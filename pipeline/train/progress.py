"""What the loop reports: the progress bar, the per-window statistics and `RUN/metrics.jsonl`.

Every `train.log_every` steps (and at the last step, and at a stop) one record -- mean loss and grad-norm over the
steps since the previous record, the lr of the last step, images/s and seconds per thousand images, the fraction
of step time spent waiting for data, images seen; on CUDA also peak memory and MFU
(`pipeline.train.performance`), and with REPA the mean `repa_loss` beside `loss` (the objective's loss) -- goes
to the trackers and, on the main process, to `RUN/metrics.jsonl`.
The loss and gradient norm of each step stay on the device until a record (or a finiteness check) reads them:
one transfer per record instead of a host synchronisation per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text_atomic

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class MetricsLog:
    """`RUN/metrics.jsonl`, one JSON object per logged step (main process). On resume, entries after the
    checkpoint's step (written by the interrupted run) are dropped so the file describes one history, and so
    are lines that are not JSON records (a line cut short by a kill mid-write), with a warning."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text(errors="replace").splitlines() if _keep(line, resume_step, path)]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "a")  # an append-only log: each record is one flushed line

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _keep(line: str, resume_step: int, path: Path) -> bool:
    """Whether a line of an existing metrics log stays on resume: a record of a step up to the checkpoint's."""
    if not line.strip():
        return False
    try:
        record = json.loads(line)
        return int(record.get("step", 0)) <= resume_step
    except (ValueError, TypeError, AttributeError):
        logger.warning("%s: dropping a line that is not a metrics record: %.80r", path, line)
        return False


class LogWindow:
    """The optimizer steps since the last record: their loss and gradient norm as they came out of the step
    (0-dim tensors, on the device: reading them would make the host wait for the GPU), and their seconds.

    Values are brought to the host when something needs them -- a finiteness check, the record -- in one
    transfer for all the steps not read yet. The window's steps are numbered from `start + 1` (`start`:
    optimizer steps taken before it)."""

    def __init__(self, start: int):
        self.start = start
        self.losses: list = []  # per step, on the device
        self.grad_norms: list = []
        self.repa_losses: list = []  # per step, on the device (REPA runs only)
        self.read_losses: list[float] = []  # the leading steps' values, read to the host
        self.read_norms: list[float] = []
        self.read_repa: list[float] = []
        self.checked = 0  # leading steps already checked finite
        self.seconds = 0.0
        self.waited = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def add(self, loss, grad_norm, repa_loss=None) -> None:
        """One step's loss and gradient norm (tensors, or None for a norm the accelerator did not compute), and
        REPA's loss (a tensor in REPA runs, None otherwise)."""
        import torch

        loss = loss.detach().float().reshape(())
        self.losses.append(loss)
        norm = torch.full_like(loss, math.nan) if grad_norm is None else grad_norm.detach().float().reshape(())
        self.grad_norms.append(norm.to(loss.device))
        if repa_loss is not None:
            self.repa_losses.append(repa_loss.detach().float().reshape(()).to(loss.device))

    def add_time(self, seconds: float, waited: float) -> None:
        self.seconds += seconds
        self.waited += waited

    def read(self, timed: bool = True) -> None:
        """Bring the values of the steps not read yet to the host: one transfer. With `timed`, the seconds it
        waits for the device (for work of the window's steps) count as step time -- not when it runs inside a
        step that is timed as a whole."""
        import torch

        count = self.steps - len(self.read_losses)
        if count == 0:
            return
        began = time.perf_counter()
        repa = self.repa_losses[-count:] if self.repa_losses else []
        values = torch.stack(self.losses[-count:] + self.grad_norms[-count:] + repa).tolist()
        if timed:
            self.seconds += time.perf_counter() - began
        self.read_losses += values[:count]
        self.read_norms += values[count : 2 * count]
        self.read_repa += values[2 * count :]

    def first_non_finite(self, check_grad_norm: bool, timed: bool = True) -> tuple[int, float, float] | None:
        """(step, loss, grad-norm) of the first step since the last check whose loss -- or, with
        `check_grad_norm`, gradient norm -- is NaN / inf; None when all are finite."""
        self.read(timed)
        for index in range(self.checked, self.steps):
            loss, norm = self.read_losses[index], self.read_norms[index]
            repa = self.read_repa[index] if self.read_repa else 0.0
            if not math.isfinite(loss + repa) or (check_grad_norm and not math.isfinite(norm)):
                return self.start + index + 1, loss if math.isfinite(repa) else loss + repa, norm
        self.checked = self.steps
        return None

    def record(self, step: int, lr: float, images_seen: int, global_batch_size: int) -> dict[str, Any]:
        """The metrics record of this window, ending at `step`."""
        self.read()
        images = self.steps * global_batch_size
        record = {
            "step": step,
            "loss": sum(self.read_losses) / self.steps,
            "lr": lr,
            "grad_norm": sum(self.read_norms) / self.steps,
            "images_per_s": images / self.seconds,
            "sec_per_kimg": self.seconds / images * 1000,
            "data_wait_fraction": self.waited / self.seconds,
            "images_seen": images_seen,
        }
        if self.read_repa:
            record["repa_loss"] = sum(self.read_repa) / self.steps
        return record


class Progress:
    """The progress bar (main process only) and the window of statistics behind the next metrics record."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True
        )
        self.window = LogWindow(initial)
        self.last_loss: float | None = None  # the loss of the last step recorded

    def step_values(self, loss, grad_norm, repa_loss=None) -> None:
        """This step's loss, gradient norm and REPA loss (device tensors, or None; nothing is read here)."""
        self.window.add(loss, grad_norm, repa_loss)

    def step_done(self, seconds: float, waited: float) -> None:
        """Count one optimizer step: its duration and the time spent waiting for data."""
        self.window.add_time(seconds, waited)
        self.bar.update(1)

    def take_record(self, step: int, lr: float, images_seen: int, global_batch_size: int) -> dict[str, Any]:
        """The record of the steps since the last one (the window starts again)."""
        record = self.window.record(step, lr, images_seen, global_batch_size)
        self.last_loss = self.window.read_losses[-1]
        self.window = LogWindow(step)
        return record

    def show(self, record: dict[str, Any]) -> None:
        """Loss, images/s, seconds per kimg and data wait of the latest record beside the bar (and on CUDA the
        peak memory and MFU)."""
        shown = {
            "loss": f"{record['loss']:.4f}",
            **({"repa": f"{record['repa_loss']:.3f}"} if "repa_loss" in record else {}),
            "ips": f"{record['images_per_s']:.1f}",
            "s/kimg": f"{record['sec_per_kimg']:.2f}",
            "wait": f"{record['data_wait_fraction']:.0%}",
        }
        if "peak_gpu_mem_gib" in record:
            shown["mem"] = f"{record['peak_gpu_mem_gib']:.1f}G"
        if "mfu" in record:
            shown["mfu"] = f"{record['mfu']:.0%}"
        self.bar.set_postfix(shown)

    def close(self) -> None:
        self.bar.close()
