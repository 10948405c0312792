"""StarNet image towers ("Rewrite the Stars", Ma et al., CVPR 2024).

Stem: 3x3 stride-2 conv to 32 channels + BN + ReLU6. Four stages of width base * 2**i, each a 3x3
stride-2 conv + BN, then blocks. A block: 7x7 depthwise conv + BN; two 1x1 convs to r * dim whose
outputs are multiplied after ReLU6 on the first (the "star" operation); a 1x1 conv + BN back to dim; a
7x7 depthwise conv; drop-path and the residual. Head: BN, global average pool, then (for ImageNet) a
linear classifier.

``set_grad_checkpointing()`` keeps only each block's input during the forward pass and recomputes the
block in the backward pass (activation checkpointing): less memory for about one more forward. The
recomputation leaves BatchNorm running statistics alone, so they match a run without it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..bn import running_stats_kept


@dataclass(frozen=True)
class StarNetSpec:
    base_dim: int
    depths: tuple[int, int, int, int]
    mlp_ratio: int
    drop_path: float = 0.0


SPECS = {
    "starnet_s050": StarNetSpec(16, (1, 1, 3, 1), 3),
    "starnet_s100": StarNetSpec(20, (1, 2, 4, 1), 4),
    "starnet_s150": StarNetSpec(24, (1, 2, 4, 2), 3),
    "starnet_s1": StarNetSpec(24, (2, 2, 8, 3), 4),
    "starnet_s2": StarNetSpec(32, (1, 2, 6, 2), 4),
    "starnet_s3": StarNetSpec(32, (2, 2, 8, 4), 4),
    "starnet_s4": StarNetSpec(32, (3, 3, 12, 5), 4, drop_path=0.1),
}


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            bn: bool = True) -> nn.Sequential:
    """Named conv / bn, as the official StarNet's ConvBN: its released weights load key for key."""
    layers = OrderedDict(conv=nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups))
    if bn:
        layers["bn"] = nn.BatchNorm2d(c_out)
        nn.init.ones_(layers["bn"].weight)
        nn.init.zeros_(layers["bn"].bias)
    return nn.Sequential(layers)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (training only)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class StarBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        hidden = mlp_ratio * dim
        self.dwconv = conv_bn(dim, dim, 7, groups=dim)
        self.f1 = conv_bn(dim, hidden, bn=False)
        self.f2 = conv_bn(dim, hidden, bn=False)
        self.g = conv_bn(hidden, dim)
        self.dwconv2 = conv_bn(dim, dim, 7, groups=dim, bn=False)
        self.act = nn.ReLU6()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = self.act(self.f1(y)) * self.f2(y)  # the star operation
        y = self.dwconv2(self.g(y))
        return x + self.drop_path(y)


class StarNet(nn.Module):
    """A StarNet backbone. forward() returns pooled features (B, out_dim); forward_map() the last map."""

    def __init__(self, spec: StarNetSpec, num_classes: int = 0):
        super().__init__()
        channels = 32
        self.stem = nn.Sequential(conv_bn(3, channels, 3, stride=2), nn.ReLU6())
        total = sum(spec.depths)  # drop-path rates rise linearly from 0 to spec.drop_path
        rates = [spec.drop_path * k / max(total - 1, 1) for k in range(total)]
        stages, n = [], 0
        for i, depth in enumerate(spec.depths):
            width = spec.base_dim * 2**i
            blocks = [conv_bn(channels, width, 3, stride=2)]
            blocks += [StarBlock(width, spec.mlp_ratio, rates[n + k]) for k in range(depth)]
            stages.append(nn.Sequential(*blocks))
            channels, n = width, n + depth
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(channels)
        self.out_dim = channels
        self.head = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.apply(self._init)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's blocks in the backward pass instead of keeping their activations."""
        self.grad_checkpointing = enable

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_map(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.norm(self.stages(x))
        for stage in self.stages:
            for block in stage:
                # the recomputation replays the RNG (drop-path masks) and keeps BatchNorm statistics as they are
                x = checkpoint(block, x, use_reentrant=False,
                               context_fn=lambda block=block: (contextlib.nullcontext(), running_stats_kept(block)))
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_map(images).mean(dim=(2, 3)))


def starnet(name: str, num_classes: int = 0) -> StarNet:
    return StarNet(SPECS[name], num_classes)
