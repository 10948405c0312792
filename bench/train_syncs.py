"""Host syncs in mgpu.train_clip's loop: where the CPU waits for the device. Prints, for a short run, how
many syncs each step issued and whether it was a check step (the steps that read the device on purpose,
mgpu.monitor); between check steps the count must be 0. Asserts nothing.

    .venv/bin/python bench/train_syncs.py                        # CPU: a counted hook
    python bench/train_syncs.py --device cuda --amp bf16         # GPU: also torch.cuda.set_sync_debug_mode

On the CPU nothing waits, so the hook counts the calls that would wait on a GPU: Tensor.item, tolist,
__bool__ / __float__ / __int__ (an ``if tensor:``), numpy. Calls made by the data pipeline (the loader, the
datasets, collate) are not the loop's and are left out, and so are the optimizer's reads of its step
counters (CPU tensors, even when training on a GPU). On a GPU, torch.cuda.set_sync_debug_mode("warn") is
on during each train_step as well, and its warnings are counted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "py"))

from mgpu import monitor, step, train_clip  # noqa: E402

_SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
# the data pipeline's calls are not the loop's; the optimizer's .item() reads its step counters, which live on
# the CPU even when training on a GPU (the fused AdamW used on CUDA keeps them on the GPU and reads none)
_NOT_THE_LOOP = (str(ROOT / "py" / "mgpu" / "data"), str(ROOT / "py" / "mgpu" / "collate.py"),
                 "torch/utils/data", "torch/optim/")


class SyncCounter:
    """Counts syncing Tensor calls made by the training loop, per step, and marks the check steps."""

    def __init__(self):
        self.step = 0
        self.per_step: Counter[int] = Counter()
        self.where: dict[int, list[str]] = {}
        self.checks: set[int] = set()
        self._saved: dict[str, object] = {}

    def _count(self, name: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            stack = traceback.extract_stack(limit=40)[:-1]
            files = [frame.filename for frame in stack]
            in_loop = any(f.endswith("mgpu/train_clip.py") for f in files)
            if in_loop and not any(part in f for f in files for part in _NOT_THE_LOOP):
                counter.per_step[counter.step] += 1
                frame = next(fr for fr in reversed(stack) if "/mgpu/" in fr.filename)
                counter.where.setdefault(counter.step, []).append(f"{name} at {Path(frame.filename).name}:{frame.lineno}")
            return original(tensor, *args, **kwargs)
        return wrapper

    def __enter__(self) -> "SyncCounter":
        for name in _SYNCING:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._count(name, self._saved[name]))
        self._saved["train_step"], self._saved["check"] = step.train_step, monitor.Monitor.check
        counter, train_step, check = self, step.train_step, monitor.Monitor.check

        def counted_step(stepper, batches):
            counter.step += 1
            if stepper.device.type != "cuda":
                return train_step(stepper, batches)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    return train_step(stepper, batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counter.per_step[counter.step] += sum("synchroniz" in str(w.message) for w in caught)

        def marked_check(self_):
            counter.checks.add(counter.step)
            return check(self_)
        train_clip.train_step = counted_step
        monitor.Monitor.check = marked_check
        return self

    def __exit__(self, *exc) -> None:
        for name in _SYNCING:
            setattr(torch.Tensor, name, self._saved[name])
        train_clip.train_step = self._saved["train_step"]
        monitor.Monitor.check = self._saved["check"]

    def between_checks(self) -> dict[int, int]:
        """Steps that are not check steps and still synced: {step: count}; empty when the loop is sync-free.
        Step 0 is the set-up before the first step, not the loop."""
        return {s: n for s, n in self.per_step.items() if n and s and s not in self.checks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--accum-steps", type=int, default=2)
    p.add_argument("--check-every", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out, SyncCounter() as counter:
        code = train_clip.main(["--image-encoder", "starnet_s050", "--text-encoder", "bert:tiny-chinese",
                                "--embed-dim", "32", "--image-size", "32", "--train-size", "256", "--val-size", "32",
                                "--batch-size", "8", "--accum-steps", str(args.accum_steps), "--workers", "0",
                                "--max-steps", str(args.steps), "--log-every", "8", "--check-every",
                                str(args.check_every), "--device", args.device, "--amp", args.amp, "--no-tb",
                                "--output-dir", out])
    if code:
        return code
    print(f"\n{args.steps} steps on {args.device}, --accum-steps {args.accum_steps}, --check-every {args.check_every}, "
          f"--log-every 8: check steps {sorted(counter.checks)}")
    for s in range(1, args.steps + 1):
        mark = "check" if s in counter.checks else "     "
        where = Counter(counter.where.get(s, []))
        print(f"step {s:3d} {mark}: {counter.per_step[s]} sync(s) {', '.join(f'{w} x{n}' for w, n in where.items())}")
    between = counter.between_checks()
    print(f"syncs between check steps: {sum(between.values())} (steps {sorted(between)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
