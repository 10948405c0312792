"""Checkpoints that load anywhere: a save_model that works for wrapped models (DataParallel, DDP, compiled), made safe.

- ``save_model`` / ``save_checkpoint`` unwrap DataParallel, DDP and torch.compile first, so the keys
  never carry ``module.`` or ``_orig_mod.``, and write atomically (``files.atomic_write``): a crash
  mid-save leaves the previous checkpoint intact.
- The random state is saved per rank (each rank's own CUDA generator) and restored per rank.
- ``load_model`` accepts plain or wrapped state dicts (prefixes stripped), loads with
  ``weights_only=True`` and ``map_location="cpu"`` (no pickle code runs; no rank allocates on GPU 0),
  into a wrapped or plain model, and reports missing and unexpected keys.
- ``latest_checkpoint`` finds the newest ``checkpoint_<step>.pt`` for ``--resume auto`` (``resume_source``);
  ``prune_checkpoints`` keeps the newest N.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .files import atomic_write

log = logging.getLogger("mgpu.checkpoint")

_PREFIXES = ("module.", "_orig_mod.")
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Keys without any leading ``module.`` / ``_orig_mod.`` (in any order, any number of them)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def save_model(model: nn.Module, path: str | os.PathLike, config: dict | None = None) -> Path:
    """The weights, unwrapped: they load into a plain, DataParallel or DDP model alike; with config (how
    to rebuild the model, e.g. for mgpu.infer) when given."""
    path = Path(path)
    state = {"model": unwrap(model).state_dict()}
    if config is not None:
        state["config"] = dict(config)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def rng_state(cuda_devices: Sequence[int] = ()) -> dict[str, Any]:
    """This process's random state: Python, NumPy, torch's CPU generator and, for each CUDA device this
    process uses (its own under DDP, all of them under DataParallel), that device's generator."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *[int(v) if isinstance(v, (int, np.integer))
                                                                            else float(v) for v in np_state[2:]])}
    if cuda_devices:
        state["cuda"] = [torch.cuda.get_rng_state(index) for index in cuda_devices]
    return state


def set_rng_state(state: dict[str, Any], cuda_devices: Sequence[int] = ()) -> None:
    """Restore what rng_state saved. The saved CUDA states go, in order, to the devices this process uses
    now: a run saved with more GPUs than it resumes with restores what fits, never an IndexError."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    for index, saved in zip(cuda_devices, state.get("cuda") or []):
        torch.cuda.set_rng_state(saved, index)


def rank_rng_state(state: dict[str, Any], rank: int) -> dict[str, Any]:
    """The random state rank saved (checkpoints keep one per rank); rank 0's when the checkpoint was
    written by fewer processes, or before per-rank states existed."""
    per_rank = state.get("rng_ranks") or [state["rng"]]
    if rank >= len(per_rank):
        log.warning("the checkpoint holds the random state of %d process(es); rank %d continues from rank 0's",
                    len(per_rank), rank)
        return per_rank[0]
    return per_rank[rank]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, step: int, epoch: int, optimizer=None,
                    scheduler=None, scaler=None, config: dict | None = None,
                    rng: list[dict[str, Any]] | None = None) -> Path:
    """Everything a run needs to continue exactly: weights, optimizer, scheduler, scaler, counters, RNG.
    rng: every rank's rng_state() in rank order (distributed.all_gather_state); default: this process's."""
    path = Path(path)
    per_rank = list(rng) if rng else [rng_state()]
    state = {"model": unwrap(model).state_dict(), "step": step, "epoch": epoch, "rng": per_rank[0],
             "rng_ranks": per_rank, "config": dict(config or {})}
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[name] = obj.state_dict()
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or one that needs arbitrary pickle code
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_model(model: nn.Module, source: str | os.PathLike | dict, strict: bool = True,
               name: str | os.PathLike | None = None) -> LoadReport:
    """Load weights (a checkpoint path, a checkpoint dict, or a bare state dict) into a plain or wrapped
    model. strict: missing or unexpected keys are an error that lists them (and names `name`, the file a
    dict came from)."""
    state = read_checkpoint(source) if not isinstance(source, dict) else source
    weights = state["model"] if isinstance(state.get("model"), dict) else state
    result = unwrap(model).load_state_dict(clean_state_dict(weights), strict=False)
    report = LoadReport(list(result.missing_keys), list(result.unexpected_keys))
    if strict and (report.missing or report.unexpected):
        where = source if not isinstance(source, dict) else name or "the state dict"
        if report.unexpected and not report.missing and all(".pooler." in k for k in report.unexpected):
            raise CheckpointError(f"{where}: was trained with BERT's pooler ({report.unexpected[0]}), which this "
                                  "text tower no longer has: bert:tiny-chinese pools by the mean over tokens "
                                  "since 2026-11-29 (docs/training.md); train it again")
        raise CheckpointError(f"{where}: does not fit the model: missing {report.missing[:5]}"
                              f"{'...' if len(report.missing) > 5 else ''}, unexpected {report.unexpected[:5]}"
                              f"{'...' if len(report.unexpected) > 5 else ''}")
    return report


def _numbered(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """The checkpoint_<step>.pt files in folder, by step."""
    return sorted((int(m.group(1)), p) for p in Path(folder).glob("checkpoint_*.pt") if (m := _NAME.match(p.name)))


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint_<step>.pt with the highest step in folder, or None."""
    found = _numbered(folder)
    return found[-1][1] if found else None


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint_<step>.pt files in folder."""
    for _, path in _numbered(folder)[:-keep]:
        path.unlink(missing_ok=True)


def resume_source(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint --resume names: None when not resuming; with ``auto`` the newest in output_dir, or
    None (a first run) when there is none yet."""
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(output_dir)
        if found is None:
            log.info("--resume auto: no checkpoint in %s yet; starting from scratch", output_dir)
        return found
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file (or pass --resume auto)")
    return path
