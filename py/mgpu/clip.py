"""The CLIP model around an image and a text tower, and its symmetric InfoNCE loss.

Under DDP the loss is computed the way that scales (open_clip's local loss with gather-with-grad):
every rank all-gathers both feature sets with autograd, scores its own rows against the whole global
batch (labels offset by rank), and averages over its rows. Because the gather's backward sums each
rank's gradients into the owner of the features, DDP's gradient averaging then gives exactly the
gradient of one process on the whole global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


class CLIP(nn.Module):
    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 512):
        super().__init__()
        self.visual, self.text = image_tower, text_tower
        self.image_projection = nn.Linear(image_tower.out_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_tower.out_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        for proj in (self.image_projection, self.text_projection):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_projection(self.visual(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text(tokens)), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """(image features, text features, scale): features L2-normalised, scale = exp(logit_scale) <= 100."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; the rows of this rank only (see the module docstring)."""
    rank = distributed.rank()
    all_images = distributed.gather_with_grad(image_features)
    all_texts = distributed.gather_with_grad(text_features)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
    logits_per_image = scale * image_features @ all_texts.T
    logits_per_text = scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
