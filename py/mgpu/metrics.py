"""Retrieval metrics with open_clip's definitions (open_clip_train's ``get_clip_metrics``), so the
numbers compare with published ones; the values are open_clip's on a golden set of cases
(tests/fixtures/golden/retrieval_metrics.json, made by tools/golden/retrieval_metrics.py).

Sample i's image matches sample i's text. For each query, the candidates are sorted by similarity,
best first, and the true match's 0-based position there is its rank r; then
- R@k: the fraction of queries with r < k;
- mean rank: mean(r) + 1;
- median rank: floor(numpy.median(r)) + 1 (for an even count, numpy's median is the mean of the two
  middle values: ranks 0 and 1 give 1, not torch.median's lower middle);
- ties: open_clip sorts with ``torch.argsort(descending=True)`` on the CPU, which is not a stable sort:
  candidates with the same similarity as the true match come before or after it in the order that
  sort leaves them (index order for rows of up to 16, otherwise its algorithm's order). So a tie is
  not counted in the true match's favour: with duplicated captions or images R@1 is lower than an
  "any tied candidate is a hit" rule would give. mgpu ranks with the same call on the CPU, so its
  values are open_clip's, ties included.
``mean_recall`` (the mean of the six R@k) is mgpu's own summary.
"""

from __future__ import annotations

import numpy as np
import torch


def _ranks(logits: torch.Tensor) -> np.ndarray:
    """0-based position of each row's true match (the diagonal) in the row sorted by descending logit,
    as open_clip finds it: torch.argsort on the CPU, ties in the order that sort leaves them."""
    ranking = torch.argsort(logits, descending=True)
    return torch.where(ranking == torch.arange(logits.shape[0])[:, None])[1].numpy()


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      logit_scale: float = 1.0) -> dict[str, float]:
    """image->text and text->image R@1/5/10, mean and median rank (1-based), and mean_recall, over
    the whole set. logit_scale multiplies the similarities as open_clip's evaluation does (a positive
    scale changes no order, except where rounding makes two nearly equal logits equal)."""
    if image_features.shape != text_features.shape or image_features.ndim != 2 or image_features.shape[0] == 0:
        raise ValueError(f"image and text features differ in shape or are not (N, D) with N >= 1: "
                         f"{tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    logits = ((logit_scale * image_features.float()) @ text_features.float().T).cpu()
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise ValueError(f"{bad} of the {logits.numel()} image-text similarities are NaN or infinite: "
                         "the features are not finite (did training diverge?)")
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", _ranks(logits)), ("text_to_image", _ranks(logits.T))):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float(np.mean(ranks < k))
        out[f"{name}_mean_rank"] = float(ranks.mean() + 1)
        out[f"{name}_median_rank"] = float(np.floor(np.median(ranks)) + 1)
    out["mean_recall"] = sum(v for k, v in out.items() if "_R@" in k) / 6
    return out
