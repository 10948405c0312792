"""The CLIP model around an image and a text tower, and its symmetric InfoNCE loss.

Under DDP the loss is computed the way that scales (open_clip's local loss with gather-with-grad):
every rank all-gathers both feature sets with autograd, scores its own rows against the whole global
batch (labels offset by rank), and averages over its rows. Because the gather's backward sums each
rank's gradients into the owner of the features, DDP's gradient averaging then gives exactly the
gradient of one process on the whole global batch.

The forward returns named outputs (``Features``). Mixed precision is entered inside the forward
(``autocast_dtype``), not around the wrapper: DataParallel runs each replica in a thread of its own and
re-enters autocast there with only ``enabled`` (torch's parallel_apply), so the dtype chosen outside
would not reach the replicas, which would fall back to float16.

Fine-tuning: ``lock_image_tower`` / ``lock_text_tower`` freeze a tower except its last N blocks (its
BatchNorm statistics freeze with it: ``mgpu.bn``); ``set_grad_checkpointing`` turns on activation
checkpointing in every tower that offers it.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


class Features(NamedTuple):
    """What CLIP.forward returns: L2-normalised features, the scale (shape (1,): DataParallel gathers one per
    replica; clip_loss takes their mean) and, with boxes, region and phrase features (B, K, embed_dim)."""
    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    regions: torch.Tensor | None = None
    phrases: torch.Tensor | None = None


class LockError(ValueError):
    """A lock request the tower cannot meet (more unlocked blocks than it has, or a tower without blocks)."""


def tower_blocks(tower: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(the tower's blocks in order, what follows the last block): StarNet's stage blocks (down-sampling
    included, as timm groups them) and final norm; CLIP text's residual blocks and ln_final; BERT's layers
    and pooler (when it has one)."""
    if hasattr(tower, "stages") and hasattr(tower, "norm"):
        return [block for stage in tower.stages for block in stage], [tower.norm]
    if hasattr(tower, "transformer") and hasattr(tower.transformer, "resblocks"):
        return list(tower.transformer.resblocks), [tower.ln_final]
    if hasattr(tower, "encoder") and hasattr(tower.encoder, "layer"):
        return list(tower.encoder.layer), [m for m in (getattr(tower, "pooler", None),) if m is not None]
    raise LockError(f"{type(tower).__name__} has no blocks mgpu knows how to unlock")


def lock_tower(tower: nn.Module, unlocked: int = 0) -> tuple[int, int]:
    """Freeze tower's parameters except its last `unlocked` blocks and what follows them.
    Returns (trainable parameters, all parameters) of the tower."""
    blocks, tail = tower_blocks(tower) if unlocked else ([], [])
    if unlocked > len(blocks):
        raise LockError(f"{unlocked} blocks to leave unlocked, but {type(tower).__name__} has {len(blocks)}")
    tower.requires_grad_(False)
    for module in (blocks[len(blocks) - unlocked:] + tail) if unlocked else []:
        module.requires_grad_(True)
    params = list(tower.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class CLIP(nn.Module):
    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 512):
        super().__init__()
        self.autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: the forward runs under autocast
        self.visual, self.text = image_tower, text_tower
        self.image_projection = nn.Linear(image_tower.out_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.out_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        for proj in (self.image_projection, self.text_projection):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    def lock_image_tower(self, unlocked: int = 0) -> tuple[int, int]:
        return lock_tower(self.visual, unlocked)

    def lock_text_tower(self, unlocked: int = 0) -> tuple[int, int]:
        return lock_tower(self.text, unlocked)

    def set_grad_checkpointing(self, enable: bool = True) -> list[str]:
        """Activation checkpointing in each tower that has set_grad_checkpointing; returns their names."""
        done = []
        for name, tower in (("image", self.visual), ("text", self.text)):
            if callable(getattr(tower, "set_grad_checkpointing", None)):
                tower.set_grad_checkpointing(enable)
                done.append(name)
        return done

    def _autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.visual(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, boxes: torch.Tensor | None = None,
                box_mask: torch.Tensor | None = None, box_phrases: torch.Tensor | None = None) -> Features:
        """Features(image, text, scale): features L2-normalised, scale = exp(logit_scale) <= 100 of shape
        (1,) (so DataParallel gathers one copy per replica; clip_loss takes their mean). Runs under
        autocast when autocast_dtype is set, in whichever thread calls it.

        With boxes (B, K, 4 in pixels), box_mask (B, K) and box_phrases (B, K, m) token ids, also region
        features pooled inside each box from the image tower's last feature map and the features of each
        box's phrase, both (B, K, embed_dim), zero where box_mask is False. Everything runs in this one
        forward so DDP sees every parameter used once."""
        with self._autocast(images.device.type):
            return self._forward(images, tokens, boxes, box_mask, box_phrases)

    def _forward(self, images, tokens, boxes, box_mask, box_phrases) -> Features:
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp().reshape(1)
        text_features = self.encode_text(tokens)
        if boxes is None:
            return Features(self.encode_image(images), text_features, scale)
        feature_map = self.visual.forward_map(images)
        image_features = F.normalize(self.image_projection(feature_map.mean(dim=(2, 3))), dim=-1)
        regions = region_pool(feature_map, boxes, images.shape[-1])
        region_features = F.normalize(self.image_projection(regions), dim=-1) * box_mask[..., None]
        phrase_features = region_features.new_zeros(region_features.shape)
        if box_mask.any():
            phrases = box_phrases[box_mask]
            phrases = phrases[:, : int((phrases != 0).sum(dim=0).nonzero().max()) + 1]  # drop all-padding columns
            phrase_features[box_mask] = self.encode_text(phrases).to(phrase_features.dtype)
        return Features(image_features, text_features, scale, region_features, phrase_features)


def region_pool(feature_map: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, K, C): the mean of the feature-map cells whose centres lie inside each box (x1, y1, x2, y2 in
    image pixels); a box smaller than a cell takes the cell holding its centre."""
    b, c, h, w = feature_map.shape
    stride_y, stride_x = image_size / h, image_size / w
    ys = (torch.arange(h, device=boxes.device) + 0.5) * stride_y
    xs = (torch.arange(w, device=boxes.device) + 0.5) * stride_x
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))
    inside = (ys[:, None] >= y1) & (ys[:, None] <= y2) & (xs[None, :] >= x1) & (xs[None, :] <= x2)
    cy = ((y1 + y2) / 2 / stride_y).long().clamp(0, h - 1)
    cx = ((x1 + x2) / 2 / stride_x).long().clamp(0, w - 1)
    centre = (torch.arange(h, device=boxes.device)[:, None] == cy) & (torch.arange(w, device=boxes.device)[None, :] == cx)
    weights = torch.where(inside.flatten(2).any(-1, keepdim=True), inside.flatten(2), centre.flatten(2)).to(feature_map.dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ feature_map.flatten(2).transpose(1, 2)


def region_loss(region_features: torch.Tensor, phrase_features: torch.Tensor, box_phrases: torch.Tensor,
                box_mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between the boxes of this batch and their phrases, where every box whose phrase
    has the same tokens is a positive (two red circles share a phrase). 0 when the batch has no box."""
    if not box_mask.any():
        return region_features.sum() * 0  # keeps the graph connected for DDP
    regions, phrases = region_features[box_mask].float(), phrase_features[box_mask].float()
    ids = box_phrases[box_mask]
    positive = (ids[:, None, :] == ids[None, :, :]).all(-1)
    logits = scale.mean() * regions @ phrases.T
    def multi_positive(logits: torch.Tensor) -> torch.Tensor:
        return (torch.logsumexp(logits, dim=1) - torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)).mean()
    return (multi_positive(logits) + multi_positive(logits.T)) / 2


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; the rows of this rank only (see the module docstring).
    scale: a scalar, or DataParallel's gathered copies of it (their mean is the value)."""
    scale = scale.mean()
    rank = distributed.rank()
    all_images = distributed.gather_with_grad(image_features)
    all_texts = distributed.gather_with_grad(text_features)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    logits_per_image = scale * image_features @ all_texts.T
    logits_per_text = scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
