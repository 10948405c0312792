"""Batching samples whose images hold different numbers of objects (the collate_fn of seed 000).

A sample is a dict: ``image`` (3, H, W) float tensor, ``tokens`` (n,) long tensor, ``boxes`` (k, 4)
in x1, y1, x2, y2 (k may be 0; a list from JSON is accepted), optionally ``box_phrases`` (k, m) token
ids of each object's phrase, and any other keys. The batch pads text to the longest (pad id 0) and
boxes to the most boxes in the batch, and says which entries are real:
``boxes`` (B, K, 4), ``box_mask`` (B, K) bool, ``num_boxes`` (B,) long, ``box_phrases`` (B, K, m).
"""

from __future__ import annotations

from typing import Any

import torch

PAD_ID = 0  # CLIP and BERT both pad token ids with 0


def _pad_stack(rows: list[torch.Tensor], length: int, value: float = 0) -> torch.Tensor:
    """Stack tensors of shape (n_i, *rest) into (B, length, *rest), padding dimension 0 with value."""
    rest = rows[0].shape[1:] if rows else ()
    out = rows[0].new_full((len(rows), length, *rest), value) if rows else torch.zeros(0, length)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def _boxes(sample: dict[str, Any], index: int) -> torch.Tensor:
    boxes = torch.as_tensor(sample.get("boxes", []), dtype=torch.float32)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"sample {index}: boxes must have shape (k, 4) as x1, y1, x2, y2, got {tuple(boxes.shape)}")
    return boxes


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    if not batch:
        raise ValueError("collate_fn got an empty batch")
    shapes = {tuple(s["image"].shape) for s in batch}
    if len(shapes) > 1:
        raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}: resize them in the dataset")
    out: dict[str, Any] = {"image": torch.stack([s["image"] for s in batch])}
    tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in batch]
    out["tokens"] = _pad_stack(tokens, max(t.shape[0] for t in tokens), PAD_ID)
    boxes = [_boxes(s, i) for i, s in enumerate(batch)]
    counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long)
    most = int(counts.max())
    out["boxes"] = _pad_stack(boxes, most)
    out["num_boxes"] = counts
    out["box_mask"] = torch.arange(most)[None, :] < counts[:, None]
    if any("box_phrases" in s for s in batch):
        phrases = [torch.as_tensor(s["box_phrases"], dtype=torch.long).reshape(b.shape[0], -1) if "box_phrases" in s
                   else torch.zeros(b.shape[0], 0, dtype=torch.long) for s, b in zip(batch, boxes)]
        width = max((p.shape[1] for p in phrases), default=0)
        phrases = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=PAD_ID) for p in phrases]
        out["box_phrases"] = _pad_stack(phrases, most, PAD_ID)
    for key in batch[0].keys() - {"image", "tokens", "boxes", "box_phrases"}:
        values = [s.get(key) for s in batch]
        same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        out[key] = torch.stack(values) if same else values
    return out
