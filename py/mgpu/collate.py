"""Batching samples whose images hold different numbers of objects (a DataLoader's collate_fn).

A sample is a dict: ``image`` (3, H, W) float tensor, ``tokens`` (n,) long tensor, ``boxes`` (k, 4)
in x1, y1, x2, y2 (k may be 0; a list from JSON is accepted), optionally ``box_phrases`` (k, m) token
ids of each object's phrase, and any other keys. The batch pads text to the longest (pad id 0) and
boxes to the most boxes in the batch, and says which entries are real:
``boxes`` (B, K, 4), ``box_mask`` (B, K) bool, ``num_boxes`` (B,) long, ``box_phrases`` (B, K, m).

Keys: ``boxes`` and ``box_phrases`` may be left out of a sample (no boxes; no phrases: its rows are
padding). Every other key must be in every sample of the batch or in none: a key in only some samples
is an error naming the key and a sample without it, never dropped. Other keys are stacked when every
value is a tensor of one shape, else kept as a list.
"""

from __future__ import annotations

from typing import Any

import torch

PAD_ID = 0  # CLIP and BERT both pad token ids with 0
OPTIONAL_KEYS = ("boxes", "box_phrases")


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


def _phrases(sample: dict[str, Any], index: int, k: int) -> torch.Tensor:
    """(k, m) phrase ids of the sample's k boxes; (k, 0) when it has none."""
    if "box_phrases" not in sample:
        return torch.zeros(k, 0, dtype=torch.long)
    phrases = torch.as_tensor(sample["box_phrases"], dtype=torch.long)
    if phrases.ndim == 1 and phrases.numel() == 0:  # [] from JSON
        phrases = phrases.reshape(0, 0)
    if phrases.ndim != 2 or phrases.shape[0] != k:
        raise ValueError(f"sample {index}: box_phrases must have shape (k, m) with k = {k}, its number of boxes; "
                         f"got {tuple(phrases.shape)}")
    return phrases


def _check_keys(batch: list[dict[str, Any]]) -> list[Any]:
    """The keys to batch, in first-seen order; a key that some samples lack is an error."""
    keys: dict[Any, int] = {}
    for i, sample in enumerate(batch):
        for key in sample:
            keys.setdefault(key, i)
    for key, first in keys.items():
        if key in OPTIONAL_KEYS:
            continue
        lacking = next((i for i, s in enumerate(batch) if key not in s), None)
        if lacking is not None:
            raise ValueError(f"sample {lacking} of the batch has no {key!r}, sample {first} has: every sample needs "
                             f"the same keys (only {' and '.join(OPTIONAL_KEYS)} may be left out)")
    return list(keys)


def collate_fn(batch: list[dict[str, Any]]) -> dict[str, Any]:
    if not batch:
        raise ValueError("collate_fn got an empty batch")
    keys = _check_keys(batch)
    out: dict[str, Any] = {}
    if "image" in keys:
        shapes = {tuple(s["image"].shape) for s in batch}
        if len(shapes) > 1:
            raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}: resize them in the dataset")
        out["image"] = torch.stack([s["image"] for s in batch])
    if "tokens" in keys:
        tokens = [torch.as_tensor(s["tokens"], dtype=torch.long) for s in batch]
        out["tokens"] = _pad_stack(tokens, max(t.shape[0] for t in tokens), PAD_ID)
    boxes = [_boxes(s, i) for i, s in enumerate(batch)]
    counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.long)
    most = int(counts.max())
    out["boxes"] = _pad_stack(boxes, most)
    out["num_boxes"] = counts
    out["box_mask"] = torch.arange(most)[None, :] < counts[:, None]
    if "box_phrases" in keys:
        phrases = [_phrases(s, i, b.shape[0]) for i, (s, b) in enumerate(zip(batch, boxes))]
        width = max(p.shape[1] for p in phrases)
        phrases = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=PAD_ID) for p in phrases]
        out["box_phrases"] = _pad_stack(phrases, most, PAD_ID)
    for key in keys:
        if key in out or key in OPTIONAL_KEYS:
            continue
        values = [s[key] for s in batch]
        same = all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values)
        out[key] = torch.stack(values) if same else values
    return out
