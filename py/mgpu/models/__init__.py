"""The encoders mgpu's CLIP trainer can use, by the names run_train_clip.sh passes.

    image_encoder("starnet_s1")          # a StarNet backbone: images -> (B, out_dim)
    text_encoder("clip:ViT-B/32")        # a text tower: token ids -> (B, out_dim)
    python -m mgpu.models                # every encoder with its parameter count

The "tiny" text towers are for CPU work and tests, named so nobody mistakes them for the real ones.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .starnet import SPECS as STARNET_SPECS
from .starnet import starnet
from .text import BertSpec, BertTower, ClipTextSpec, ClipTextTower

IMAGE_ENCODERS: dict[str, Callable[[], nn.Module]] = {
    name: (lambda name=name: starnet(name)) for name in STARNET_SPECS
}

# CLIP text towers: "clip:ViT-B/32" has OpenAI's QuickGELU (OpenAI's weights, open_clip's "-quickgelu"
# ones: LAION-400M, MetaCLIP); "-gelu" names have GELU (open_clip's own ViT-B-32: LAION-2B, DataComp).
# The name is what checkpoints record, so the activation travels with them.
TEXT_ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "clip:ViT-B/32": lambda: ClipTextTower(ClipTextSpec(width=512, layers=12, heads=8)),
    "clip:ViT-B/32-gelu": lambda: ClipTextTower(ClipTextSpec(width=512, layers=12, heads=8, activation="gelu")),
    "clip:tiny": lambda: ClipTextTower(ClipTextSpec(width=128, layers=2, heads=2)),
    "clip:tiny-gelu": lambda: ClipTextTower(ClipTextSpec(width=128, layers=2, heads=2, activation="gelu")),
    "bert-base-chinese": lambda: BertTower(BertSpec(hidden=768, layers=12, heads=12, intermediate=3072)),
    # Made to be trained from scratch (no weights exist for it): mean pooling, PyTorch's initialisation,
    # no dropout; with BERT's pooler, std 0.02 and dropout 0.1 the demo reaches R@1 0.11 (docs/training.md).
    "bert:tiny-chinese": lambda: BertTower(BertSpec(hidden=128, layers=2, heads=2, intermediate=512, dropout=0.0,
                                                    pooling="mean", init="torch")),
}


class UnknownEncoder(ValueError):
    """An encoder name mgpu does not know; the message lists the ones it does."""


def _build(kind: str, table: dict[str, Callable[[], nn.Module]], name: str) -> nn.Module:
    if name not in table:
        raise UnknownEncoder(f"unknown {kind} encoder {name!r}; known: {', '.join(table)}")
    return table[name]()


def image_encoder(name: str) -> nn.Module:
    return _build("image", IMAGE_ENCODERS, name)


def text_encoder(name: str) -> nn.Module:
    return _build("text", TEXT_ENCODERS, name)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
