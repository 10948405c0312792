"""Optimisation for the CLIP trainer: AdamW with open_clip's parameter groups (frozen parameters left
out), and warmup then cosine."""

from __future__ import annotations

import math

import torch
from torch import nn


def optimizer_for(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms, embeddings' positions and the
    logit scale (as open_clip). fused (CUDA): one kernel, and a GradScaler's inf check stays on the GPU
    (no host sync per step)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_scale" in name or "positional" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fused or None)


def schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then cosine decay to zero at step `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
