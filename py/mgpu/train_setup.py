"""Everything the CLIP trainer decides before its first step, as one ``Run`` the loop reads: devices and
processes, the checkpoint to resume, the data, the model (pretrained weights, locked towers, gradient
checkpointing, mixed precision, torch.compile, the DP/DDP wrapper), the optimizer and its schedule.

Global batch = --batch-size x --accum-steps x processes, and the schedule counts optimizer steps, so
(B, K) and (B/2, 2K) train on the same samples in the same order with the same learning rates, and
either resumes the other's checkpoint (the sweep's out-of-memory retry relies on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .checkpoint import CheckpointError, load_model, rank_rng_state, read_checkpoint, resume_source, set_rng_state
from .clip import CLIP, LockError
from .data.captions import DataError
from .data.loading import build_data, build_loaders, tokenizer_state
from .models import image_encoder, text_encoder
from .models.pretrained import load_pretrained
from .optim import optimizer_for, schedule
from .step import Stepper

log = logging.getLogger("mgpu.train_clip")

# settings a checkpoint must share with the run that resumes it (the optimizer state follows the locks)
_SAME_ON_RESUME = ("image_encoder", "text_encoder", "embed_dim", "lock_image", "lock_image_unlocked", "lock_text",
                   "lock_text_unlocked")


class TrainError(RuntimeError):
    """A problem with the inputs found after parsing (data, checkpoint, device); exit code 2."""


@dataclass
class Run:
    args: Any
    device: torch.device
    dp_gpus: int
    rank: int
    world: int
    output: Path
    model: CLIP  # the plain model: what is saved, evaluated, checked across ranks
    stepper: Stepper  # what a step needs, the DP/DDP/compiled wrapper included
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: Any  # the resumable DistributedSampler of the training set
    steps_per_epoch: int
    total: int  # optimizer steps of the whole schedule
    step: int  # optimizer steps done (the resumed step at first)
    stop_at: int  # this process ends here (--stop-after), the schedule still runs to total
    global_batch: int
    lr: float
    config: dict
    train_size: int
    cuda_devices: list[int]  # the GPUs whose random state this process owns

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def samples_per_step(self) -> int:
        """Samples each process trains on in one optimizer step (its sampler's stride)."""
        return self.args.batch_size * self.args.accum_steps

    def autocast(self):
        """The evaluation's mixed precision (training enters it inside CLIP.forward)."""
        dtype = self.model.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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
    _lock(model, args)
    if args.grad_checkpointing:
        towers = model.set_grad_checkpointing(True)
        missing = {"image", "text"} - set(towers)
        log.info("--grad-checkpointing: on in the %s tower%s%s", " and ".join(towers) or "no", "s" if len(towers) > 1 else "",
                 f" ({', '.join(sorted(missing))}: {getattr(args, sorted(missing)[0] + '_encoder')} does not offer it)"
                 if missing else "")
    model.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return model


def _lock(model: CLIP, args) -> None:
    for tower, lock, unlocked in (("image", args.lock_image, args.lock_image_unlocked),
                                  ("text", args.lock_text, args.lock_text_unlocked)):
        if not lock:
            continue
        try:
            trainable, total = getattr(model, f"lock_{tower}_tower")(unlocked)
        except LockError as exc:
            raise TrainError(f"--lock-{tower}-unlocked {unlocked}: {exc}") from None
        log.info("--lock-%s: %s of the %s tower's %s parameters train%s", tower, f"{trainable:,}", tower, f"{total:,}",
                 f" (its last {unlocked} blocks)" if unlocked else "; its BatchNorm statistics stay as loaded"
                 if tower == "image" else "")


def _check_compatible(args, config: dict, path: Path, world: int) -> None:
    for key in _SAME_ON_RESUME:
        if key in config and config[key] != getattr(args, key):
            raise TrainError(f"--resume {path}: it was trained with --{key.replace('_', '-')} {config[key]}, "
                             f"this run has {getattr(args, key)}")
    saved = config.get("global_batch")
    now = args.batch_size * args.accum_steps * world
    if saved is not None and saved != now:
        raise TrainError(f"--resume {path}: it was trained with a global batch of {saved}, this run has {now} "
                         f"(--batch-size {args.batch_size} x --accum-steps {args.accum_steps} x {world} process(es)): "
                         "the data order and the schedule continue only with the same global batch")


def _wrap(model: CLIP, args, device: torch.device, world: int, dp_gpus: int) -> nn.Module:
    wrapped: nn.Module = model
    if world > 1 and args.sync_bn:
        if device.type == "cuda":  # in place: the same model, new layers holding the same Parameter objects
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("--sync-bn: SyncBatchNorm needs CUDA; on the CPU (gloo) BatchNorm statistics stay per rank")
    if world > 1:
        # gradients live in DDP's all-reduce buckets: no second copy of them in memory
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                      gradient_as_bucket_view=True)
    elif dp_gpus > 1:
        wrapped = nn.DataParallel(model)
    if args.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def check_output_dir(path: str) -> None:
    """--output-dir can be made (or is there) and written in, checked before any work without making it: one
    that cannot fails now, naming the flag and why, not in a traceback at the first save."""
    if not path.strip():
        raise TrainError("--output-dir is empty: name a folder (leave it out for the default)")
    probe = Path(path)
    try:
        while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
            probe = probe.parent  # the nearest folder that is there: the run makes the rest
        if probe.is_symlink() and not probe.exists():
            raise TrainError(f"--output-dir {path}: cannot make it: {probe} is a symbolic link to nothing")
    except OSError as exc:  # a folder on the way that cannot be searched
        raise TrainError(f"--output-dir {path}: {exc.strerror}: {exc.filename}") from None
    if not probe.is_dir():
        raise TrainError(f"--output-dir {path}: cannot make it: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise TrainError(f"--output-dir {path}: cannot write in {probe} (no permission, or a read-only file system)")


OUTPUT_LOCK = ".mgpu.train.lock"
_held: list = []  # the open lock file of --output-dir: held until main() returns or the process ends, however


def lock_output_dir(path: str) -> None:
    """One training run a --output-dir at a time: two runs saving into one folder overwrite each other's
    checkpoints and resume from each other's. Rank 0 (of the whole run) takes a flock on
    <output-dir>/.mgpu.train.lock, which the kernel drops when the process ends (a crash, SIGKILL), and
    writes who it is in it, so a second run names the first. A file system without locks is said, not fatal.
    (A sweep's job also holds <output-dir>/.mgpu.lock, another file: the two never meet.)"""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / OUTPUT_LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held open on purpose)
    except OSError as exc:
        raise TrainError(f"--output-dir {path}: cannot make its lock file {OUTPUT_LOCK}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "its process could not be read"
        lock.close()
        raise TrainError(f"--output-dir {path} is in use by another training run ({holder}): two runs in one folder "
                         "overwrite each other's checkpoints; give this run another --output-dir, or let that one "
                         "end first") from None
    except OSError as exc:
        log.warning("--output-dir %s: cannot lock it (%s): nothing stops a second run from writing into it",
                    path, exc.strerror)
        lock.close()
        return
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
    except OSError as exc:  # a full disk: no checkpoint would fit either
        lock.close()
        raise TrainError(f"--output-dir {path}: cannot write its lock file {OUTPUT_LOCK}: {exc.strerror}") from None
    _held.append(lock)


def release_output_dir() -> None:
    """Let go of the output folders this process holds (the end of a run started in-process: tests, notebooks)."""
    while _held:
        _held.pop().close()


def _lock_on_rank_0(path: str, rank: int, world: int, device: torch.device) -> None:
    """lock_output_dir on rank 0; every rank ends on its refusal (one all-reduce), none waits for it."""
    refused = ""
    if rank == 0:
        try:
            lock_output_dir(path)
        except TrainError as exc:
            refused = str(exc)
    if world > 1 and distributed.all_sum([float(bool(refused))], device)[0] and not refused:
        raise TrainError(f"--output-dir {path}: rank 0 refused it (its error says why)")
    if refused:
        raise TrainError(refused)


def setup(args) -> Run:
    check_output_dir(args.output_dir)
    device, dp_gpus = distributed.setup(args)
    rank, world = distributed.rank(), distributed.world_size()
    if args.amp == "fp16" and device.type != "cuda":
        raise TrainError("--amp fp16: needs a CUDA device (a GradScaler on GPU); on the CPU use --amp bf16 or off")
    resume = resume_source(args.resume, args.output_dir)
    state = read_checkpoint(resume) if resume else None
    if state is not None:
        _check_compatible(args, state.get("config", {}), resume, world)
    train_set, val_set, tokenizer = build_data(args, (state or {}).get("config", {}).get("tokenizer"))
    model = build_model(args).to(device)
    if args.loss_region and args.data != "synthetic" and not args.box_file:
        raise TrainError(f"--loss-region {args.loss_region}: the data has no boxes; give --box-file")
    train_loader, val_loader, sampler, micro_steps = build_loaders(args, train_set, val_set, args.batch_size, device)
    steps_per_epoch = micro_steps // args.accum_steps
    if steps_per_epoch == 0:
        raise DataError(f"--accum-steps {args.accum_steps}: an epoch has {micro_steps} micro-batch(es) of "
                        f"{args.batch_size} per process, fewer than one optimizer step; lower it or add data")
    total = args.max_steps or args.epochs * steps_per_epoch
    lr = args.lr * world if args.lr_scale == "linear" else args.lr
    optimizer = optimizer_for(model, lr, args.weight_decay, fused=device.type == "cuda")
    scheduler = schedule(optimizer, args.warmup, total)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    cuda_devices = list(range(dp_gpus)) if dp_gpus else [device.index] if device.type == "cuda" else []
    step = 0
    if state is not None:
        load_model(model, state, name=resume)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        set_rng_state(rank_rng_state(state, rank), cuda_devices)
        log.info("resumed from %s at step %d of %d", resume, step, total)
    wrapped = _wrap(model, args, device, world, dp_gpus)
    global_batch = args.batch_size * args.accum_steps * world
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    config.update(tokenizer=tokenizer_state(tokenizer), global_batch=global_batch)
    stepper = Stepper(model, wrapped, optimizer, scheduler, scaler, device, args.grad_clip, args.loss_region,
                      cuda_devices, compiled=args.compile)
    stop_at = min(total, step + args.stop_after) if args.stop_after else total
    _lock_on_rank_0(args.output_dir, rank, world, device)  # once every input is checked, before any write
    return Run(args, device, dp_gpus, rank, world, Path(args.output_dir), model, stepper, train_loader, val_loader,
               sampler, steps_per_epoch, total, step, stop_at, global_batch, lr, config, len(train_set), cuda_devices)


def describe(run: Run) -> str:
    """The line that says what this run trains: steps, data, global batch and how it is made, lr, output."""
    a = run.args
    parts = [f"{a.batch_size}"] + ([f"{a.accum_steps} micro-batches"] if a.accum_steps > 1 else []) \
        + ([f"{run.world} processes"] if run.world > 1 else [])
    return (f"{a.image_encoder} x {a.text_encoder}: {run.total} steps ({run.steps_per_epoch} per epoch of "
            f"{run.train_size} samples), global batch {run.global_batch}"
            f"{' (' + ' x '.join(parts) + ')' if len(parts) > 1 else ''}, lr {run.lr:.3g}"
            f"{f' ({a.lr:g} x {run.world}, --lr-scale linear)' if run.lr != a.lr else ''}, output {run.output}")
