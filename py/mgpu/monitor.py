"""What the training loop watches without stalling the GPU: losses stay on the device, signals and bad
images are counted on the host, and all of it is read once per check step, by one all-reduce.

Between check steps the loop issues no host sync (no ``.item()``, no ``isfinite`` branch, no collective
on the CPU side), so the CPU can queue the next steps while the GPU works. At a check step (every
``--check-every`` steps, every progress line, before a save or an evaluation, at the end) one small vector
goes through one all-reduce: the signals each rank received, bad and read images, and the losses since the
last check. Every rank then takes the same decision at the same step: stop (a signal reached any rank),
fail (a loss was not finite on any rank), or go on. ``bench/train_syncs.py`` counts the syncs.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import distributed

# What the launcher and Slurm send before stopping a job (TERM, USR1), Ctrl-C (INT; torchrun passes it on to
# its workers, which lead sessions of their own) and a closed terminal (HUP): each ends the run at the next
# check step, with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
MAX_SKIP_WARNINGS = 10  # per process; further unreadable images are counted

log = logging.getLogger("mgpu.train_clip")


@dataclass
class Checked:
    """The outcome of one check, the same on every rank."""
    step: int
    loss: float  # the mean over ranks of the last step's loss
    bad_images: int  # all ranks, since the start of this process
    images_read: int
    stop_signal: int  # 0, or the signal number that reached a rank
    nonfinite_step: int  # 0, or the first step since the last check whose loss was not finite
    nonfinite_value: float = float("nan")


class Monitor:
    def __init__(self, device: torch.device, keep: int = 50):
        self.device = device
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last check
        self.recent: deque[torch.Tensor] = deque(maxlen=keep)  # for the run's train_loss
        self.bad, self.read = 0, 0
        self.signals = {sig: 0 for sig in STOP_SIGNALS}

    def install_signal_handlers(self) -> None:
        """The stop signals only set a flag; the loop stops at the next check step, with a checkpoint. A
        second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint), as users expect of a second one. A
        signal this process was started with ignored stays ignored (INT in a background job, HUP under
        nohup)."""
        main = os.getpid()  # DataLoader workers fork with these handlers: only this process speaks

        def on_signal(signum, _frame):
            sig = signal.Signals(signum)
            # A second Ctrl-C; under torchrun it comes as TERM (its agent closes the workers with TERM once
            # a second signal has cut short its wait for them)
            if self.signals[signal.SIGINT] and sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.signals[sig] = 1
            if sig == signal.SIGINT and distributed.rank() == 0 and os.getpid() == main:
                log.warning("Ctrl-C: stopping at the next check step, with a checkpoint (press it again to stop "
                            "at once, without one)")
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) != signal.SIG_IGN:
                signal.signal(sig, on_signal)

    def add(self, step: int, loss: torch.Tensor, skipped: list[tuple[str, str]], read: int) -> None:
        """Record a finished step: its loss (a device tensor, not read here), the images it read, and those
        it had to replace (path, reason): the first few are named, the rest counted."""
        self.pending.append((step, loss))
        self.recent.append(loss)
        for path, reason in skipped:
            self.bad += 1
            if self.bad <= MAX_SKIP_WARNINGS:
                log.warning("skipped image %s (%s)%s", path, reason, "; further ones are counted"
                            if self.bad == MAX_SKIP_WARNINGS else "", extra={"per_rank": True})
        self.read += read

    def check(self) -> Checked:
        """The one host sync: sums over all ranks of the signals, image counts and pending losses."""
        steps = [s for s, _ in self.pending]
        host = torch.tensor([*self.signals.values(), self.bad, self.read], dtype=torch.float64)
        losses = torch.stack([loss.double() for _, loss in self.pending]) if self.pending else \
            torch.zeros(0, dtype=torch.float64, device=self.device)
        vector = torch.cat([host.to(self.device, non_blocking=True), losses.to(self.device)])
        if distributed.world_size() > 1:
            dist.all_reduce(vector)
        values = vector.tolist()
        n = len(STOP_SIGNALS)
        got = [sig for sig, count in zip(STOP_SIGNALS, values[:n]) if count > 0]
        losses = [v / distributed.world_size() for v in values[n + 2:]]
        bad_at = next((i for i, v in enumerate(losses) if v != v or v in (float("inf"), float("-inf"))), None)
        self.pending.clear()
        return Checked(step=steps[-1] if steps else 0, loss=losses[-1] if losses else float("nan"),
                       bad_images=int(values[n]), images_read=int(values[n + 1]),
                       stop_signal=int(got[0]) if got else 0,
                       nonfinite_step=steps[bad_at] if bad_at is not None else 0,
                       nonfinite_value=losses[bad_at] if bad_at is not None else float("nan"))

    def train_loss(self) -> float | None:
        """The mean loss of the last steps on this rank (one sync, at the end of the run)."""
        return torch.stack(list(self.recent)).mean().item() if self.recent else None
