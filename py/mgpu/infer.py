"""Data-parallel inference (seed 001): one full model per process, the data cut into contiguous shards,
the results merged back in dataset order. ``infer_parallel.sh`` runs one process per GPU; each can be
run alone:

    python -m mgpu.infer --checkpoint C --out DIR --shard 1/4          # encode shard 1 of 4
    python -m mgpu.infer --checkpoint C --out DIR --merge 4            # join the 4 shards, score them
    python -m mgpu.infer --checkpoint C --plan                         # memory a process needs (MiB)

A shard writes ``DIR/shards/shard_<i>_of_<N>.npz`` (image and text embeddings, float32, and the sample
indices) and a ``.json`` with its throughput, each atomically. The merge checks that every sample is
there exactly once, then writes ``DIR/image_embeddings.npy``, ``DIR/text_embeddings.npy`` and
``DIR/metrics.json`` (the trainer's retrieval metrics, and per-shard throughput).

The model, its tokenizer and, unless ``--data`` says otherwise, the data (the validation split the
checkpoint was trained with) all come from the checkpoint's config, so nothing has to be repeated.
Exit codes: 0 done, 2 bad input (checkpoint, data, flags), 1 a failure while encoding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import train_clip, train_params
from .checkpoint import CheckpointError, load_model, read_checkpoint
from .clip import CLIP
from .collate import collate_fn
from .data import loading
from .data.captions import CaptionFile, DataError
from .evaluate import shard
from .metrics import retrieval_metrics
from .models import image_encoder, text_encoder
from .progress import Progress

CUDA_CONTEXT_MIB = 500  # what a CUDA context and the caching allocator take before any tensor


class InferError(ValueError):
    """A bad checkpoint, data file or flag; exit code 2."""


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: I must be from 0 to N-1")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mgpu.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint_<step>.pt or model.pt of mgpu.train_clip")
    p.add_argument("--out", help="output folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shard", type=parse_shard, metavar="I/N", help="encode shard I of N (0-based)")
    what.add_argument("--merge", type=train_params._number(int, 1), metavar="N", help="merge the N shards")
    what.add_argument("--plan", action="store_true", help="print the MiB one process needs, then exit")
    p.add_argument("--data", help="default: the validation split the checkpoint was trained with; or "
                                  "'synthetic' (its val split), or a .csv/.tsv/.jsonl file (every row)")
    p.add_argument("--image-encoder", help="must match the checkpoint (a check, not a choice)")
    p.add_argument("--text-encoder", help="must match the checkpoint (a check, not a choice)")
    p.add_argument("--batch-size", type=train_params._number(int, 1), default=256)
    p.add_argument("--workers", type=train_params._number(int, 0), default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=("off", "bf16"), default="off")
    return p


def _config(state: dict, path: str, args) -> argparse.Namespace:
    config = state.get("config")
    if not isinstance(config, dict) or "image_encoder" not in config:
        raise InferError(f"--checkpoint {path}: holds no mgpu.train_clip config (is it a bare state dict?)")
    for key in ("image_encoder", "text_encoder"):
        given = getattr(args, key)
        if given and given != config[key]:
            raise InferError(f"--{key.replace('_', '-')} {given}: the checkpoint {path} was trained with "
                             f"{config[key]}")
    defaults = vars(train_clip.parse_args([]))
    defaults.update({k: v for k, v in config.items() if k in defaults})
    defaults.update(workers=args.workers, batch_size=args.batch_size)
    return argparse.Namespace(**defaults)


def load(args) -> tuple[CLIP, argparse.Namespace, dict]:
    try:
        state = read_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise InferError(f"--checkpoint {exc}") from None
    config = _config(state, args.checkpoint, args)
    model = CLIP(image_encoder(config.image_encoder), text_encoder(config.text_encoder), config.embed_dim)
    try:
        load_model(model, state)
    except CheckpointError as exc:
        raise InferError(str(exc)) from None
    return model, config, state


def dataset(config: argparse.Namespace, data: str | None, tokenizer_state: dict | None):
    """The rows to encode: --data's file (every row), or the val split of the checkpoint's data."""
    try:
        if data and data != "synthetic":
            return CaptionFile(data, config.image_size, img_key=config.csv_img_key, caption_key=config.csv_caption_key,
                               separator=config.csv_separator,
                               tokenizer=loading.build_tokenizer(config, [], tokenizer_state))
        if data == "synthetic":
            config = argparse.Namespace(**{**vars(config), "data": "synthetic"})
        return loading.build_data(config, tokenizer_state)[1]
    except DataError as exc:
        raise InferError(str(exc)) from None


def plan_mib(state: dict, config: argparse.Namespace, batch_size: int) -> dict[str, int]:
    """What one inference process needs on a GPU: the weights, activations (a rule of thumb: 40 times a
    batch of fp32 images, about what a StarNet peaks at), and the CUDA context."""
    weights = sum(t.numel() * t.element_size() for t in state["model"].values() if isinstance(t, torch.Tensor))
    activations = batch_size * 3 * config.image_size ** 2 * 4 * 40
    parts = {"weights": math.ceil(weights / 2**20), "activations": math.ceil(activations / 2**20),
             "context": CUDA_CONTEXT_MIB}
    parts["total"] = sum(parts.values())
    return parts


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_paths(out: Path, i: int, n: int) -> tuple[Path, Path]:
    base = out / "shards" / f"shard_{i}_of_{n}"
    return base.with_suffix(".npz"), base.with_suffix(".json")


@torch.no_grad()
def encode_shard(args) -> int:
    model, config, state = load(args)
    data = dataset(config, args.data, state["config"].get("tokenizer"))
    i, n = args.shard
    rows = shard(len(data), i, n)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    model.to(device).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, list(rows)), args.batch_size,
                                         collate_fn=collate_fn, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    progress = Progress(len(loader), desc=f"shard {i}/{n}")
    images, texts, start = [], [], time.perf_counter()
    for step, batch in enumerate(loader, 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            images.append(model.encode_image(batch["image"].to(device, non_blocking=True)).float().cpu())
            texts.append(model.encode_text(batch["tokens"].to(device, non_blocking=True)).float().cpu())
        progress.update(step, batch["image"].shape[0])
    progress.close()
    seconds = time.perf_counter() - start
    out = Path(args.out)
    npz, meta = shard_paths(out, i, n)
    npz.parent.mkdir(parents=True, exist_ok=True)
    dim = model.image_projection.out_features
    arrays = {"image": torch.cat(images).numpy() if images else np.zeros((0, dim), np.float32),
              "text": torch.cat(texts).numpy() if texts else np.zeros((0, dim), np.float32),
              "index": np.arange(rows.start, rows.stop, dtype=np.int64)}  # positions in the dataset, in order
    _atomic(npz, lambda f: np.savez(f, **arrays))
    info = {"shard": i, "shards": n, "rows": [rows.start, rows.stop], "dataset_size": len(data),
            "samples": len(rows), "seconds": seconds, "samples_per_second": len(rows) / max(seconds, 1e-9),
            "device": str(device), "gpu": os.environ.get("MGPU_GPU", "")}
    _atomic(meta, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    print(f"shard {i}/{n}: {len(rows)} samples (rows {rows.start}-{rows.stop - 1}) in {seconds:.1f} s, "
          f"{info['samples_per_second']:.0f} samples/s on {device}; {npz}", flush=True)
    return 0


def merge(args) -> int:
    out, n = Path(args.out), args.merge
    missing = [i for i in range(n) if not shard_paths(out, i, n)[0].is_file()]
    if missing:
        raise InferError(f"{out}/shards: shard(s) {', '.join(map(str, missing))} of {n} missing; run them "
                         f"(python -m mgpu.infer --shard I/{n} ...), or infer_parallel.sh --resume")
    parts = [np.load(shard_paths(out, i, n)[0]) for i in range(n)]
    infos = [json.loads(shard_paths(out, i, n)[1].read_text()) for i in range(n)]
    index = np.concatenate([p["index"] for p in parts])
    size = infos[0]["dataset_size"]
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(size)):
        raise InferError(f"{out}/shards: the {n} shards do not hold samples 0-{size - 1} exactly once "
                         f"({len(index)} rows, {len(np.unique(index))} distinct): were they made with different data?")
    image = np.concatenate([p["image"] for p in parts])[order].astype(np.float32)
    text = np.concatenate([p["text"] for p in parts])[order].astype(np.float32)
    _atomic(out / "image_embeddings.npy", lambda f: np.save(f, image))
    _atomic(out / "text_embeddings.npy", lambda f: np.save(f, text))
    metrics = {"key_metric": "image_to_text_R@1",
               **retrieval_metrics(torch.from_numpy(image), torch.from_numpy(text)),
               "samples": size, "shards": infos,
               "wall_seconds": max(i["seconds"] for i in infos),
               "samples_per_second": size / max(max(i["seconds"] for i in infos), 1e-9)}
    _atomic(out / "metrics.json", lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
    print(f"{'shard':>5}  {'device':8}  {'gpu':>3}  {'samples':>7}  {'seconds':>7}  {'samples/s':>9}")
    for info in infos:
        print(f"{info['shard']:>5}  {info['device']:8}  {info['gpu'] or '-':>3}  {info['samples']:>7}  "
              f"{info['seconds']:>7.1f}  {info['samples_per_second']:>9.0f}")
    print(f"merged {size} samples from {n} shard(s): image->text R@1 {metrics['image_to_text_R@1']:.3f}, "
          f"text->image R@1 {metrics['text_to_image_R@1']:.3f}; {out}/image_embeddings.npy, "
          f"text_embeddings.npy, metrics.json", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plan:
            model_state = read_checkpoint(args.checkpoint)
            config = _config(model_state, args.checkpoint, args)
            parts = plan_mib(model_state, config, args.batch_size)
            print(" ".join(f"{k}={v}" for k, v in parts.items()))
            return 0
        if not args.out:
            raise InferError("--out DIR is needed with --shard and --merge")
        return encode_shard(args) if args.shard else merge(args)
    except CheckpointError as exc:
        print(f"mgpu.infer: error: --checkpoint {exc}", file=sys.stderr)
        return 2
    except InferError as exc:
        print(f"mgpu.infer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
