"""Data-parallel inference: one full model per process, the data cut into contiguous shards, the results
merged back in dataset order. ``infer_parallel.sh`` runs one process per GPU; each can be
run alone:

    python -m mgpu.infer --checkpoint C --out DIR --shard 1/4          # encode shard 1 of 4
    python -m mgpu.infer --checkpoint C --out DIR --merge 4            # join the 4 shards, score them
    python -m mgpu.infer --checkpoint C --plan                         # memory a process needs (MiB)

A shard writes ``DIR/shards/shard_<i>_of_<N>.npz`` (image and text embeddings, float32, the sample indices,
each row's id and image, and whether its image could be read) and a ``.json`` with its throughput, each
atomically. The merge checks that every sample is there exactly once, then writes, in dataset order:
``DIR/image_embeddings.npy`` and ``DIR/text_embeddings.npy`` (one row per data row), ``DIR/valid.npy`` (bool:
the row's image could be read), ``DIR/rows.csv`` (position, row, image, valid, problem: to join the results
back to the data) and ``DIR/metrics.json`` (the trainer's retrieval metrics over the valid rows, and
per-shard throughput).

A row whose image cannot be read is never given another image's result: its image embedding is NaN, it is
left out of the metrics, and it is counted and named. More than ``--max-bad-images`` of them (a fraction of
the rows; default 0.01) fail the merge (exit 2) after rows.csv and valid.npy are written; rerun the merge
with a higher value to accept them. Metrics over fewer than 100 valid rows come with a warning; over fewer
than 2 they are not computed.

The model, its tokenizer and, unless ``--data`` says otherwise, the data (the validation split the
checkpoint was trained with) all come from the checkpoint's config, so nothing has to be repeated.
Exit codes: 0 done, 2 bad input (checkpoint, data, flags), 1 a failure while encoding.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model, read_checkpoint
from .clip import CLIP
from .collate import collate_fn
from .data import loading
from .data.captions import DataError
from .data.checks import WARN_VAL_SAMPLES
from .data.config import DataConfig
from .evaluate import shard
from .metrics import retrieval_metrics
from .models import image_encoder, text_encoder
from .progress import Progress

CUDA_CONTEXT_MIB = 500  # what a CUDA context and the caching allocator take before any tensor
SHOWN = 5  # bad rows named in one message


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


def _number(kind, low: float, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (value >= low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be from {low} to {high}" if high is not None
                                             else f"{text!r}: must be at least {low}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mgpu.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint_<step>.pt or model.pt of mgpu.train_clip")
    p.add_argument("--out", help="output folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--shard", type=parse_shard, metavar="I/N", help="encode shard I of N (0-based)")
    what.add_argument("--merge", type=_number(int, 1), metavar="N", help="merge the N shards")
    what.add_argument("--plan", action="store_true", help="print the MiB one process needs, then exit")
    p.add_argument("--data", help="default: the validation split the checkpoint was trained with; or "
                                  "'synthetic' (its val split), a .csv/.tsv/.jsonl file or .tar shards (every row)")
    p.add_argument("--image-encoder", help="must match the checkpoint (a check, not a choice)")
    p.add_argument("--text-encoder", help="must match the checkpoint (a check, not a choice)")
    p.add_argument("--batch-size", type=_number(int, 1), default=256, help="per process (default: 256)")
    p.add_argument("--workers", type=_number(int, 0), default=None,
                   help="DataLoader workers (default: auto, the usable cores / LOCAL_WORLD_SIZE, at most 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", choices=("off", "bf16"), default="off", help="bf16 autocast (default: off)")
    p.add_argument("--max-bad-images", type=_number(float, 0, 1), default=0.01, metavar="FRACTION",
                   help="--merge fails when more than this fraction of the rows has an image that cannot be read "
                        "(default: 0.01)")
    return p


def _config(state: dict, path: str, args) -> tuple[dict, DataConfig]:
    """The checkpoint's saved trainer config, and the data config built from it (with this run's workers)."""
    config = state.get("config")
    if not isinstance(config, dict) or "image_encoder" not in config:
        raise InferError(f"--checkpoint {path}: holds no mgpu.train_clip config (is it a bare state dict?)")
    for key in ("image_encoder", "text_encoder"):
        given = getattr(args, key)
        if given and given != config[key]:
            raise InferError(f"--{key.replace('_', '-')} {given}: the checkpoint {path} was trained with "
                             f"{config[key]}")
    return config, DataConfig.from_mapping(config, workers=args.workers, batch_size=args.batch_size)


def load(args) -> tuple[CLIP, DataConfig, dict]:
    try:
        state = read_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise InferError(f"--checkpoint {exc}") from None
    saved, config = _config(state, args.checkpoint, args)
    model = CLIP(image_encoder(saved["image_encoder"]), text_encoder(saved["text_encoder"]), saved["embed_dim"])
    try:
        load_model(model, state, name=args.checkpoint)
    except CheckpointError as exc:
        raise InferError(str(exc)) from None
    return model, config, state


def dataset(config: DataConfig, data: str | None, tokenizer_state: dict | None):
    """The rows to encode (see mgpu.data.loading.inference_set): an unreadable one comes back marked."""
    try:
        return loading.inference_set(config, data, tokenizer_state)
    except DataError as exc:
        raise InferError(str(exc)) from None


def pick_device(text: str) -> torch.device:
    """The --device to run on; a CUDA device becomes the current one, so nothing (the DataLoader's pin-memory
    thread included) makes a second CUDA context on GPU 0."""
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise InferError(f"--device {text}: allowed are auto, cpu, cuda, cuda:N")
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InferError(f"--device {text}: this PyTorch sees no CUDA device (torch {torch.__version__}; run "
                         f"python check_gpus.py --torch)")
    device = torch.device(text if ":" in text else "cuda:0")
    if device.index >= torch.cuda.device_count():
        raise InferError(f"--device {text}: this process sees {torch.cuda.device_count()} CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    torch.cuda.set_device(device)
    return device


def plan_mib(state: dict, config: DataConfig, batch_size: int) -> dict[str, int]:
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


def _row_info(data, position: int) -> tuple[str, str]:
    """(row id, image as written) of a dataset position; a synthetic sample is its index, with no file."""
    info = getattr(data, "row_info", None)
    if info is None:  # synthetic: the sample's index in its seed's stream
        return str(getattr(data, "offset", 0) + position), ""
    row, image = info(position)
    return str(row), str(image)


def _bad_rows(rows, images, problems, valid) -> str:
    bad = np.flatnonzero(~valid)
    text = ", ".join(f"row {rows[i]} {images[i]} ({problems[i]})" for i in bad[:SHOWN])
    return text + (f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else "")


@torch.no_grad()
def encode_shard(args) -> int:
    device = pick_device(args.device)
    model, config, state = load(args)
    data = dataset(config, args.data, state["config"].get("tokenizer"))
    i, n = args.shard
    rows = shard(len(data), i, n)
    model.to(device).eval()
    workers = config.loader_workers
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, list(rows)), args.batch_size,
                                         collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda")
    progress = Progress(len(loader), desc=f"shard {i}/{n}")
    images, texts, valid, problems, start = [], [], [], [], time.perf_counter()
    for step, batch in enumerate(loader, 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            images.append(model.encode_image(batch["image"].to(device, non_blocking=True)).float().cpu())
            texts.append(model.encode_text(batch["tokens"].to(device, non_blocking=True)).float().cpu())
        size = batch["image"].shape[0]
        valid.append(batch["valid"] if "valid" in batch else torch.ones(size, dtype=torch.bool))
        problems += batch.get("problem", [""] * size)
        progress.update(step, size)
    progress.close()
    seconds = time.perf_counter() - start
    out = Path(args.out)
    npz, meta = shard_paths(out, i, n)
    npz.parent.mkdir(parents=True, exist_ok=True)
    dim = model.image_projection.out_features
    mask = torch.cat(valid).numpy() if valid else np.zeros(0, bool)
    image = torch.cat(images).numpy() if images else np.zeros((0, dim), np.float32)
    image[~mask] = np.nan  # never another image's result
    info_rows = [_row_info(data, p) for p in rows]
    arrays = {"image": image, "text": torch.cat(texts).numpy() if texts else np.zeros((0, dim), np.float32),
              "index": np.arange(rows.start, rows.stop, dtype=np.int64),  # positions in the dataset, in order
              "valid": mask, "row": np.array([r for r, _ in info_rows], dtype=str),
              "image_name": np.array([m for _, m in info_rows], dtype=str), "problem": np.array(problems, dtype=str)}
    _atomic(npz, lambda f: np.savez(f, **arrays))
    bad = int((~mask).sum())
    info = {"shard": i, "shards": n, "rows": [rows.start, rows.stop], "dataset_size": len(data),
            "samples": len(rows), "bad_samples": bad, "seconds": seconds,
            "samples_per_second": len(rows) / max(seconds, 1e-9), "device": str(device),
            "gpu": os.environ.get("MGPU_GPU", ""), "workers": workers}
    _atomic(meta, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    if bad:
        print(f"[WARNING] shard {i}/{n}: {bad} of {len(rows)} rows have an image that cannot be read; their image "
              f"embedding is NaN and the merge leaves them out of the metrics: "
              f"{_bad_rows(arrays['row'], arrays['image_name'], arrays['problem'], mask)}", file=sys.stderr)
    print(f"shard {i}/{n}: {len(rows)} samples (rows {rows.start}-{rows.stop - 1}) in {seconds:.1f} s, "
          f"{info['samples_per_second']:.0f} samples/s on {device}; {npz}", flush=True)
    return 0


def _write_rows(path: Path, parts: dict[str, np.ndarray]) -> None:
    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["position", "row", "image", "valid", "problem"])
        for k in range(len(parts["valid"])):
            writer.writerow([k, parts["row"][k], parts["image_name"][k], int(parts["valid"][k]), parts["problem"][k]])
        text.flush()
        text.detach()
    _atomic(path, write)


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
    if any("valid" not in p for p in parts):
        raise InferError(f"{out}/shards: made by an older mgpu.infer (no validity mask); run the shards again")
    joined = {k: np.concatenate([p[k] for p in parts])[order] for k in ("image", "text", "valid", "row", "image_name",
                                                                      "problem")}
    valid = joined["valid"].astype(bool)
    bad = int((~valid).sum())
    _atomic(out / "valid.npy", lambda f: np.save(f, valid))
    _write_rows(out / "rows.csv", joined)
    if bad:
        listed = _bad_rows(joined["row"], joined["image_name"], joined["problem"], valid)
        if bad > args.max_bad_images * size:
            raise InferError(f"{bad} of {size} rows have an image that cannot be read ({100 * bad / size:.1f}%), more "
                             f"than --max-bad-images {args.max_bad_images:g}: {listed}. All rows are listed in "
                             f"{out}/rows.csv. Fix them, or merge again with a higher --max-bad-images to keep the "
                             f"other rows")
        print(f"[WARNING] {bad} of {size} rows have an image that cannot be read: left out of the metrics, image "
              f"embedding NaN, valid.npy False: {listed}", file=sys.stderr)
    image, text = joined["image"].astype(np.float32), joined["text"].astype(np.float32)
    _atomic(out / "image_embeddings.npy", lambda f: np.save(f, image))
    _atomic(out / "text_embeddings.npy", lambda f: np.save(f, text))
    good = int(valid.sum())
    scores = retrieval_metrics(torch.from_numpy(image[valid]), torch.from_numpy(text[valid])) if good >= 2 else {}
    if good < WARN_VAL_SAMPLES:
        print(f"[WARNING] {good} valid rows: " + (f"retrieval metrics over so few are coarse (R@1 moves in steps of "
              f"{1 / good:.3f}; chance is {1 / good:.3f}); use {WARN_VAL_SAMPLES}+ rows to compare models" if good >= 2
              else "too few for retrieval metrics; none computed"), file=sys.stderr)
    metrics = {"key_metric": "image_to_text_R@1", **scores, "samples": size, "valid_samples": good,
               "bad_samples": bad, "shards": infos, "wall_seconds": max(i["seconds"] for i in infos),
               "samples_per_second": size / max(max(i["seconds"] for i in infos), 1e-9)}
    _atomic(out / "metrics.json", lambda f: f.write((json.dumps(metrics, indent=2) + "\n").encode()))
    print(f"{'shard':>5}  {'device':8}  {'gpu':>3}  {'samples':>7}  {'seconds':>7}  {'samples/s':>9}")
    for info in infos:
        print(f"{info['shard']:>5}  {info['device']:8}  {info['gpu'] or '-':>3}  {info['samples']:>7}  "
              f"{info['seconds']:>7.1f}  {info['samples_per_second']:>9.0f}")
    result = (f"image->text R@1 {scores['image_to_text_R@1']:.3f}, text->image R@1 {scores['text_to_image_R@1']:.3f}"
              if scores else "no metrics")
    print(f"merged {size} samples from {n} shard(s)" + (f" ({bad} left out: image unreadable)" if bad else "")
          + f": {result}; {out}/image_embeddings.npy, text_embeddings.npy, valid.npy, rows.csv, metrics.json",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.plan:
            model_state = read_checkpoint(args.checkpoint)
            _, config = _config(model_state, args.checkpoint, args)
            parts = plan_mib(model_state, config, args.batch_size)
            print(" ".join(f"{k}={v}" for k, v in parts.items()))
            return 0
        if not args.out:
            raise InferError("--out DIR is needed with --shard and --merge")
        return encode_shard(args) if args.shard else merge(args)
    except CheckpointError as exc:
        print(f"mgpu.infer: error: --checkpoint {exc}", file=sys.stderr)
        return 2
    except (InferError, DataError) as exc:
        print(f"mgpu.infer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
