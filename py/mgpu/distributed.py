"""Small helpers that work the same with and without torch.distributed initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_on() else 0


def world_size() -> int:
    return dist.get_world_size() if is_on() else 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order, with gradients flowing back to each owner.
    Every rank must pass the same shape (use drop_last in the sampler)."""
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather  # autograd-aware

    return torch.cat(all_gather(t), dim=0)
