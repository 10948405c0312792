"""Retrieval metrics as open_clip reports them: image->text and text->image R@1/5/10, mean and median
rank (1-based), over the whole evaluation set. Sample i's image matches sample i's text. A tie with
the true match does not push it down: its rank is 1 + the number of strictly better candidates."""

from __future__ import annotations

import torch


def _ranks(logits: torch.Tensor) -> torch.Tensor:
    true = logits.diagonal()[:, None]
    return (logits > true).sum(dim=1) + 1


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} "
                         f"vs {tuple(text_features.shape)}")
    logits = image_features.float() @ text_features.float().T
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", _ranks(logits)), ("text_to_image", _ranks(logits.T))):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = (ranks <= k).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.float().mean().item()
        out[f"{name}_median_rank"] = ranks.float().median().item()
    out["mean_recall"] = sum(v for k, v in out.items() if "_R@" in k) / 6
    return out
