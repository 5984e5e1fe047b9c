"""How a training run ends before its last step: an error, or a signal.

* `TrainingError`: training cannot go on (no trainable parameters, a model the wrappers cannot
  drive, too many consecutive non-finite steps: `_check_skipped`).
* SIGINT (Ctrl-C) or SIGTERM: `_StopRequest` only records the signal; the loop (`calm.train`)
  finishes the step in progress, saves a checkpoint of it and raises `TrainingInterrupted`
  (the CLI exits 130 / 143, after a line saying where the checkpoint is); a second signal of
  the same kind stops at once without saving.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calm.config import TrainConfig
from calm.train_log import _say

if TYPE_CHECKING:
    from calm.train_step import IntervalStats


class TrainingError(ValueError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after saving the checkpoint of the last finished step.

    ``signal_name``, ``step``, ``checkpoint`` (path) and ``exit_code`` (128 + signal number:
    130 for SIGINT, 143 for SIGTERM). ``str(err)`` is the line printed for the user.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint, self.exit_code = step, checkpoint, 128 + signum
        super().__init__(
            f"stopped by {self.signal_name} after step {step}: checkpoint saved in {checkpoint}; "
            "continue with --resume"
        )


class _StopRequest:
    """SIGINT/SIGTERM handlers that only record the signal, for the loop to act on at a step boundary.

    Installed only in the main thread (Python delivers signals there). A second signal of the
    kind already received restores the previous handlers and stops at once (KeyboardInterrupt);
    another kind is noted and ignored (Ctrl-C under torchrun sends SIGINT to the workers and the
    agent then SIGTERM: both mean "stop", and saving must go on).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signum:
            self.restore()
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            os.write(
                2,
                f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                f"(send it again to stop at once without saving)\n".encode(),
            )

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


def _check_skipped(stats: IntervalStats, done: int, cfg: TrainConfig, ckpt_path: Path, main: bool) -> None:
    """Report the interval's skipped updates; abort after `max_bad_steps` in a row.

    The device skips a non-finite step at once; the host learns of it here, at the next log
    line, so with ``log_every`` > ``max_bad_steps`` the abort comes up to ``log_every`` steps
    late (those steps were skipped too: the weights are those of the last good step).
    """
    if stats.skipped and main:
        _say(
            f"warning: non-finite loss or gradient in {stats.skipped} of the last "
            f"{stats.applied + stats.skipped} step(s) (last at step {stats.last_bad_step}); "
            f"their updates were skipped ({stats.streak} in a row now, limit {cfg.max_bad_steps})"
        )
    if stats.max_streak >= cfg.max_bad_steps:
        raise TrainingError(
            f"{stats.max_streak} consecutive steps with a non-finite loss or gradient (last at step "
            f"{stats.last_bad_step}); aborting at step {done}. Try a lower learning rate, a smaller "
            f"grad_clip, or dtype=fp32. The last good checkpoint is in {ckpt_path}"
        )
