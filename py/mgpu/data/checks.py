"""Checks made before training starts, so a run does not train for hours and then fail, or report numbers that
mean nothing: unreadable images (``--max-bad-images``) and a validation set too small to measure anything.

Images (``check_images``), for caption files and indexed tar shards:
- the validation split: every image is decoded (missing, non-image and truncated files are found). Those that
  cannot be read are left out of the split, with a warning, so evaluation never scores a substitute image.
- the training split: every image's header is read when the split has at most ``FULL_CHECK_ROWS`` rows (finds
  missing files and files that are not images, about 0.05 ms each); a larger split has a fixed random sample
  of ``SAMPLE_ROWS`` rows checked. Training rows are not removed: one that turns out unreadable while training
  is replaced by the next readable row and counted by the trainer, as before.
- the run stops with an error, before any training, when more than ``--max-bad-images`` of the checked images
  cannot be read. With every row checked that is exact, on 20 images as on 20,000; with a sample, the run
  stops only when the sample says so beyond doubt (the fraction minus three standard errors is still above
  the limit), and the trainer's count while training decides the rest.
Under DDP each rank checks every world-size-th image and the counts are summed, so all ranks agree.

Validation size (``check_val_size``): fewer than ``MIN_VAL_SAMPLES`` (2) is an error: with one sample every
retrieval metric is 1.0 and val_loss 0 whatever the model. Fewer than ``WARN_VAL_SAMPLES`` (100) is a warning
that says how coarse the numbers are (R@1 moves in steps of 1/n; chance is 1/n; R@K is 1.0 for K >= n).
"""

from __future__ import annotations

import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import distributed
from .captions import DataError

log = logging.getLogger("mgpu.data")

FULL_CHECK_ROWS = 50_000
SAMPLE_ROWS = 5_000
MIN_VAL_SAMPLES = 2
WARN_VAL_SAMPLES = 100
SHOWN = 5  # images named in one message


def _warn(message: str, *args) -> None:
    if distributed.rank() == 0:
        log.warning(message, *args)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the DDP ranks (the values themselves in one process), on any backend."""
    if distributed.world_size() == 1:
        return values
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return distributed.all_sum(values, device)


def _problems(dataset, indices: list[int], decode_pixels: bool) -> dict[int, str]:
    """{index: problem} of this rank's part of indices (every world-size-th); read in threads (I/O waits)."""
    mine = indices[distributed.rank()::distributed.world_size()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(lambda i: (i, dataset.problem(i, decode_pixels)), mine)
        return {i: p for i, p in found if p is not None}


def _shown(dataset, indices: list[int], reasons: dict[int, str]) -> str:
    """The first SHOWN images of indices, with their reasons where this rank knows them."""
    parts = [f"{dataset.image_path(i)}" + (f" ({reasons[i]})" if i in reasons else "") for i in indices[:SHOWN]]
    return ", ".join(parts) + (f" and {len(indices) - SHOWN} more" if len(indices) > SHOWN else "")


def too_many_bad(bad: float, seen: float, limit: float, total: int | None = None) -> bool:
    """Whether `bad` unreadable images among `seen` read so far (an epoch holds `total`) exceed the fraction
    `limit`: at once when bad already exceeds the limit of a whole epoch (meaningful on any size), and as a
    running fraction once at least 100 images were read (fewer would make one early bad image decide)."""
    return bad > limit * max(seen, total or 0) or (seen >= 100 and bad > limit * seen)


def check_images(train, val, *, limit: float, where: str):
    """Checks train's and val's images as described above; returns val without its unreadable rows.
    A dataset without ``problem`` (a training stream) is not checked here."""
    start = time.perf_counter()
    val_reasons = _problems(val, list(range(len(val))), True) if hasattr(val, "problem") else {}
    flags = [1.0 if i in val_reasons else 0.0 for i in range(len(val))]
    val_bad = [i for i, f in enumerate(sum_over_ranks(flags)) if f]
    train_reasons, checked = {}, 0
    if hasattr(train, "problem"):
        rows = list(range(len(train)))
        if len(rows) > FULL_CHECK_ROWS:
            rows = sorted(random.Random(0).sample(rows, SAMPLE_ROWS))  # the same sample on every rank
        checked = len(rows)
        train_reasons = _problems(train, rows, False)
    train_bad = int(sum_over_ranks([float(len(train_reasons))])[0])
    sampled = checked < len(train) if hasattr(train, "problem") else False
    bad, total = train_bad + len(val_bad), checked + len(val)
    if distributed.rank() == 0:
        log.info("checked the images before training in %.1f s: %d validation (decoded), %s training (headers); "
                 "%d cannot be read", time.perf_counter() - start, len(val),
                 f"{checked} sampled of {len(train)}" if sampled else checked, bad)
    train_shown = _shown(train, sorted(train_reasons), train_reasons)
    if train_bad:
        _warn("%d training image(s) cannot be read; while training, each is replaced by the next readable one and "
              "counted: %s", train_bad, train_shown)
    if val_bad:
        _warn("validation: left out %d of %d rows whose image cannot be read, so metrics count the %d others: %s",
              len(val_bad), len(val), len(val) - len(val_bad), _shown(val, val_bad, val_reasons))
    fraction = bad / max(total, 1)
    if sampled:
        over = fraction - 3 * math.sqrt(fraction * (1 - fraction) / total) > limit
    else:
        over = bad > limit * total
    if over:
        first = ", ".join(text for text in (train_shown, _shown(val, val_bad, val_reasons)) if text)
        raise DataError(f"{where}: {bad} of the {total} images {'checked ' if sampled else ''}are missing or "
                        f"unreadable ({100 * fraction:.1f}%), more than --max-bad-images {limit:g} allows"
                        f"{' (judged on a sample of the training rows)' if sampled else ''}: {first}. Fix the "
                        f"paths or the files, or raise --max-bad-images")
    if not val_bad:
        return val
    dropped = set(val_bad)
    return val.subset([i for i in range(len(val)) if i not in dropped])


def check_val_size(n: int, where: str) -> None:
    """Refuses a validation set of fewer than MIN_VAL_SAMPLES; warns below WARN_VAL_SAMPLES."""
    if n < MIN_VAL_SAMPLES:
        raise DataError(f"{where}: the validation set has {n} readable sample{'s' if n != 1 else ''}; with one, "
                        f"every retrieval metric is 1.0 and val_loss 0 whatever the model. Give --val-data, or a "
                        f"larger --val-fraction (or --val-size for synthetic data): {WARN_VAL_SAMPLES}+ samples "
                        f"to compare runs")
    if n < WARN_VAL_SAMPLES:
        _warn("the validation set has only %d samples: R@1 moves in steps of %.3f, chance is %.3f and R@K is 1.0 "
              "for K >= %d; use it as a smoke test, and %d+ samples (--val-data, --val-fraction, --val-size) "
              "to compare runs", n, 1 / n, 1 / n, n, WARN_VAL_SAMPLES)
