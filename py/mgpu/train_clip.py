"""mgpu's CLIP trainer: one image tower and one text tower, trained contrastively.

    python -m mgpu.train_clip --preset demo                         # ~1 minute on a laptop CPU
    python -m mgpu.train_clip --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --data train.csv
    CUDA_VISIBLE_DEVICES=0,1 python -m mgpu.train_clip ... --dp      # DataParallel: "Using 2 GPUs for training"
    torchrun --nproc_per_node 4 -m mgpu.train_clip ...              # DDP, one process per GPU

One code path for every mode. Under DDP: DistributedSampler with set_epoch, features all-gathered with
gradient (negatives span the global batch), logging, TensorBoard and checkpoints on rank 0, evaluation
exact (no padded duplicates). --batch-size is per process under DDP, and the whole batch (split over
the GPUs) under DataParallel; --accum-steps K makes each optimizer step K micro-batches whose negatives
span all K (exact, see mgpu.step).

Checkpoints are ``<output-dir>/checkpoint_<step>.pt`` (everything needed to continue exactly) and, at the
end, ``<output-dir>/model.pt`` (the unwrapped weights); ``<output-dir>/metrics.json`` holds the results.
``--stop-after N`` (or SIGTERM / SIGUSR1, as Slurm sends before preemption, a first Ctrl-C, SIGHUP) ends
early at a step boundary with a checkpoint, leaving the schedule of --epochs / --max-steps unchanged;
``--resume auto`` continues from the newest checkpoint, to the same weights a straight run reaches.

The module reads top to bottom as the loop (``train``), the small helpers it calls, and ``main``. The set-up
is mgpu.train_setup, one step is mgpu.step, the one host sync per check is mgpu.monitor.

Exit codes: 0 done (or stopped on purpose by --stop-after), 2 bad input, 1 a failure during training,
143 stopped by SIGTERM (138 by SIGUSR1, 130 by Ctrl-C, 129 by SIGHUP), after saving. Under torchrun each
worker also stops, with a checkpoint, when the agent that started it dies (even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator

import torch.distributed as dist

from . import distributed
from .bn import set_train_mode
from .checkpoint import CheckpointError, prune_checkpoints, rng_state, save_checkpoint, save_model
from .data.captions import DataError
from .data.checks import too_many_bad
from .evaluate import evaluate
from .files import write_json
from .monitor import Checked, Monitor
from .progress import Progress, format_eta
from .step import train_step
from .tensorboard import ScalarWriter
from .train_params import parse_args
from .train_setup import Run, TrainError, describe, release_output_dir, setup

__all__ = ["main", "parse_args", "train", "TrainError", "TrainingFailed"]

log = logging.getLogger("mgpu.train_clip")


class TrainingFailed(RuntimeError):
    """Training itself went wrong (a non-finite loss); exit code 1."""


class Stopped(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def train(args) -> int:
    started = time.perf_counter()
    run = setup(args)
    distributed.announce(run.device, run.dp_gpus)
    log.info(describe(run))
    monitor, clock, results = Monitor(run.device), Clock(), {}
    monitor.install_signal_handlers()
    progress = Progress(run.total, run.step, enabled=run.main, every=args.log_every)
    writer = ScalarWriter(run.output / "tb") if args.tb and run.main else None
    first_step = run.step
    set_train_mode(run.stepper.wrapped, args.freeze_bn)
    try:
        for batches in step_batches(run):
            out = train_step(run.stepper, batches)
            run.step += 1
            monitor.add(run.step, out.loss, out.skipped, out.images_read)
            checked = monitor.check() if is_check_step(run, progress) else None
            if checked:
                act_on(run, checked)
            progress.update(run.step, run.global_batch, **({"loss": checked.loss} if checked else {}))
            if checked and writer and progress.due(run.step):
                writer.add_scalars(train_scalars(run, checked, progress), run.step)
            if checked and checked.stop_signal:
                stop(run, progress, checked.stop_signal)
            if should_evaluate(run):
                with clock.evaluating():
                    results = evaluate_now(run, progress, writer)
            if should_save(run):
                save(run)
        progress.close()
        train_seconds = clock.elapsed() - clock.eval_seconds
        if run.world > 1:
            distributed.check_replicas(run.model, run.device)
        completed = run.step >= run.total
        save(run)
        if completed:
            with clock.evaluating():
                results = evaluate(run.model, run.val_loader, run.device, run.global_batch, run.autocast)
            if run.main:
                save_model(run.model, run.output / "model.pt", run.config)
        if run.main:
            metrics = write_metrics(run, results, monitor, completed, first_step, train_seconds,
                                    time.perf_counter() - started, clock.eval_seconds)
            if writer:
                writer.add_scalars({f"val/{k}": v for k, v in results.items()}, run.step)
            say_done(run, metrics, completed)
        return 0
    finally:
        if writer:
            writer.close()


# ---- what the loop calls -------------------------------------------------------------------------------------------

def step_batches(run: Run) -> Iterator[list[dict]]:
    """The micro-batches of each remaining step, --accum-steps at a time; each epoch's sampler starts
    where the resumed step left it (the sampler offset counts samples per process)."""
    k = run.args.accum_steps
    while run.step < run.stop_at:
        epoch = run.step // run.steps_per_epoch
        run.sampler.set_epoch(epoch, (run.step - epoch * run.steps_per_epoch) * run.samples_per_step)
        group: list[dict] = []
        for batch in run.train_loader:
            group.append(batch)
            if len(group) < k:
                continue
            yield group
            group = []
            if run.step >= run.stop_at or run.step % run.steps_per_epoch == 0:
                break


def is_check_step(run: Run, progress: Progress) -> bool:
    """Steps that read the device (monitor.check): every --check-every, every progress line, before a
    save or an evaluation, and the last."""
    s, a = run.step, run.args
    return (s % a.check_every == 0 or progress.due(s) or s >= run.stop_at or should_evaluate(run)
            or bool(a.save_every and s % a.save_every == 0))


def act_on(run: Run, checked: Checked) -> None:
    """Fail on a non-finite loss or too many bad images; every rank decides the same at the same step."""
    if checked.nonfinite_step:
        raise TrainingFailed(f"loss is {checked.nonfinite_value} at step {checked.nonfinite_step}: lower --lr "
                             f"({run.lr:g}), add --grad-clip, or use --amp bf16 instead of fp16")
    bad, read = checked.bad_images, checked.images_read
    # bad and read are sums over every rank: compare them with an epoch of every rank
    if too_many_bad(bad, read, run.args.max_bad_images, run.steps_per_epoch * run.global_batch):
        raise TrainError(f"{bad} of {read} images read so far are missing or unreadable, "
                         f"more than --max-bad-images {run.args.max_bad_images}: check --data {run.args.data}")


def train_scalars(run: Run, checked: Checked, progress: Progress) -> dict[str, float]:
    return {"train/loss": checked.loss, "train/lr": run.stepper.scheduler.get_last_lr()[0],
            "train/logit_scale": run.model.logit_scale.exp().item(), "train/samples_per_second": progress.rate()}


def should_evaluate(run: Run) -> bool:
    every = run.args.eval_every
    return bool(every and run.step % every == 0 and run.step < run.total)


def should_save(run: Run) -> bool:
    every = run.args.save_every
    return bool(every and run.step % every == 0 and run.step < run.stop_at)


def evaluate_now(run: Run, progress: Progress, writer: ScalarWriter | None) -> dict[str, float]:
    results = evaluate(run.model, run.val_loader, run.device, run.global_batch, run.autocast)
    progress.write(f"eval at step {run.step}: image->text R@1 {results['image_to_text_R@1']:.3f}, "
                   f"text->image R@1 {results['text_to_image_R@1']:.3f}, val_loss {results['val_loss']:.4f}")
    if writer:
        writer.add_scalars({f"val/{k}": v for k, v in results.items()}, run.step)
    return results


def save(run: Run) -> None:
    """Every rank's random state goes to rank 0, which writes; every rank waits for the file, so none
    runs ahead or exits before it exists."""
    rng = distributed.all_gather_state(rng_state(run.cuda_devices))
    if run.main:
        s = run.stepper
        save_checkpoint(run.output / f"checkpoint_{run.step}.pt", run.model, step=run.step,
                        epoch=run.step // run.steps_per_epoch, optimizer=s.optimizer, scheduler=s.scheduler,
                        scaler=s.scaler if s.scaler.is_enabled() else None, config=run.config, rng=rng)
        prune_checkpoints(run.output, run.args.keep_checkpoints)
    if run.world > 1:
        dist.barrier()


def stop(run: Run, progress: Progress, signum: int) -> None:
    save(run)
    progress.close()
    log.warning("stopped by signal %d at step %d of %d; checkpoint saved: resume with --resume auto",
                signum, run.step, run.total)
    raise Stopped(128 + signum)


def write_metrics(run: Run, results: dict, monitor: Monitor, completed: bool, first_step: int, train_seconds: float,
                  wall_seconds: float, eval_seconds: float) -> dict:
    """<output-dir>/metrics.json: the results and how the run went (run_train_clip.sh reads key_metric)."""
    a = run.args
    metrics = {"key_metric": "image_to_text_R@1", **results, "train_loss": monitor.train_loss(),
               "samples_per_second": run.global_batch * (run.step - first_step) / max(train_seconds, 1e-9),
               "steps": run.step, "total_steps": run.total, "epochs": run.step / run.steps_per_epoch,
               "wall_seconds": wall_seconds, "eval_seconds": eval_seconds, "world_size": run.world,
               "dp_gpus": run.dp_gpus, "global_batch": run.global_batch, "batch_size": a.batch_size,
               "accum_steps": a.accum_steps, "lr": run.lr, "image_encoder": a.image_encoder,
               "text_encoder": a.text_encoder, "bad_images": monitor.bad, "completed": completed,
               "device": str(run.device)}
    write_json(run.output / "metrics.json", metrics)
    return metrics


def say_done(run: Run, metrics: dict, completed: bool) -> None:
    if completed:
        log.info("done in %s: image->text R@1 %.3f, text->image R@1 %.3f, val_loss %.4f, %.0f samples/s; %s",
                 format_eta(metrics["wall_seconds"]), metrics["image_to_text_R@1"], metrics["text_to_image_R@1"],
                 metrics["val_loss"], metrics["samples_per_second"], run.output / "metrics.json")
    else:
        log.info("stopped after step %d of %d (--stop-after %d); continue with --resume auto",
                 run.step, run.total, run.args.stop_after)


class Clock:
    """Wall time since the loop began, and how much of it went to evaluation."""

    def __init__(self):
        self.t0, self.eval_seconds = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds += time.perf_counter() - start


# ---- the command -----------------------------------------------------------------------------------------------------

class _Formatter(logging.Formatter):
    """Information as plain lines ("Using 2 GPUs for training"); warnings and errors tagged."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno <= logging.INFO else f"[{record.levelname}] {text}"


class _OncePerJob(logging.Filter):
    """On ranks other than 0: errors, and the warnings only that rank can give (a skipped image); the
    rest (information, and warnings every rank would repeat) comes from rank 0 alone."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0 or record.levelno >= logging.ERROR:
            return True
        if getattr(record, "per_rank", False):
            record.msg = f"rank {self.rank}: {record.msg}"
            return True
        return False


def _early_rank(args) -> int:
    """The rank before the process group exists (launchers set RANK; --rank by hand)."""
    return int(os.environ.get("RANK", args.rank if args.rank is not None else 0))


def main(argv: list[str] | None = None) -> int:
    distributed.stop_with_agent()
    args = parse_args(argv)
    rank = _early_rank(args)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    handler.addFilter(_OncePerJob(rank))
    logging.basicConfig(handlers=[handler], force=True)
    logging.getLogger("mgpu").setLevel(logging.INFO)
    if rank:
        warnings.simplefilter("ignore")  # Python warnings are the same on every rank: rank 0 shows them
    try:
        code = train(args)
        if distributed.is_on():
            # Every rank leaves together: rank 0 still evaluates and writes while the others are done, and
            # a gloo group torn down under a peer that still works can abort that rank at exit (SIGABRT).
            dist.barrier()
        return code
    except Stopped as stop_:
        return 143 if stop_.code == 128 + signal.SIGTERM else stop_.code
    except (TrainError, distributed.SetupError, CheckpointError, DataError) as exc:
        print(f"mgpu.train_clip: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"mgpu.train_clip: training failed: {exc}", file=sys.stderr)
        return 1
    finally:
        release_output_dir()
        if distributed.is_on():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
