"""Preemption-safe training: SIGTERM / SIGUSR1 finish the current step, write a checkpoint and exit 75.

A cluster that takes the machines back warns first: SLURM sends SIGTERM on preemption (SIGKILL after the
partition's GraceTime) and, with `#SBATCH --signal=USR1@180`, SIGUSR1 that long before the time limit. While
training, either signal only sets a flag (`StopSignals`); the loop finishes the step it is in, logs it, writes a
checkpoint of that step and stops with `TrainingStopped`, exit code `EXIT_STOPPED` = 75 (EX_TEMPFAIL of
sysexits.h: "temporary failure, try again"). The job script requeues itself on 75 and the next job continues
with `--resume auto` (docs: the sbatch template).

Every rank must stop at the same step -- a rank that left early would leave the others waiting in the next
collective, and the checkpoint needs every rank's RNG state. SLURM signals every task, but not at the same
instant, and a launcher may signal only some of them, so the ranks agree (`StopAgreement`): after each step
each rank's flag is summed over the ranks with one all-reduce of a single number (microseconds beside the
gradient all-reduce). On CPU the sum is read at once. On CUDA it is read one step later -- the copy to the host is
queued behind the step and waited for only after the next step has been queued, so the check never makes the
host wait for the GPU --, and every rank stops at the step after the one whose sum was non-zero: still the same
step on every rank. A single process reads its own flag.

DataLoader workers ignore both signals unless their own trainer sends them (`ignore_stop_signals`): SLURM
signals every process of the job step, and a worker killed by SIGTERM would end the run before its checkpoint;
the trainer shuts them down itself.

The handlers are installed before any set-up work (`pipeline.train.loop.run_train`) and stay until the run has returned
or raised, teardown included, so a signal at any moment is an orderly stop. Before them, from the first line of
`cli.main` (ahead of the seconds of importing torch and the rest), `cli.main.EarlyStopSignals` records a signal,
and `StopSignals` takes it over when it replaces that handler (its `received`), so a signal while the command
starts counts as one during set-up:

* during set-up (before the first step): set-up finishes, the ranks agree, and every rank stops with exit 75
  without writing anything (there is nothing new to save; `--resume auto` starts again where this one would);
* during a step or a checkpoint write: the step (and the write) completes, a checkpoint of that step is written,
  exit 75;
* during the last step or after it: the run is complete -- its final checkpoint is written and the teardown
  finishes --, exit 0 (a requeue would find nothing to do).

Test hook: `DIFFIT_PIPE_TEST_PAUSE_AT=<phase>` makes the process of rank `DIFFIT_PIPE_TEST_PAUSE_RANK` (default 0)
write the file `DIFFIT_PIPE_TEST_PAUSE_MARKER` when it first reaches `<phase>` (`setup`, `step`, `checkpoint`,
`teardown`: see `pause_point`) and wait there until a stop signal arrives, so that a test's signal lands in that
phase for sure rather than after a guessed sleep.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text_atomic
from pipeline.core.errors import PipelineError
from pipeline.train.runlock import close_inherited_lock

logger = logging.getLogger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint written; continue with --resume auto
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
PAUSE_AT_ENV = "DIFFIT_PIPE_TEST_PAUSE_AT"
PAUSE_MARKER_ENV = "DIFFIT_PIPE_TEST_PAUSE_MARKER"
PAUSE_RANK_ENV = "DIFFIT_PIPE_TEST_PAUSE_RANK"
PAUSE_PHASES = ("setup", "step", "checkpoint", "teardown")
PAUSE_TIMEOUT_S = 120.0

# The StopSignals in force (None: none), for `pause_point`.
_ACTIVE: StopSignals | None = None
_PAUSED: set[str] = set()


class TrainingStopped(PipelineError):
    """Training stopped on SIGTERM / SIGUSR1 after writing a checkpoint of the current step (exit 75)."""

    exit_code = EXIT_STOPPED


class StopSignals:
    """While active (a context manager), SIGTERM and SIGUSR1 only record that a stop was asked for (`received`,
    the first signal's name); the previous handlers come back on exit. Handlers can only be installed in the
    main thread: elsewhere (a trainer started in a thread) the signals keep their previous handling."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        global _ACTIVE
        _ACTIVE = self
        _PAUSED.clear()  # each run pauses at its phase once
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: SIGTERM / SIGUSR1 keep their handlers (no stop with a checkpoint)")
            return self
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
            if number is not None:
                self._previous[number] = signal.signal(number, self._record)
                # A handler that recorded a stop before this one (`cli.main.EarlyStopSignals`, installed before the
                # imports) hands its signal over: the run stops before its first step, as for one during set-up.
                earlier = getattr(self._previous[number], "received", None)
                if self.received is None and isinstance(earlier, str):
                    self.received = earlier
        return self

    def __exit__(self, *exc_info) -> None:
        global _ACTIVE
        _ACTIVE = None
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame) -> None:
        # Only a flag: the handler runs between two bytecodes of the loop, anything more could act on a half-done
        # step. The loop logs it.
        if self.received is None:
            self.received = signal.Signals(number).name


class StopAgreement:
    """Whether every rank stops after the step just finished (see the module docstring). Every rank must call
    `should_stop` once per step: on several processes it is a collective."""

    def __init__(self, accelerator, signals: StopSignals):
        self.accelerator = accelerator
        self.signals = signals
        self.pending = None  # CUDA: (host copy of the last sum, event recorded after the copy)
        self.announced = False

    def should_stop(self) -> bool:
        if self.signals.received is not None and not self.announced:
            self.announced = True
            logger.warning(
                "received %s: finishing this step, writing a checkpoint, then stopping", self.signals.received
            )
        return self._agree(read_now=False)

    def before_first_step(self) -> bool:
        """Whether any rank was signalled during set-up (every rank calls it once, before the first step; the
        sum is read at once, also on CUDA: nothing is queued yet)."""
        if self.signals.received is not None:
            self.announced = True
            logger.warning("received %s during set-up: stopping before the first step", self.signals.received)
        return self._agree(read_now=True)

    def _agree(self, read_now: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return self.signals.received is not None
        import torch

        device = self.accelerator.device
        # torch.full launches a fill kernel: no host-to-device copy, no wait.
        flag = torch.full((1,), 1.0 if self.signals.received is not None else 0.0, device=device)
        total = self.accelerator.reduce(flag, reduction="sum")
        if device.type != "cuda" or read_now:
            return bool(total.item() > 0)
        previous, self.pending = self.pending, _copy_to_host(total)
        if previous is None:
            return False
        host, event = previous
        event.synchronize()  # the step before the one just queued: long finished on the GPU
        return bool(host.item() > 0)


def _copy_to_host(tensor):
    """A non-blocking device-to-host copy of `tensor` and an event that completes with it."""
    import torch

    host = tensor.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: SIGTERM / SIGUSR1 from anyone but the training process are ignored.

    SLURM signals every process of the job step, and a worker that died of it would end the run before its
    checkpoint (the trainer's SIGCHLD handler raises at once). But the trainer itself terminates a worker with
    SIGTERM when one does not exit on its own, and at exit -- a worker ignoring that would hang the trainer. So
    the signals are blocked here (the threads the worker starts later inherit that) and a thread takes them with
    `sigwaitinfo`, which names the sender: from the parent the signal ends the worker as it would have, from
    anyone else it is dropped. Where `sigwaitinfo` does not exist (macOS) the signals keep their default action.
    """
    close_inherited_lock()  # a worker orphaned by a killed trainer must not keep the run locked
    numbers = {getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)}
    if not hasattr(signal, "sigwaitinfo") or not numbers:
        return
    # The handlers inherited from the trainer (StopSignals) must not run here.
    for number in numbers:
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
    parent = os.getppid()
    threading.Thread(target=_take_stop_signals, args=(numbers, parent), daemon=True, name="stop-signals").start()


def _take_stop_signals(numbers: set[int], parent: int) -> None:
    """Wait for the blocked stop signals; end the process on one from `parent`, drop the others."""
    while True:
        info = signal.sigwaitinfo(numbers)
        if info.si_pid == parent:
            # The default action (termination by this signal), as if it had never been blocked.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {info.si_signo})
            os.kill(os.getpid(), info.si_signo)
            return


def pause_point(phase: str) -> None:
    """Test hook (see the module docstring): at the first `phase` named by DIFFIT_PIPE_TEST_PAUSE_AT, write the
    marker file and wait for a stop signal (at most PAUSE_TIMEOUT_S). Does nothing unless the variable is set."""
    if os.environ.get(PAUSE_AT_ENV) != phase or phase in _PAUSED:
        return
    if os.environ.get("RANK", "0") != os.environ.get(PAUSE_RANK_ENV, "0"):
        return
    _PAUSED.add(phase)
    signals = _ACTIVE
    # Atomic: the test reads the pid as soon as the file exists.
    write_text_atomic(Path(os.environ[PAUSE_MARKER_ENV]), f"{phase} {os.getpid()}\n")
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    while (signals is None or signals.received is None) and time.monotonic() < deadline:
        time.sleep(0.005)
    if signals is None or signals.received is None:
        logger.warning("test pause at %s: no stop signal within %.0f s, going on", phase, PAUSE_TIMEOUT_S)
