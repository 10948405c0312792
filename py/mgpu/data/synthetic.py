"""The embedded dataset (``--data synthetic``): procedurally drawn captioned images.

Each image holds 1-3 groups of identical objects (shape, colour, size), 1-3 objects a group, placed so
that none hides another, on a noisy background; its caption names every group with the count actually
drawn, in English and in Chinese, and every object has its bounding box and a phrase. Sample i of a seed is the same on every machine and in every worker
(it is drawn from its own generator), so ranks and runs agree without sharing state. With 3 shapes x 6
colours x 2 sizes x 3 counts per group, captions are varied enough for retrieval to be a real measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COLOURS = {"red": ("红色", (0.85, 0.15, 0.15)), "green": ("绿色", (0.15, 0.7, 0.2)),
           "blue": ("蓝色", (0.15, 0.3, 0.85)), "yellow": ("黄色", (0.9, 0.8, 0.1)),
           "purple": ("紫色", (0.55, 0.2, 0.7)), "orange": ("橙色", (0.95, 0.5, 0.1))}
SIZES = {"small": ("小", 0.09), "large": ("大", 0.16)}  # radius as a fraction of the image side
COUNTS_EN = {1: "a", 2: "two", 3: "three"}
COUNTS_ZH = {1: "一个", 2: "两个", 3: "三个"}


@dataclass(frozen=True)
class Group:
    shape: str
    colour: str
    size: str
    count: int

    def english(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNTS_EN[self.count]} {self.size} {self.colour} {noun}"

    def chinese(self) -> str:
        return f"{COUNTS_ZH[self.count]}{SIZES[self.size][0]}的{COLOURS[self.colour][0]}{SHAPES[self.shape]}"

    def phrase(self, language: str) -> str:
        if language == "zh":
            return f"{SIZES[self.size][0]}的{COLOURS[self.colour][0]}{SHAPES[self.shape]}"
        return f"{self.size} {self.colour} {self.shape}"




@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")


@lru_cache(maxsize=None)
def _colour(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name][1])[:, None]


def _mask(shape: str, cx: float, cy: float, r: float, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        return ((xs - cx).abs() <= r) & ((ys - cy).abs() <= r)
    top = cy - r  # an upright triangle: width grows from the apex to the base
    return (ys >= top) & (ys <= cy + r) & ((xs - cx).abs() <= (ys - top) / 2)


class SyntheticCaptions(torch.utils.data.Dataset):
    """split "train" holds samples [0, train_size), "val" the next val_size: one stream, no overlap."""

    def __init__(self, split: str = "train", train_size: int = 2048, val_size: int = 256, image_size: int = 64,
                 seed: int = 0, language: str = "en", tokenizer: Callable[[list[str]], torch.Tensor] | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        if language not in ("en", "zh"):
            raise ValueError(f"language must be en or zh, got {language!r}")
        self.offset, self.size = (0, train_size) if split == "train" else (train_size, val_size)
        self.image_size, self.seed, self.language, self.tokenizer = image_size, seed, language, tokenizer

    def __len__(self) -> int:
        return self.size

    def _phrase_tokens(self, phrases: list[str]) -> torch.Tensor:
        """Token ids of each phrase (there are only 36 phrases: each is tokenized once)."""
        if not hasattr(self, "_phrase_cache"):
            self._phrase_cache: dict[str, torch.Tensor] = {}
        for p in phrases:
            if p not in self._phrase_cache:
                ids = self.tokenizer([p])[0]
                self._phrase_cache[p] = ids[: int((ids != 0).nonzero().max()) + 1]
        width = max((len(self._phrase_cache[p]) for p in phrases), default=0)
        out = torch.zeros(len(phrases), width, dtype=torch.long)
        for i, p in enumerate(phrases):
            out[i, : len(self._phrase_cache[p])] = self._phrase_cache[p]
        return out

    def _groups(self, rng: random.Random) -> list[Group]:
        groups: list[Group] = []
        for _ in range(rng.randint(1, 3)):
            g = Group(rng.choice(list(SHAPES)), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), 0)
            if all((g.shape, g.colour, g.size) != (h.shape, h.colour, h.size) for h in groups):
                groups.append(g)
        return groups

    def _place(self, rng: random.Random, r: float, boxes: list[list[float]], tries: int = 30) -> list[tuple]:
        """Positions for up to the wanted count of objects of radius r that overlap no box so far (with a
        1-pixel gap), so no object hides another: each object takes the first of `tries` random centres
        that fits; boxes grows with each one placed."""
        placed = []
        span = self.image_size - 1 - 2 * r
        for _ in range(rng.randint(1, 3)):
            for _ in range(tries):
                cx, cy = r + rng.random() * span, r + rng.random() * span
                box = [cx - r, cy - r, cx + r, cy + r]
                if all(box[2] + 1 < b[0] or b[2] + 1 < box[0] or box[3] + 1 < b[1] or b[3] + 1 < box[1] for b in boxes):
                    boxes.append(box)
                    placed.append((cx, cy, r))
                    break
        return placed

    def _layout(self, index: int) -> tuple[torch.Tensor, list[tuple[Group, list[tuple]]]]:
        """The background noise and the groups actually placed, with their objects' positions."""
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} of {self.size}")
        key = self.seed * 1_000_003 + self.offset + index  # sample index's own stream: no shared state
        rng = random.Random(key)
        n = self.image_size
        noise = 0.05 * torch.randn(3, n, n, generator=torch.Generator().manual_seed(key))
        boxes: list[list[float]] = []
        layout = []
        for g in self._groups(rng):
            placed = self._place(rng, SIZES[g.size][1] * n, boxes)
            if placed:  # the caption says what is visible
                layout.append((Group(g.shape, g.colour, g.size, len(placed)), placed))
        return noise, layout

    def caption(self, index: int) -> str:
        """Sample index's caption without drawing its image (for building a tokenizer's vocabulary)."""
        groups = [g for g, _ in self._layout(index)[1]]
        return "和".join(g.chinese() for g in groups) if self.language == "zh" else " and ".join(g.english() for g in groups)

    def __getitem__(self, index: int) -> dict:
        noise, layout = self._layout(index)
        n = self.image_size
        ys, xs = _grid(n)
        image = 0.9 + noise
        groups, boxes, phrases = [], [], []
        for g, placed in layout:
            groups.append(g)
            for cx, cy, r in placed:
                image[:, _mask(g.shape, cx, cy, r, ys, xs)] = _colour(g.colour)
                boxes.append([cx - r, cy - r, cx + r, cy + r])
                phrases.append(g.phrase(self.language))
        caption_en = " and ".join(g.english() for g in groups)
        caption_zh = "和".join(g.chinese() for g in groups)
        sample = {"image": image.clamp(0, 1), "caption": caption_zh if self.language == "zh" else caption_en,
                  "caption_en": caption_en, "caption_zh": caption_zh, "boxes": torch.tensor(boxes),
                  "phrases": phrases, "index": torch.tensor(self.offset + index)}
        if self.tokenizer is not None:
            ids = self.tokenizer([sample["caption"]])[0]
            sample["tokens"] = ids[: int((ids != 0).nonzero().max()) + 1]
            sample["box_phrases"] = self._phrase_tokens(phrases)
        return sample
