"""Progress of a long loop: a tqdm bar when stderr is a terminal, plain periodic lines on stdout otherwise (logs, pipes, the
launcher's log files), each with the step, the numbers given, samples/s and the ETA.

    progress = Progress(total=1000, start=0, enabled=is_rank0)
    progress.update(step, samples=64)              # once per step; a line every `every` steps
    progress.update(step, samples=64, loss=0.7)    # values to show (the trainer reads them on due steps only)
    progress.close()
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta


def format_eta(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class Progress:
    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, every: int = 0, stream=None,
                 desc: str = "train"):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout  # plain lines go where the run's log goes
        self.every = every or max(1, (total - start) // 20)  # about 20 lines a run
        self.t0 = time.perf_counter()
        self.samples = 0
        self.bar = None
        if enabled and stream is None and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def rate(self) -> float:
        """Samples per second since the start of this run (resumed steps not counted)."""
        return self.samples / max(time.perf_counter() - self.t0, 1e-9)

    def due(self, step: int) -> bool:
        """Whether step gets a report: every `every` steps, and the last."""
        return step % self.every == 0 or step == self.total

    def update(self, step: int, samples: int, **values: float) -> None:
        """step: the number of steps done (1-based); samples: how many this step processed (all ranks);
        values: numbers to show (with the bar: whenever given; as lines: on due steps)."""
        self.samples += samples
        if not self.enabled:
            return
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if values:
                self.bar.set_postfix_str(f"{shown} samples/s {self.rate():.0f}", refresh=False)
            return
        if not self.due(step):
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%) {shown} samples/s {self.rate():.0f} "
              f"ETA {format_eta(eta)}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
