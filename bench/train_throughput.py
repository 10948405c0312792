"""Trainer pipeline efficiency: mgpu.train_clip's end-to-end samples/s against a bare
forward/backward/step loop of the same model and batch on one fixed batch (no data loading, no logging,
no loss.item()), and peak memory. Prints its figures; asserts nothing.

    .venv/bin/python bench/train_throughput.py                        # CPU: the demo towers, 32 px
    python bench/train_throughput.py --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 \\
        --image-size 224 --batch-size 128 --amp bf16 --steps 100      # the GPU figure of issue #4

Efficiency = trainer samples/s / bare samples/s; the target is at least 0.9. The trainer is measured twice:
with every synthetic sample drawn once by --workers loader processes (one epoch: the data pipeline
included; on a small CPU drawing competes with the model for the cores, and on a fast GPU drawing 224 px
images can be the limit), and with a 5-batch set the main process keeps after its first pass, in the
steady state (a run of --steps minus a run of a quarter of them: start-up and warm-up cancel): the
trainer's own overhead against the bare loop.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "py"))

from mgpu import train_clip  # noqa: E402
from mgpu.clip import CLIP, clip_loss  # noqa: E402
from mgpu.models import image_encoder, text_encoder  # noqa: E402
from mgpu.optim import optimizer_for  # noqa: E402


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process peak)"


def bare_loop(args, device: torch.device) -> float:
    torch.manual_seed(0)
    model = CLIP(image_encoder(args.image_encoder), text_encoder(args.text_encoder), args.embed_dim).to(device)
    optimizer = optimizer_for(model, 1e-4, 0.1)
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    tokens = torch.randint(1, 400, (args.batch_size, args.tokens), device=device)
    tokens[:, -1] = 49407 if args.text_encoder.startswith("clip") else 102  # an end token to pool at

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            out = model(images, tokens)
        loss = clip_loss(out.image.float(), out.text.float(), out.scale.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-encoder", default="starnet_s050")
    p.add_argument("--text-encoder", default="clip:tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--amp", choices=("off", "bf16"), default="off")
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--tokens", type=int, default=16, help="bare loop: text length (the synthetic captions' ~12-20)")
    p.add_argument("--memory-workers", type=int, default=0,
                   help="loader processes of the data-in-memory run (each keeps its own copy of the 5 batches)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (bench/gpu_check.sh reads them)")
    args = p.parse_args()
    if args.steps < 2:
        p.error(f"--steps {args.steps}: at least 2 (the steady state is a run of --steps minus a shorter one)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    def trainer_seconds(steps: int, train_size: int, workers: int) -> float:
        """The trainer's training seconds (evaluation and set-up excluded) for `steps` steps."""
        with tempfile.TemporaryDirectory() as out:
            argv = ["--image-encoder", args.image_encoder, "--text-encoder", args.text_encoder,
                    "--image-size", str(args.image_size), "--embed-dim", str(args.embed_dim),
                    "--batch-size", str(args.batch_size), "--max-steps", str(steps), "--amp", args.amp,
                    "--workers", str(workers), "--train-size", str(train_size),
                    "--val-size", str(args.batch_size), "--warmup", "10", "--no-tb", "--output-dir", out,
                    *(["--device", args.device] if args.device else [])]
            if train_clip.main(argv) != 0:
                raise SystemExit(1)
            rate = json.loads((Path(out) / "metrics.json").read_text())["samples_per_second"]
        return steps * args.batch_size / rate

    rates = {}
    # 1. every sample drawn once (one epoch), by --workers loader processes: the data pipeline included
    rates["one epoch"] = args.steps * args.batch_size / trainer_seconds(args.steps, args.batch_size * args.steps,
                                                                        args.workers)
    # 2. the trainer's own overhead: a 5-batch set that the main process keeps after its first pass
    #    (--workers 0: worker processes would each draw and keep their own copy), in the steady state:
    #    a run of `steps` minus a run of steps/4, so start-up, the first draws and warm-up cancel out
    short = max(args.steps // 4, 1)
    seconds = trainer_seconds(args.steps, args.batch_size * 5, args.memory_workers) \
        - trainer_seconds(short, args.batch_size * 5, args.memory_workers)
    rates["data in memory"] = (args.steps - short) * args.batch_size / max(seconds, 1e-9)
    trainer_memory = peak_memory(device)
    trainer_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bare = bare_loop(args, device)
    print(f"\n{args.image_encoder} x {args.text_encoder}, {args.image_size} px, batch {args.batch_size}, "
          f"amp {args.amp}, {args.steps} steps on {device} ({torch.get_num_threads()} threads)")
    for label, rate in rates.items():
        print(f"trainer, {label:15}: {rate:8.1f} samples/s, efficiency {rate / bare:.3f} (target >= 0.9)")
    print(f"bare loop               : {bare:8.1f} samples/s (one fixed batch, {args.tokens} tokens)")
    print(f"peak memory             : trainer {trainer_memory}; bare loop {peak_memory(device)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": str(device), "batch_size": args.batch_size, "amp": args.amp, "steps": args.steps,
            "trainer_samples_per_second": rates, "bare_samples_per_second": bare,
            "efficiency": {label: rate / bare for label, rate in rates.items()},
            "trainer_peak_mib": trainer_peak / 2**20 if trainer_peak is not None else None,
            "bare_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
