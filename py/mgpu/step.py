"""One optimizer step of the CLIP trainer: ``train_step`` takes the step's K micro-batches and returns
named outputs.

Gradient accumulation that is exact for a contrastive loss (``--accum-steps K``, open_clip's
``--accum-freq``): every micro-batch's negatives are all K micro-batches (and, under DDP, every rank's).
First a no-grad pass encodes the K micro-batches and keeps only their features; then each micro-batch is
encoded again with gradients and the loss is computed on the whole step's features, its own fresh and the
others' cached, and back-propagated. The gradients that reach micro-batch j's parameters through its own
features are exactly its share of the full-batch gradient, so after K passes the gradient is that of one
batch K times larger. Three details make it exact rather than close:
- the logit scale enters every pass's loss but must be counted once: only the last pass lets its
  gradient through (the last, because that is the pass in which DDP all-reduces; see ``no_sync``);
- each micro-batch's second pass replays the random state of its first (dropout, drop-path masks), so the
  cached features are the ones the gradient pass recomputes;
- BatchNorm running statistics are updated once per micro-batch, by the gradient pass (``mgpu.bn``).
BatchNorm normalises each micro-batch with its own statistics, as each DDP rank does with its batch; with
frozen statistics (``--freeze-bn``, a locked image tower) the step equals one K-times-larger batch exactly.

Host syncs: none. The loss comes back as a tensor on the device; the caller reads it when it checks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .bn import running_stats_kept
from .clip import Features, clip_loss, region_loss


@dataclass
class StepOutput:
    loss: torch.Tensor  # the step's total loss, detached, on the device
    contrastive: torch.Tensor  # the InfoNCE part
    region: torch.Tensor | None  # the region part (unweighted), when --loss-region is on
    images_read: int  # images this process read for the step, replaced ones included
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of images replaced


@dataclass
class Stepper:
    """What a step needs: the plain model, what to call (the DP/DDP/compiled wrapper), the optimizer, its
    schedule, the GradScaler (enabled only for fp16), and the settings."""
    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    grad_clip: float = 0.0
    loss_region: float = 0.0
    rng_devices: list[int] = field(default_factory=list)  # CUDA devices whose generators the forward draws from
    compiled: bool = False  # wrapped is torch.compile's (--compile): inputs() marks the sizes that vary


@dataclass
class _Parts:
    """One micro-batch's share of the loss inputs: features and, with the region loss, its real boxes."""
    image: torch.Tensor
    text: torch.Tensor
    regions: torch.Tensor | None = None  # (boxes, D)
    phrases: torch.Tensor | None = None  # (boxes, D)
    ids: torch.Tensor | None = None  # (boxes, m) phrase token ids


def inputs(batch: dict, device: torch.device, region: bool, compiled: bool = False) -> tuple[torch.Tensor, ...]:
    """The model's arguments for one collated batch: images, tokens and, for the region loss, boxes.

    ``compiled`` (--compile): the sizes that change from batch to batch (the longest caption's token count,
    the most boxes in an image, the longest phrase) are marked dynamic, so torch.compile compiles the model
    once, for any length. Unmarked, the first batch compiles it for its one length and the next, longer or
    shorter, compiles it all again: on an H200, a cold compile of starnet_s1 x clip:ViT-B/32 took over a
    minute. (Without --compile nothing is marked: torch._dynamo alone takes 1.7 s to import.)"""
    out = (batch["image"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True))
    if region and "box_phrases" in batch:
        out += tuple(batch[k].to(device, non_blocking=True) for k in ("boxes", "box_mask", "box_phrases"))
    if compiled:
        for tensor, dims in zip(out[1:], ((1,), (1,), (1,), (1, 2))):
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return out


def _parts(out: Features, args: tuple[torch.Tensor, ...]) -> _Parts:
    if out.regions is None:
        return _Parts(out.image, out.text)
    mask, ids = args[3], args[4]
    return _Parts(out.image, out.text, out.regions[mask], out.phrases[mask], ids[mask])


def _detached(p: _Parts) -> _Parts:
    return _Parts(*(None if t is None else t.detach() for t in (p.image, p.text, p.regions, p.phrases, p.ids)))


def _loss(parts: list[_Parts], scale: torch.Tensor, weight: float):
    """(total, contrastive, region) over the features of all micro-batches."""
    scale = scale.float()
    contrastive = clip_loss(torch.cat([p.image for p in parts]).float(), torch.cat([p.text for p in parts]).float(), scale)
    if parts[0].regions is None:
        return contrastive, contrastive, None
    width = max(p.ids.shape[1] for p in parts)
    ids = torch.cat([F.pad(p.ids, (0, width - p.ids.shape[1])) for p in parts])
    regions, phrases = (torch.cat([getattr(p, k) for p in parts]).float() for k in ("regions", "phrases"))
    mask = torch.ones(1, ids.shape[0], dtype=torch.bool, device=ids.device)
    region = region_loss(regions[None], phrases[None], ids[None], mask, scale)
    return contrastive + weight * region, contrastive, region


def _rng_state(devices: list[int]):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in devices]


def _set_rng_state(state, devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for index, saved in zip(devices, state[1]):
        torch.cuda.set_rng_state(saved, index)


def _no_sync(wrapped: nn.Module):
    """DDP's no_sync (gradients accumulate locally, all-reduced in the next synced backward); else nothing."""
    no_sync = getattr(wrapped, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def _backward(s: Stepper, micro: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    region = s.loss_region > 0
    if len(micro) == 1:
        out = s.wrapped(*micro[0])
        total, contrastive, reg = _loss([_parts(out, micro[0])], out.scale, s.loss_region if region else 0.0)
        s.scaler.scale(total).backward()
        return total, contrastive, reg
    cached, states = [], []
    with torch.no_grad(), running_stats_kept(s.model):
        for args in micro:
            states.append(_rng_state(s.rng_devices))
            cached.append(_detached(_parts(s.wrapped(*args), args)))
    for j, args in enumerate(micro):
        _set_rng_state(states[j], s.rng_devices)
        last = j == len(micro) - 1
        with contextlib.nullcontext() if last else _no_sync(s.wrapped):
            out = s.wrapped(*args)
            parts = cached[:j] + [_parts(out, args)] + cached[j + 1:]
            scale = out.scale if last else out.scale.detach()  # the scale's gradient counted once
            total, contrastive, reg = _loss(parts, scale, s.loss_region if region else 0.0)
            s.scaler.scale(total).backward()
    return total, contrastive, reg


def train_step(s: Stepper, batches: list[dict]) -> StepOutput:
    """Forward and backward over the step's micro-batches, then clip, step, schedule, zero the gradients."""
    micro = [inputs(b, s.device, s.loss_region > 0, s.compiled) for b in batches]
    total, contrastive, reg = _backward(s, micro)
    if s.grad_clip:
        s.scaler.unscale_(s.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(s.model.parameters(), s.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    skipped = [item for b in batches for per_sample in b.get("skipped", []) for item in per_sample]
    read = sum(b["image"].shape[0] + sum(len(x) for x in b.get("skipped", [])) for b in batches)
    return StepOutput(total.detach(), contrastive.detach(), None if reg is None else reg.detach(), read, skipped)
