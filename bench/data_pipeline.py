"""Images per second per worker core: mgpu's image reader against a bare Pillow loop, on real-size JPEGs.

    .venv/bin/python bench/data_pipeline.py                       # 640x480 and 1024x768, 224 px out
    .venv/bin/python bench/data_pipeline.py --image-size 64 --loader-workers 2

The script draws photo-like JPEGs (smooth gradients, overlapping shapes, sensor-like noise; quality 90, about
2-3 bits a pixel as camera photos) into a temporary folder, then times, each in this one process with one torch
thread (one DataLoader worker's core):

- bare:      ``Image.open(f).convert("RGB").resize((s, s), BICUBIC)`` (a PIL image; nothing else)
- before:    the same plus the conversion to a float tensor (mgpu's reader until now)
- mgpu:      ``mgpu.data.images.decode``: JPEG draft (reduced-scale decode) + uint8 antialiased bicubic in torch
- no-draft:  ``decode(..., reduced=False)``: the torch resize alone, to show what each step brings

and prints images per CPU-second of this process (one worker core's throughput, not disturbed by other jobs on
the machine), the ratio to ``bare``, and how far mgpu's tensors are from ``before``'s (max and mean
absolute difference in grey levels of 255, PSNR), beside JPEG's own error at quality 90 for scale. ``--loader-workers N`` also runs the whole dataset path
(CaptionFile in a DataLoader with N workers) and prints images per CPU-second of all its processes, and images
per wall-second. Asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "py"))
from mgpu.data import images  # noqa: E402


def photo(width: int, height: int, rng: np.random.Generator):
    """A photo-like RGB image: a lit gradient, 40 overlapping shapes with soft shading, and grain."""
    from PIL import Image, ImageDraw, ImageFilter

    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    light = rng.uniform(0.3, 1.0, 3)
    base = np.stack([light[c] * (0.6 + 0.4 * np.sin(3 * x + 2 * y + c)) for c in range(3)], -1)
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.02, 0.25) * width, rng.uniform(0.02, 0.25) * height
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:
            draw.polygon([(cx + rx * math.cos(a), cy + ry * math.sin(a))
                          for a in np.sort(rng.uniform(0, 2 * math.pi, 5))], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))  # lens softness
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def make_files(folder: Path, sizes: list[tuple[int, int]], count: int, seed: int) -> dict[tuple[int, int], list[Path]]:
    """count JPEGs of each size; the first 8 of each also as a lossless PNG (to measure JPEG's own error)."""
    rng = np.random.default_rng(seed)
    files = {}
    for w, h in sizes:
        files[(w, h)] = []
        for i in range(count):
            path = folder / f"{w}x{h}_{i:04d}.jpg"
            img = photo(w, h, rng)
            img.save(path, "JPEG", quality=90)
            if i < 8:
                img.save(path.with_suffix(".png"))
            files[(w, h)].append(path)
    return files


def bare(path: Path, size: int):
    from PIL import Image

    return Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def before(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float().div_(255)


READERS = {
    "bare": bare,
    "before": before,
    "mgpu": lambda p, s: images.decode(p, s)[0],
    "no-draft": lambda p, s: images.decode(p, s, reduced=False)[0],
}


def cpu_rate(reader, files: list[Path], size: int, seconds: float) -> float:
    """Images per CPU-second of this process in one pass of at least `seconds` CPU seconds: what one worker core
    delivers, however busy the rest of the machine is."""
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for path in files:
            reader(path, size)
        n += len(files)
    return n / (time.process_time() - start)


def rates(files: list[Path], size: int, seconds: float, rounds: int) -> tuple[dict[str, float], float, float]:
    """Each reader's median rate over `rounds` rounds; in each round every reader runs once, one after the other,
    so all meet the same conditions; and the median over rounds of mgpu/bare and mgpu/before."""
    for reader in READERS.values():
        for path in files[:4]:
            reader(path, size)  # warm the page cache and the code paths
    per_round = [{name: cpu_rate(reader, files, size, seconds) for name, reader in READERS.items()}
                 for _ in range(rounds)]
    median = {name: statistics.median(r[name] for r in per_round) for name in READERS}
    return (median, statistics.median(r["mgpu"] / r["bare"] for r in per_round),
            statistics.median(r["mgpu"] / r["before"] for r in per_round))


def difference(pairs, size: int) -> tuple[float, float, float]:
    """Max and mean absolute difference (grey levels of 255) and PSNR (dB) between two readers' tensors, over
    (reader_a, path_a, reader_b, path_b) tuples."""
    worst, total, squares, n = 0.0, 0.0, 0.0, 0
    for read_a, a, read_b, b in pairs:
        d = (read_a(a, size) - read_b(b, size)).abs().mul_(255)
        worst, total, squares, n = max(worst, d.max().item()), total + d.sum().item(), squares + d.pow(2).sum().item(), n + d.numel()
    mse = squares / n
    return worst, total / n, 10 * math.log10(255 ** 2 / mse) if mse else math.inf


def loader_rate(files: list[Path], size: int, workers: int, seconds: float, one_core: float) -> tuple[float, float]:
    """The whole dataset path, CaptionFile (tokenizer-free) in a DataLoader with `workers` workers: (images per
    CPU-second of the workers and the main process together, images per wall-second)."""
    from mgpu.collate import collate_fn
    from mgpu.data.captions import CaptionFile

    folder = files[0].parent
    csv = folder / f"bench_{files[0].stem.split('_')[0]}.csv"
    csv.write_text("filepath,title\n" + "".join(f"{p.name},a photo {i}\n" for i, p in enumerate(files)))
    data = CaptionFile(csv, size)

    def collate(batch):
        for sample in batch:
            sample["tokens"] = torch.ones(1, dtype=torch.long)
        return collate_fn(batch)

    # one long epoch (the files over and over, about `seconds` of CPU for each worker at one core's rate), so
    # the workers start once; they end with it, and their CPU time then reaches RUSAGE_CHILDREN
    order = list(range(len(files))) * max(1, round(seconds * max(workers, 1) * one_core / len(files)))
    loader = torch.utils.data.DataLoader(data, batch_size=16, num_workers=workers, collate_fn=collate, sampler=order)
    cpu = lambda: sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime  # noqa: E731
                      for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    n, wall, used = 0, time.perf_counter(), cpu()
    for batch in loader:
        n += batch["image"].shape[0]
    return n / (cpu() - used), n / (time.perf_counter() - wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="640x480,1024x768", help="JPEG sizes WxH, comma-separated (default: %(default)s)")
    p.add_argument("--count", type=int, default=48, help="files of each size (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="the model's input side in pixels (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="CPU seconds of one timed pass (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; medians are shown (default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="also time CaptionFile in a DataLoader with this many workers (0: skip; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn images (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    from PIL import __version__ as pillow

    print(f"$ {' '.join(['python', *sys.argv])}")
    print(f"Pillow {pillow}, torch {torch.__version__}, one process, one torch thread; {args.count} JPEGs of each "
          f"size (quality 90) -> {args.image_size} px; images per CPU-second (one worker core): medians of "
          f"{args.rounds} rounds, each reader once a round")
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-data.") as tmp:
        files = make_files(Path(tmp), sizes, args.count, args.seed)
        print(f"{'file':>10}  {'KB':>4}  {'bits/px':>7}  " + "  ".join(f"{name:>9}" for name in READERS)
              + f"  {'mgpu/bare':>9}  {'mgpu/before':>11}  {'max diff':>8}  {'mean diff':>9}  {'PSNR dB':>7}")
        for (w, h), group in files.items():
            size_kb = statistics.mean(f.stat().st_size for f in group) / 1024
            speed, vs_bare, vs_before = rates(group, args.image_size, args.seconds, args.rounds)
            mgpu = READERS["mgpu"]
            worst, mean, psnr = difference([(mgpu, f, before, f) for f in group], args.image_size)
            jpeg = difference([(before, f, before, f.with_suffix(".png")) for f in group[:8]], args.image_size)[2]
            print(f"{w:>4}x{h:<5}  {size_kb:>4.0f}  {size_kb * 8192 / (w * h):>7.2f}  "
                  + "  ".join(f"{speed[name]:>9.1f}" for name in READERS)
                  + f"  {vs_bare:>8.2f}x  {vs_before:>10.2f}x"
                  + f"  {worst:>8.1f}  {mean:>9.3f}  {psnr:>7.1f}  {jpeg:>10.1f}")
            if args.loader_workers:
                per_cpu, per_wall = loader_rate(group, args.image_size, args.loader_workers, args.seconds * args.rounds,
                                                speed["mgpu"])
                print(f"{'':>10}  CaptionFile in a DataLoader, {args.loader_workers} worker(s): {per_cpu:.1f} images "
                      f"per CPU-second (all processes), {per_wall:.1f} images/s wall")
    print("max/mean diff, PSNR: mgpu's tensors against before's (Pillow's full decode and resize), grey levels of 255;\n"
          "JPEG PSNR: before's tensors of the JPEG against the same of the lossless original: JPEG's own error")


if __name__ == "__main__":
    main()
