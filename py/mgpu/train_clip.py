"""mgpu's CLIP trainer: one image tower and one text tower, trained contrastively.

    python -m mgpu.train_clip --preset demo                         # ~1 minute on a laptop CPU
    python -m mgpu.train_clip --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --data train.csv
    CUDA_VISIBLE_DEVICES=0,1 python -m mgpu.train_clip ... --dp      # DataParallel: "Using 2 GPUs for training"
    torchrun --nproc_per_node 4 -m mgpu.train_clip ...              # DDP, one process per GPU

One code path for every mode. Under DDP: DistributedSampler with set_epoch, features all-gathered with
gradient (negatives span the global batch), logging, TensorBoard and checkpoints on rank 0, evaluation
exact (no padded duplicates). --batch-size is per process under DDP, and the whole batch (split over
the GPUs) under DataParallel, as the seed describes.

Checkpoints are ``<output-dir>/checkpoint_<step>.pt`` (everything needed to continue exactly) and, at the
end, ``<output-dir>/model.pt`` (the unwrapped weights); ``<output-dir>/metrics.json`` holds the results.
``--stop-after N`` (or SIGTERM / SIGUSR1, as Slurm sends before preemption) ends early at a step
boundary with a checkpoint, leaving the schedule of --epochs / --max-steps unchanged; ``--resume auto``
continues from the newest checkpoint, to the same weights a straight run reaches.

Exit codes: 0 done (or stopped on purpose by --stop-after), 2 bad input, 1 a failure during training,
143 stopped by a signal (after saving).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .checkpoint import CheckpointError, latest_checkpoint, load_model, read_checkpoint, save_checkpoint, \
    save_model, set_rng_state, unwrap
from .clip import CLIP, clip_loss, region_loss
from .data.captions import DataError
from .data.loading import build_data, build_loaders, tokenizer_state
from .evaluate import evaluate
from .models import IMAGE_ENCODERS, TEXT_ENCODERS, image_encoder, text_encoder
from .models.pretrained import load_pretrained
from .progress import Progress, format_eta
from .tensorboard import ScalarWriter

log = logging.getLogger("mgpu.train_clip")

PRESETS = {
    # One configuration in about a minute on a 2-core CPU: val image->text R@1 above 0.5 (chance: 1/256).
    "demo": dict(image_encoder="starnet_s050", text_encoder="clip:tiny", data="synthetic", image_size=32,
                 embed_dim=128, batch_size=64, lr=3e-3, weight_decay=0.1, warmup=20, max_steps=220,
                 train_size=2048, val_size=256, workers=0, lr_scale="none"),
    # The real towers at full resolution, for a GPU: bf16, batch 128 per process.
    "full": dict(image_encoder="starnet_s1", text_encoder="clip:ViT-B/32", data="synthetic", image_size=224,
                 embed_dim=512, batch_size=128, lr=5e-4, weight_decay=0.2, warmup=500, epochs=10,
                 train_size=100_000, val_size=1000, workers=4, amp="bf16"),
}
IMAGE_STRIDE = 32  # StarNet halves the resolution five times


class TrainError(RuntimeError):
    """A problem with the inputs found after parsing (data, checkpoint, device); exit code 2."""


class TrainingFailed(RuntimeError):
    """Training itself went wrong (a non-finite loss); exit code 1."""


class Stopped(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# ---- arguments -------------------------------------------------------------------------------------------

def _number(kind, low: float, inclusive: bool = True, what: str = ""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (value == low and not inclusive) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'at least' if inclusive else 'more than'} {low}{what}")
        return value
    return parse


def _encoder(table: dict, kind: str):
    def parse(text: str) -> str:
        if text not in table:
            raise argparse.ArgumentTypeError(f"unknown {kind} encoder {text!r}; known: {', '.join(table)}")
        return text
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mgpu.train_clip", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pos_int, nonneg_int = _number(int, 1), _number(int, 0)
    m = p.add_argument_group("model")
    m.add_argument("--image-encoder", type=_encoder(IMAGE_ENCODERS, "image"), default="starnet_s1",
                   help=f"image tower: {', '.join(IMAGE_ENCODERS)}")
    m.add_argument("--text-encoder", type=_encoder(TEXT_ENCODERS, "text"), default="clip:ViT-B/32",
                   help=f"text tower: {', '.join(TEXT_ENCODERS)}")
    m.add_argument("--embed-dim", type=pos_int, default=512, help="shared embedding size of the CLIP head")
    m.add_argument("--image-pretrained", metavar="PATH", help="local StarNet weights (official release layout)")
    m.add_argument("--text-pretrained", metavar="PATH",
                   help="local text weights: OpenAI/open_clip .pt, or a Hugging Face BERT file or folder")
    m.add_argument("--clip-vocab", metavar="PATH", help="CLIP's bpe_simple_vocab_16e6.txt.gz (file or folder)")
    m.add_argument("--bert-vocab", metavar="PATH", help="BERT's vocab.txt (file or model folder)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default="synthetic", help="'synthetic' (embedded), or a .csv, .tsv or .jsonl file")
    d.add_argument("--val-data", metavar="FILE", help="validation file; default: --val-fraction of --data")
    d.add_argument("--val-fraction", type=_number(float, 0, False), default=0.05)
    d.add_argument("--train-size", type=pos_int, default=20_000, help="synthetic: training samples")
    d.add_argument("--val-size", type=pos_int, default=1000, help="synthetic: validation samples")
    d.add_argument("--csv-img-key", default="filepath")
    d.add_argument("--csv-caption-key", default="title")
    d.add_argument("--csv-separator", default=None, help="default: ',' for .csv, a tab for .tsv")
    d.add_argument("--box-file", metavar="FILE", help="JSON boxes per image (see mgpu.data.captions)")
    d.add_argument("--max-bad-images", type=_number(float, 0), default=0.01, metavar="FRACTION",
                   help="fail when more than this fraction of the images read so far is missing or unreadable")
    d.add_argument("--image-size", type=pos_int, default=224, help=f"pixels, a multiple of {IMAGE_STRIDE}")
    d.add_argument("--workers", type=nonneg_int, default=4, help="DataLoader worker processes per process")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", "--num-epochs", type=pos_int, default=1)
    t.add_argument("--max-steps", type=nonneg_int, default=0, help="total optimizer steps (0: from --epochs)")
    t.add_argument("--batch-size", "--batchsize", type=pos_int, default=64,
                   help="per process under DDP; the whole batch, split over GPUs, under --dp")
    t.add_argument("--lr", "--learning-rate", type=_number(float, 0, False), default=5e-4)
    t.add_argument("--lr-scale", choices=("linear", "none"), default="linear",
                   help="linear: multiply --lr by the number of DDP processes")
    t.add_argument("--warmup", type=nonneg_int, default=100, help="linear warm-up steps, then cosine decay")
    t.add_argument("--weight-decay", type=_number(float, 0), default=0.1)
    t.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="fp16 uses a GradScaler (CUDA)")
    t.add_argument("--grad-clip", type=_number(float, 0), default=0.0, help="max gradient norm (0: off)")
    t.add_argument("--seed", type=nonneg_int, default=0, help="same init on every rank; data seeded seed + rank")
    t.add_argument("--freeze-bn", action="store_true", help="BatchNorm uses and keeps its running statistics")
    t.add_argument("--sync-bn", action="store_true",
                   help="DDP on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)")
    t.add_argument("--loss-region", type=_number(float, 0), default=0.0, metavar="W",
                   help="weight of the box-phrase region loss (0: off)")
    t.add_argument("--use-region-loss", action="store_true", help="the seed's switch: --loss-region 0.5 if unset")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", help="checkpoints, metrics.json, tb/ (default: checkpoints/clip/<image>_<text>)")
    o.add_argument("--save-every", type=nonneg_int, default=0, help="checkpoint every N steps (0: at the end)")
    o.add_argument("--keep-checkpoints", type=pos_int, default=2, help="how many checkpoint_<step>.pt to keep")
    o.add_argument("--eval-every", type=nonneg_int, default=0, help="evaluate every N steps (0: at the end)")
    o.add_argument("--log-every", type=nonneg_int, default=0, help="plain progress line every N steps (0: ~20 a run)")
    o.add_argument("--no-tb", dest="tb", action="store_false", help="no TensorBoard events in <output-dir>/tb")
    o.add_argument("--resume", metavar="auto|PATH", help="auto: the newest checkpoint in --output-dir, if any")
    o.add_argument("--stop-after", type=pos_int, metavar="STEPS",
                   help="end after this many steps with a resumable checkpoint; the schedule is unchanged")
    o.add_argument("--preset", choices=tuple(PRESETS), help="defaults for the demo or the full-size run")
    r = p.add_argument_group("devices")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--dp", action="store_true", help="DataParallel over every visible GPU")
    r.add_argument("--distributed", action="store_true", help="DDP (implied under torchrun)")
    r.add_argument("--local_rank", "--local-rank", type=nonneg_int, default=None, help="set by the legacy launcher")
    r.add_argument("--world_size", "--world-size", type=pos_int, default=None)
    r.add_argument("--rank", type=nonneg_int, default=None)
    r.add_argument("--dist_url", "--dist-url", default="env://", help="init method: env:// or tcp://HOST:PORT")
    r.add_argument("--dist-timeout", type=pos_int, default=600, metavar="SECONDS",
                   help="how long a collective may wait for a missing rank before the job fails")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**PRESETS[known.preset])
    args = parser.parse_args(argv)
    if args.image_size % IMAGE_STRIDE:
        parser.error(f"argument --image-size: {args.image_size} cannot be taken by {args.image_encoder}: "
                     f"it must be a multiple of {IMAGE_STRIDE} (e.g. {max(IMAGE_STRIDE, args.image_size // IMAGE_STRIDE * IMAGE_STRIDE)})")
    if args.use_region_loss and not args.loss_region:
        args.loss_region = 0.5
    if args.output_dir is None:
        args.output_dir = str(Path("checkpoints/clip") / re.sub(r"[^A-Za-z0-9._-]+", "_",
                                                                f"{args.image_encoder}_{args.text_encoder}"))
    return args


# ---- processes and devices ---------------------------------------------------------------------------------

def setup_processes(args) -> tuple[torch.device, int]:
    """Start DDP when torchrun / the legacy launcher / --distributed says so; pick the device.
    Returns (device, number of DataParallel GPUs or 0)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    want_ddp = args.distributed or env_world > 1 or (args.world_size or 1) > 1
    cuda = torch.cuda.is_available() and args.device != "cpu" and not args.device.startswith("cpu")
    if args.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", args.device):
        raise TrainError(f"--device {args.device}: allowed are auto, cpu, cuda, cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {args.device}: this PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}; run python check_gpus.py --torch)")
    if want_ddp:
        if args.dp:
            raise TrainError("--dp and DDP exclude each other: use one process per GPU (torchrun) or --dp, not both")
        if cuda:
            torch.cuda.set_device(local_rank)
        kwargs = {}
        if args.dist_url != "env://":
            kwargs = dict(world_size=args.world_size or env_world, rank=args.rank if args.rank is not None
                          else int(os.environ.get("RANK", "0")))
        backend, timeout = "nccl" if cuda else "gloo", timedelta(seconds=args.dist_timeout)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and args.dist_url == "env://":
            # torchrun's agent store outlives a restart: without a prefix per attempt, a restarted rank can
            # read a dead worker's address and the new group never connects (seen with torch 2.13 + gloo)
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=not agent_store and rank == 0, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"mgpu/attempt_{restart}/", store),
                                    rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=args.dist_url, timeout=timeout, **kwargs)
        return torch.device(f"cuda:{local_rank}" if cuda else "cpu"), 0
    if not cuda:
        return torch.device("cpu"), 0
    device = torch.device(args.device if args.device.startswith("cuda:") else "cuda:0")
    return device, torch.cuda.device_count() if args.dp and args.device in ("auto", "cuda") else 0


def announce_devices(device: torch.device, dp_gpus: int) -> None:
    world = distributed.world_size()
    if world > 1:
        log.info("Using %d %s for training (DDP, one process each, backend %s)", world,
                 "GPUs" if device.type == "cuda" else "CPU processes", dist.get_backend())
    elif dp_gpus > 1:
        log.info("Using %d GPUs for training", dp_gpus)
    elif device.type == "cuda":
        visible = torch.cuda.device_count()
        log.info("Using single GPU for training%s", f" ({visible} visible: add --dp, or start with torchrun "
                 "for DDP)" if visible > 1 else "")
    else:
        log.info("Using CPU for training (%d threads)", torch.get_num_threads())


# ---- model and optimisation --------------------------------------------------------------------------------

def build_model(args) -> CLIP:
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = CLIP(image_encoder(args.image_encoder), text_encoder(args.text_encoder), args.embed_dim)
    for tower, path in ((model.visual, args.image_pretrained), (model.text, args.text_pretrained)):
        if path:
            try:
                report = load_pretrained(tower, path)
            except (CheckpointError, OSError) as exc:
                raise TrainError(str(exc)) from None
            if report.text_projection is not None and report.text_projection.shape == model.text_projection.weight.shape:
                with torch.no_grad():
                    model.text_projection.weight.copy_(report.text_projection)
    return model


def optimizer_for(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, embeddings' positions and the logit scale (as open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "positional" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ---- the run -------------------------------------------------------------------------------------------------

def _resume_source(args) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        found = latest_checkpoint(args.output_dir)
        if found is None:
            log.info("--resume auto: no checkpoint in %s yet; starting from scratch", args.output_dir)
        return found
    path = Path(args.resume)
    if not path.is_file():
        raise TrainError(f"--resume {args.resume}: no such checkpoint file (or pass --resume auto)")
    return path


def _check_compatible(args, config: dict, path: Path) -> None:
    for key in ("image_encoder", "text_encoder", "embed_dim"):
        if key in config and config[key] != getattr(args, key):
            raise TrainError(f"--resume {path}: it was trained with --{key.replace('_', '-')} {config[key]}, "
                             f"this run has {getattr(args, key)}")


def _prune(folder: Path, keep: int) -> None:
    found = sorted((int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt")
                   if (m := re.fullmatch(r"checkpoint_(\d+)\.pt", p.name)))
    for _, path in found[:-keep]:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if distributed.world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _check_replicas(model: nn.Module, device: torch.device) -> None:
    """Every rank's parameters must be identical under DDP; a per-tensor checksum compared across ranks
    says so (or names what diverged: a parameter changed outside DDP's view)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(distributed.world_size())]
    dist.all_gather(gathered, sums)
    names = [n for n, _ in model.named_parameters()]
    differ = sorted({names[i] for g in gathered for i in (g != sums).nonzero().flatten().tolist()})
    if differ:
        log.warning("parameters differ between ranks: %s", ", ".join(differ[:5]))
    else:
        log.info("parameters identical on all %d ranks", distributed.world_size())


def train(args) -> int:
    started = time.perf_counter()
    device, dp_gpus = setup_processes(args)
    rank, world = distributed.rank(), distributed.world_size()
    main_rank = rank == 0
    logging.getLogger("mgpu").setLevel(logging.INFO if main_rank else logging.WARNING)
    if args.amp == "fp16" and device.type != "cuda":
        raise TrainError("--amp fp16: needs a CUDA device (a GradScaler on GPU); on the CPU use --amp bf16 or off")
    output = Path(args.output_dir)
    resume = _resume_source(args)
    state = read_checkpoint(resume) if resume else None
    if state is not None:
        _check_compatible(args, state.get("config", {}), resume)
    train_set, val_set, tokenizer = build_data(args, (state or {}).get("config", {}).get("tokenizer"))
    model = build_model(args).to(device)
    if args.loss_region and args.data != "synthetic" and not args.box_file:
        raise TrainError(f"--loss-region {args.loss_region}: the data has no boxes; give --box-file")
    loader_batch = args.batch_size
    global_batch = args.batch_size * world
    lr = args.lr * world if args.lr_scale == "linear" else args.lr
    train_loader, val_loader, sampler, steps_per_epoch = build_loaders(args, train_set, val_set, loader_batch, device)
    total = args.max_steps or args.epochs * steps_per_epoch
    optimizer = optimizer_for(model, lr, args.weight_decay)
    scheduler = schedule(optimizer, args.warmup, total)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    step = 0
    if state is not None:
        load_model(model, state)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d of %d", resume, step, total)
    wrapped: nn.Module = model
    if world > 1 and args.sync_bn:
        if device.type == "cuda":  # the new layers keep the same Parameter objects: the optimizer still holds them
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("--sync-bn: SyncBatchNorm needs CUDA; on the CPU (gloo) BatchNorm statistics stay per rank")
    if world > 1:
        # gradients live in DDP's all-reduce buckets: no second copy of them in memory
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                      gradient_as_bucket_view=True)
    elif dp_gpus > 1:
        wrapped = nn.DataParallel(model)
    announce_devices(device, dp_gpus)
    log.info("%s x %s: %d steps (%d a epoch of %d samples), global batch %d%s, lr %.3g%s, output %s",
             args.image_encoder, args.text_encoder, total, steps_per_epoch, len(train_set), global_batch,
             f" ({args.batch_size} x {world} processes)" if world > 1 else "", lr,
             f" ({args.lr:g} x {world}, --lr-scale linear)" if lr != args.lr else "", output)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)) \
        if args.amp != "off" else contextlib.nullcontext
    writer = ScalarWriter(output / "tb") if args.tb and main_rank else None
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    config["tokenizer"] = tokenizer_state(tokenizer)

    stop_signal = {"code": 0}
    def on_signal(signum, _frame):
        stop_signal["code"] = 128 + signum
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    def checkpoint() -> None:
        """Rank 0 writes; every rank waits for it, so none runs ahead or exits before the file exists."""
        if main_rank:
            save_checkpoint(output / f"checkpoint_{step}.pt", model, step=step, epoch=step // steps_per_epoch,
                            optimizer=optimizer, scheduler=scheduler, scaler=scaler, config=config)
            _prune(output, args.keep_checkpoints)
        if world > 1:
            dist.barrier()

    progress = Progress(total, step, enabled=main_rank, every=args.log_every)
    recent: deque[torch.Tensor] = deque(maxlen=50)
    bad, seen, warned = 0, 0, 0
    results: dict[str, float] = {}
    eval_seconds = 0.0
    stop_at = min(total, step + args.stop_after) if args.stop_after else total
    run_start_step = step
    set_train_mode(wrapped, args.freeze_bn)
    loop_start = time.perf_counter()
    try:
        while step < stop_at:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, (step - epoch * steps_per_epoch) * loader_batch)
            for batch in train_loader:
                for path, reason in (item for skipped in batch.get("skipped", []) for item in skipped):
                    bad += 1
                    if warned < 10:
                        warned += 1
                        log.warning("skipped image %s (%s)%s", path, reason, "; further ones are counted" if warned == 10 else "")
                seen += batch["image"].shape[0] + sum(len(s) for s in batch.get("skipped", []))
                images = batch["image"].to(device, non_blocking=True)
                tokens = batch["tokens"].to(device, non_blocking=True)
                extra = ()
                if args.loss_region and "box_phrases" in batch:
                    extra = tuple(batch[k].to(device, non_blocking=True) for k in ("boxes", "box_mask", "box_phrases"))
                with autocast():
                    out = wrapped(images, tokens, *extra)
                loss = clip_loss(out[0].float(), out[1].float(), out[2].float())
                if extra:
                    loss = loss + args.loss_region * region_loss(out[3], out[4], extra[2], extra[1], out[2].float())
                if not torch.isfinite(loss):
                    raise TrainingFailed(f"loss is {loss.item()} at step {step + 1}: lower --lr "
                                     f"({lr:g}), add --grad-clip, or use --amp bf16 instead of fp16")
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                else:
                    loss.backward()
                if args.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                recent.append(loss.detach())
                logging_step = step % progress.every == 0 or step == stop_at
                progress.update(step, global_batch, loss=recent[-1].item() if logging_step or progress.bar else 0.0)
                if logging_step:
                    bad_all, seen_all = _all_sum([bad, seen], device)
                    if bad_all > args.max_bad_images * seen_all and seen_all >= 100:
                        raise TrainError(f"{bad_all:.0f} of {seen_all:.0f} images read so far are missing or unreadable, "
                                         f"more than --max-bad-images {args.max_bad_images}: check --data {args.data}")
                    if writer:
                        writer.add_scalars({"train/loss": recent[-1].item(), "train/lr": scheduler.get_last_lr()[0],
                                            "train/logit_scale": model.logit_scale.exp().item(),
                                            "train/samples_per_second": progress.rate()}, step)
                if args.eval_every and step % args.eval_every == 0 and step < total:
                    t0 = time.perf_counter()
                    results = evaluate(model, val_loader, device, global_batch, autocast)
                    eval_seconds += time.perf_counter() - t0
                    progress.write(f"eval at step {step}: image->text R@1 {results['image_to_text_R@1']:.3f}, "
                                   f"text->image R@1 {results['text_to_image_R@1']:.3f}, val_loss {results['val_loss']:.4f}")
                    if writer:
                        writer.add_scalars({f"val/{k}": v for k, v in results.items()}, step)
                if args.save_every and step % args.save_every == 0 and step < stop_at:
                    checkpoint()
                code = int(_all_sum([stop_signal["code"]], device)[0]) if world > 1 else stop_signal["code"]
                if code:
                    checkpoint()
                    progress.close()
                    log.warning("stopped by signal %d at step %d of %d; checkpoint saved: resume with --resume auto",
                                code - 128, step, total)
                    raise Stopped(143 if code == 128 + signal.SIGTERM else code)
                if step >= stop_at:
                    break
        train_seconds = time.perf_counter() - loop_start - eval_seconds
        progress.close()
        if world > 1:
            _check_replicas(model, device)
        completed = step >= total
        checkpoint()
        if completed:
            t0 = time.perf_counter()
            results = evaluate(model, val_loader, device, global_batch, autocast)
            eval_seconds += time.perf_counter() - t0
            if main_rank:
                save_model(model, output / "model.pt", config)
        if main_rank:
            metrics = {"key_metric": "image_to_text_R@1", **results,
                       "train_loss": torch.stack(list(recent)).mean().item() if recent else None,
                       "samples_per_second": global_batch * (step - run_start_step) / max(train_seconds, 1e-9),
                       "steps": step, "total_steps": total, "epochs": step / steps_per_epoch,
                       "wall_seconds": time.perf_counter() - started, "eval_seconds": eval_seconds,
                       "world_size": world, "dp_gpus": dp_gpus, "global_batch": global_batch, "lr": lr,
                       "image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
                       "bad_images": bad, "completed": completed, "device": str(device)}
            output.mkdir(parents=True, exist_ok=True)
            _write_json(output / "metrics.json", metrics)
            if writer:
                writer.add_scalars({f"val/{k}": v for k, v in results.items()}, step)
            if completed:
                log.info("done in %s: image->text R@1 %.3f, text->image R@1 %.3f, val_loss %.4f, %.0f samples/s; %s",
                         format_eta(metrics["wall_seconds"]), results["image_to_text_R@1"],
                         results["text_to_image_R@1"], results["val_loss"], metrics["samples_per_second"],
                         output / "metrics.json")
            else:
                log.info("stopped after step %d of %d (--stop-after %d); continue with --resume auto",
                         step, total, args.stop_after)
        return 0
    finally:
        if writer:
            writer.close()


class _Formatter(logging.Formatter):
    """Information as plain lines (the seed's "Using 2 GPUs for training"); warnings and errors tagged."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno <= logging.INFO else f"[{record.levelname}] {text}"


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    logging.basicConfig(handlers=[handler], force=True)
    logging.getLogger("mgpu").setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        return train(args)
    except Stopped as stop:
        return stop.code
    except (TrainError, CheckpointError, DataError) as exc:
        print(f"mgpu.train_clip: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"mgpu.train_clip: training failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if distributed.is_on():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
