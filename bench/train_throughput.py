"""Trainer pipeline efficiency: mgpu.train_clip's end-to-end samples/s against a bare
forward/backward/step loop of the same model and batch on one fixed batch (no data loading, no logging,
no loss.item()), and peak memory. Prints its figures; asserts nothing.

    .venv/bin/python bench/train_throughput.py                        # CPU: the demo towers, 32 px
    python bench/train_throughput.py --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 \\
        --image-size 224 --batch-size 128 --amp bf16 --steps 100      # the GPU figure of issue #4

Efficiency = trainer samples/s / bare samples/s; the target is at least 0.9. The trainer runs twice: with
every synthetic sample drawn once (one epoch: on a small CPU, drawing competes with the model for the
cores), and with a 5-batch set that stays in memory after its first pass (the trainer's own overhead).
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
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--tokens", type=int, default=16, help="bare loop: text length (the synthetic captions' ~12-20)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rates = {}
    # every sample drawn once (one epoch), and the synthetic set held in memory after its first pass
    for label, train_size in (("one epoch", args.batch_size * args.steps), ("data in memory", args.batch_size * 5)):
        with tempfile.TemporaryDirectory() as out:
            argv = ["--image-encoder", args.image_encoder, "--text-encoder", args.text_encoder,
                    "--image-size", str(args.image_size), "--embed-dim", str(args.embed_dim),
                    "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--amp", args.amp,
                    "--workers", str(args.workers), "--train-size", str(train_size),
                    "--val-size", str(args.batch_size), "--warmup", "10", "--no-tb", "--output-dir", out]
            if train_clip.main(argv) != 0:
                return 1
            rates[label] = json.loads((Path(out) / "metrics.json").read_text())["samples_per_second"]
    trainer_memory = peak_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bare = bare_loop(args, device)
    print(f"\n{args.image_encoder} x {args.text_encoder}, {args.image_size} px, batch {args.batch_size}, "
          f"amp {args.amp}, {args.steps} steps on {device} ({torch.get_num_threads()} threads)")
    for label, rate in rates.items():
        print(f"trainer, {label:15}: {rate:8.1f} samples/s, efficiency {rate / bare:.3f} (target >= 0.9)")
    print(f"bare loop               : {bare:8.1f} samples/s (one fixed batch, {args.tokens} tokens)")
    print(f"peak memory             : trainer {trainer_memory}; bare loop {peak_memory(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
