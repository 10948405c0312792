"""Evaluation that is exact under DDP: every validation sample is counted once, whatever the world size.

DistributedSampler pads the last shard with repeated samples so every rank gets as many; counting them
skews retrieval metrics (open_clip and many trainers evaluate on rank 0 alone for that reason). Here each
rank takes a contiguous, unpadded shard (``shard``), encodes it, and ``gather_varlen`` joins the shards of
different lengths in rank order. Metrics and the validation loss are then computed on the whole set in
sample order, so they do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed
from .bn import restore_modes
from .clip import LOGIT_SCALE_MAX
from .metrics import retrieval_metrics


def shard(n: int, rank: int, world: int) -> range:
    """Rank's contiguous part of range(n): sizes differ by at most one, nothing repeated."""
    return range(n * rank // world, n * (rank + 1) // world)


def gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (dimension 0 may differ between ranks) concatenated in rank order, on every rank."""
    if distributed.world_size() == 1:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(distributed.world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    most = int(max(s.item() for s in sizes))
    padded = torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def val_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: float, batch_size: int) -> float:
    """The symmetric InfoNCE of consecutive batches of batch_size samples (the global batch; the last may be smaller),
    averaged over samples: the same number however many processes computed the features."""
    total, n = 0.0, image_features.shape[0]
    for start in range(0, n, batch_size):
        img, txt = image_features[start:start + batch_size], text_features[start:start + batch_size]
        logits = scale * img @ txt.T
        labels = torch.arange(img.shape[0], device=img.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        total += loss.item() * img.shape[0]
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model, loader, device: torch.device, batch_size: int, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Retrieval metrics and val_loss of model (an unwrapped CLIP) on loader (this rank's shard). Every
    module gets its own mode back afterwards: BatchNorm layers kept in eval mode during training
    (--freeze-bn, a locked tower) stay so."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    images, texts, indices = [], [], []
    try:
        for batch in loader:
            with autocast():
                images.append(model.encode_image(batch["image"].to(device, non_blocking=True)).float())
                texts.append(model.encode_text(batch["tokens"].to(device, non_blocking=True)).float())
            indices.append(batch["index"].to(device))
        empty = torch.zeros(0, model.image_projection.out_features, device=device)
        image_features = gather_varlen(torch.cat(images) if images else empty)
        text_features = gather_varlen(torch.cat(texts) if texts else empty)
        order = gather_varlen(torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device))
    finally:
        restore_modes(model, modes)
    if order.unique().numel() != order.numel():
        raise RuntimeError("evaluation counted a sample twice: the validation loader must not pad or repeat")
    sort = order.argsort()
    image_features, text_features = image_features[sort], text_features[sort]
    scale = min(model.logit_scale.item(), LOGIT_SCALE_MAX)
    scale = float(torch.tensor(scale).exp())
    metrics = retrieval_metrics(image_features, text_features)
    metrics["val_loss"] = val_loss(image_features, text_features, scale, batch_size)
    metrics["val_samples"] = float(image_features.shape[0])
    return metrics
