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

import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .checkpoint import CheckpointError, load_model, prune_checkpoints, read_checkpoint, resume_source, \
    save_checkpoint, save_model, set_rng_state
from .clip import CLIP, clip_loss, region_loss
from .data.captions import DataError
from .data.loading import build_data, build_loaders, tokenizer_state
from .evaluate import evaluate
from .models import image_encoder, text_encoder
from .models.pretrained import load_pretrained
from .optim import optimizer_for, schedule, set_train_mode
from .progress import Progress, format_eta
from .tensorboard import ScalarWriter
from .train_params import parse_args

log = logging.getLogger("mgpu.train_clip")


class TrainError(RuntimeError):
    """A problem with the inputs found after parsing (data, checkpoint, device); exit code 2."""


class TrainingFailed(RuntimeError):
    """Training itself went wrong (a non-finite loss); exit code 1."""


class Stopped(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# ---- the model ---------------------------------------------------------------------------------------------------

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


# ---- the run -------------------------------------------------------------------------------------------------

def _check_compatible(args, config: dict, path: Path) -> None:
    for key in ("image_encoder", "text_encoder", "embed_dim"):
        if key in config and config[key] != getattr(args, key):
            raise TrainError(f"--resume {path}: it was trained with --{key.replace('_', '-')} {config[key]}, "
                             f"this run has {getattr(args, key)}")


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def train(args) -> int:
    started = time.perf_counter()
    device, dp_gpus = distributed.setup(args)
    rank, world = distributed.rank(), distributed.world_size()
    main_rank = rank == 0
    logging.getLogger("mgpu").setLevel(logging.INFO if main_rank else logging.WARNING)
    if args.amp == "fp16" and device.type != "cuda":
        raise TrainError("--amp fp16: needs a CUDA device (a GradScaler on GPU); on the CPU use --amp bf16 or off")
    output = Path(args.output_dir)
    resume = resume_source(args.resume, args.output_dir)
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
    distributed.announce(device, dp_gpus)
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
            prune_checkpoints(output, args.keep_checkpoints)
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
                    bad_all, seen_all = distributed.all_sum([bad, seen], device)
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
                code = int(distributed.all_sum([stop_signal["code"]], device)[0]) if world > 1 else stop_signal["code"]
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
            distributed.check_replicas(model, device)
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
        code = train(args)
        if distributed.is_on():
            # Every rank leaves together: rank 0 still evaluates and writes while the others are done, and
            # a gloo group torn down under a peer that still works can abort that rank at exit (SIGABRT).
            dist.barrier()
        return code
    except Stopped as stop:
        return stop.code
    except (TrainError, distributed.SetupError, CheckpointError, DataError) as exc:
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
