"""Peak memory and samples/s of one CLIP training step with and without --grad-checkpointing, and with
--accum-steps (the same global batch in K micro-batches). Each configuration runs in a fresh process, so
peaks do not mix. Prints its figures; asserts nothing.

    .venv/bin/python bench/train_memory.py                      # CPU: StarNet-s1 x clip:tiny, 96 px, batch 64
    python bench/train_memory.py --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 \\
        --image-size 224 --batch-size 256 --amp bf16            # a GPU (peak = torch.cuda.max_memory_allocated)

Memory on the CPU is the process's peak resident set above what it held before the first step (model and
batch); the optimizer's state and the gradients (three times the parameters) are in every row alike. On a shared
CPU the wall-clock samples/s depend on the other load; the CPU seconds a step (all threads) much less.
"Activations" is what autograd kept at the end of one forward pass (saved tensors, counted by a hook): the
part checkpointing and accumulation shrink.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "py"))

from mgpu.bn import set_train_mode  # noqa: E402
from mgpu.clip import CLIP  # noqa: E402
from mgpu.models import image_encoder, text_encoder  # noqa: E402
from mgpu.optim import optimizer_for, schedule  # noqa: E402
from mgpu.step import Stepper, train_step  # noqa: E402

CONFIGS = {"plain": (False, 1), "grad-checkpointing": (True, 1), "accum-steps 4": (False, 4),
           "both": (True, 4)}


def _rss_bytes() -> int:
    """This process's resident set now (Linux /proc; else the peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _saved_activation_bytes(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> int:
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(images, tokens)
    del out
    return sum(sizes)


def one(args, checkpointing: bool, accum: int) -> dict:
    """Runs in the child process: a few steps of one configuration."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CLIP(image_encoder(args.image_encoder), text_encoder(args.text_encoder), args.embed_dim).to(device)
    model.autocast_dtype = torch.bfloat16 if args.amp == "bf16" else None
    if checkpointing:
        model.set_grad_checkpointing(True)
    set_train_mode(model, freeze_bn=False)
    optimizer = optimizer_for(model, 1e-4, 0.1, fused=device.type == "cuda")
    stepper = Stepper(model, model, optimizer, schedule(optimizer, 0, 1000), torch.amp.GradScaler(device.type, enabled=False),
                      device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 400, (args.batch_size, args.tokens), generator=g)
    tokens[:, -1] = 49407 if args.text_encoder.startswith("clip") else 102
    batch = {"image": torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g), "tokens": tokens}
    micro = [{k: v.chunk(accum)[i] for k, v in batch.items()} for i in range(accum)]
    activations = _saved_activation_bytes(model, micro[0]["image"].to(device), micro[0]["tokens"].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    train_step(stepper, micro)  # warm-up (its peak counts: the optimizer's state appears here)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        out = train_step(stepper, micro)
    out.loss.item()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else _peak_rss_bytes() - base
    return {"samples_per_second": args.steps * args.batch_size / seconds, "peak_bytes": peak,
            "activation_bytes": activations, "cpu_seconds_per_step": cpu_seconds / args.steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-encoder", default="starnet_s1")
    p.add_argument("--text-encoder", default="clip:tiny")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch of every configuration")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--amp", choices=("off", "bf16"), default="off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (bench/gpu_check.sh reads them)")
    p.add_argument("--only", choices=tuple(CONFIGS), help=argparse.SUPPRESS)  # the child's configuration
    args = p.parse_args()
    if args.only:
        print(json.dumps(one(args, *CONFIGS[args.only])))
        return 0
    rows = {}
    for name in CONFIGS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", name], capture_output=True, text=True)
        if child.returncode:
            print(child.stderr, file=sys.stderr)
            return 1
        rows[name] = json.loads(child.stdout.strip().splitlines()[-1])
    where = "GPU, max allocated" if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads, peak RSS"
    print(f"{args.image_encoder} x {args.text_encoder}, {args.image_size} px, global batch {args.batch_size}, "
          f"amp {args.amp}, {args.steps} steps on {args.device} ({where})")
    plain = rows["plain"]
    for name, r in rows.items():
        print(f"{name:20}: {r['samples_per_second']:7.1f} samples/s ({r['samples_per_second'] / plain['samples_per_second']:.2f}x), "
              f"{r['cpu_seconds_per_step']:6.2f} CPU s a step ({r['cpu_seconds_per_step'] / plain['cpu_seconds_per_step']:.2f}x), "
              f"peak +{r['peak_bytes'] / 2**20:7.1f} MiB, activations kept {r['activation_bytes'] / 2**20:7.1f} MiB "
              f"({r['activation_bytes'] / plain['activation_bytes']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "batch_size": args.batch_size, "amp": args.amp,
                                               "configurations": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
