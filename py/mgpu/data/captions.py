"""Real image-caption data: CSV/TSV in open_clip's layout, or JSONL, with images read through Pillow.

    --data train.csv --csv-img-key filepath --csv-caption-key title --csv-separator ,
    --data train.tsv                      (separator: a tab)
    --data train.jsonl                    (one {"filepath": ..., "title": ...} object a line; same keys)

Image paths are relative to the data file's folder unless absolute. Every image is converted to RGB and
resized to image_size x image_size (bicubic, antialiased; see mgpu.data.images), values in [0, 1]; boxes are
scaled with it.

What a row whose image is missing or unreadable gives is the set's ``on_bad`` policy: in training the next
readable row takes its place (so every batch keeps its size, which DDP's all-gather needs) and the sample says
what it skipped, for the trainer to count, warn about, and stop past its ``--max-bad-images`` fraction; at
inference the row stays in place, marked invalid (never another image's result). mgpu.data.checks looks at
the images before training starts.

``--box-file`` (JSON boxes for the region loss) attaches boxes: an object mapping an image path (as written in the
data file, or its base name) to a list of boxes, each ``[x1, y1, x2, y2]`` in the original image's
pixels, or ``{"box": [x1, y1, x2, y2], "phrase": "a red car"}``; a list of ``{"image": path, "boxes":
[...]}`` records is read the same way. Images without an entry have no boxes; a box without a phrase is
paired with its image's caption by the region loss.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import torch

from . import images


class DataError(ValueError):
    """A data file, column or box file that cannot be used; the message names it."""


def _read_rows(path: Path, img_key: str, caption_key: str, separator: str | None) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DataError(f"--data {path}: no such file (give a .csv, .tsv or .jsonl file, .tar shards, or 'synthetic')")
    rows: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"--data {path}: line {number} is not JSON ({exc.msg})") from None
                if not isinstance(record, dict) or img_key not in record or caption_key not in record:
                    raise DataError(f"--data {path}: line {number} lacks {img_key!r} or {caption_key!r} "
                                    f"(set them with --csv-img-key / --csv-caption-key)")
                rows.append((str(record[img_key]), str(record[caption_key])))
    elif path.suffix in (".csv", ".tsv"):
        sep = separator if separator is not None else ("\t" if path.suffix == ".tsv" else ",")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter=sep)
            header = reader.fieldnames or []
            missing = [k for k in (img_key, caption_key) if k not in header]
            if missing:
                raise DataError(f"--data {path}: no column {', '.join(map(repr, missing))}; the columns are "
                                f"{header} (separator {sep!r}; set --csv-img-key, --csv-caption-key, --csv-separator)")
            rows = [(r[img_key], r[caption_key]) for r in reader]
    else:
        raise DataError(f"--data {path}: unknown format {path.suffix!r}; allowed: .csv, .tsv, .jsonl, .tar shards "
                        f"(a folder, a glob or {{000000..000009}} braces) or 'synthetic'")
    if not rows:
        raise DataError(f"--data {path}: no samples in it")
    return rows


def _parse_box(value, where: str) -> tuple[list[float], str | None]:
    box, phrase = (value.get("box"), value.get("phrase")) if isinstance(value, dict) else (value, None)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise DataError(f"{where}: a box must be [x1, y1, x2, y2] or {{\"box\": [...], \"phrase\": ...}}, got {value!r}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise DataError(f"{where}: box {box} has x2 <= x1 or y2 <= y1")
    return [float(v) for v in box], phrase


def read_box_file(path: str | Path) -> dict[str, list[tuple[list[float], str | None]]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--box-file {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"--box-file {path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(data, list):
        try:
            data = {str(r.get("image", r.get("filepath"))): r["boxes"] for r in data}
        except (AttributeError, KeyError):
            raise DataError(f"--box-file {path}: a list must hold {{\"image\": path, \"boxes\": [...]}} records") from None
    if not isinstance(data, dict):
        raise DataError(f"--box-file {path}: must be an object mapping image paths to boxes, or a list of records")
    out = {}
    for image, boxes in data.items():
        if not isinstance(boxes, list):
            raise DataError(f"--box-file {path}: {image!r}: boxes must be a list, got {type(boxes).__name__}")
        out[image] = [_parse_box(b, f"--box-file {path}: {image!r}[{i}]") for i, b in enumerate(boxes)]
    return out


def load_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, size, size) float tensor in [0, 1] and the original (width, height); see mgpu.data.images."""
    return images.decode(path, size)


def boxes_for(table: dict, name: str, original: tuple[int, int], caption: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """The boxes of image `name` (looked up as written, then by its base name), scaled to size x size pixels,
    and their phrases (the caption for a box without one)."""
    entry = table.get(name, table.get(Path(name).name, []))
    sx, sy = size / original[0], size / original[1]
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b, _ in entry]
    return torch.tensor(boxes).reshape(-1, 4), [p or caption for _, p in entry]


def add_tokens(sample: dict, tokenizer: Callable[[list[str]], torch.Tensor] | None) -> dict:
    """Adds ``tokens`` (the caption's ids without padding) and ``box_phrases`` when there is a tokenizer."""
    if tokenizer is not None:
        ids = tokenizer([sample["caption"]])[0]
        sample["tokens"] = ids[: int((ids != 0).nonzero().max()) + 1]
        if sample["phrases"]:
            sample["box_phrases"] = tokenizer(sample["phrases"])
    return sample


def blank_sample(index: int, size: int, caption: str, problem: str) -> dict:
    """What the "mark" policy returns for an image that cannot be read: a black image marked invalid."""
    return {"image": torch.zeros(3, size, size), "caption": caption, "boxes": torch.zeros(0, 4), "phrases": [],
            "skipped": [], "index": torch.tensor(index), "valid": torch.tensor(False), "problem": problem}


ON_BAD = ("substitute", "mark", "raise")


class CaptionFile(torch.utils.data.Dataset):
    """The rows of a caption file. ``on_bad`` says what a row whose image cannot be read gives:
    "substitute" the next readable row (training: batches keep their size), "mark" a black image with
    ``valid`` False and ``problem`` saying why (inference: the row is kept in place and left out of
    metrics), "raise" a DataError (a validation split checked before training)."""

    def __init__(self, path: str | Path, image_size: int, *, img_key: str = "filepath", caption_key: str = "title",
                 separator: str | None = None, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                 box_file: str | Path | None = None, rows: list[tuple[str, str]] | None = None,
                 on_bad: str = "substitute"):
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
        self.path = Path(path)
        self.rows = rows if rows is not None else _read_rows(self.path, img_key, caption_key, separator)
        self.row_ids = list(range(len(self.rows)))  # each row's position in the file (0: the first data row)
        self.root = self.path.parent
        self.image_size, self.tokenizer, self.on_bad = image_size, tokenizer, on_bad
        self.boxes = read_box_file(box_file) if box_file else {}

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: list[int], on_bad: str | None = None) -> "CaptionFile":
        """These rows (positions in this set), in this order; the rest of the set's settings kept."""
        part = CaptionFile.__new__(CaptionFile)
        part.__dict__.update(self.__dict__)
        part.rows = [self.rows[i] for i in indices]
        part.row_ids = [self.row_ids[i] for i in indices]
        part.on_bad = on_bad or self.on_bad
        return part

    def split(self, val_fraction: float, seed: int) -> tuple["CaptionFile", "CaptionFile"]:
        """A train/val split of the rows, the same on every rank (a fixed permutation of seed)."""
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(order) * val_fraction)) if len(order) > 1 else 0
        return self.subset(sorted(order[n_val:])), self.subset(sorted(order[:n_val]))

    def image_path(self, index: int) -> Path:
        name = self.rows[index][0]
        return Path(name) if Path(name).is_absolute() else self.root / name

    def row_info(self, index: int) -> tuple[int, str]:
        """(the row's position in the data file, its image as written there): to join results back."""
        return self.row_ids[index], self.rows[index][0]

    def problem(self, index: int, decode_pixels: bool) -> str | None:
        """None if row index's image can be read, else why not (see mgpu.data.images.problem)."""
        return images.problem(self.image_path(index), decode_pixels=decode_pixels)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(len(self.rows) if self.on_bad == "substitute" else 1):
            row = (index + attempt) % len(self.rows)
            name, caption = self.rows[row]
            path = self.image_path(row)
            try:
                image, original = load_image(path, self.image_size)
                break
            except Exception as exc:  # Pillow raises several types for truncated or non-image files
                problem = images.describe(exc)
                if self.on_bad == "raise":
                    raise DataError(f"--data {self.path}: row {self.row_ids[row]}: image {path} is {problem} "
                                    f"(it could be read when the run started)") from None
                if self.on_bad == "mark":
                    return add_tokens(blank_sample(index, self.image_size, caption, problem), self.tokenizer)
                skipped.append((str(path), problem))
        else:
            raise DataError(f"--data {self.path}: none of its {len(self.rows)} images can be read")
        boxes, phrases = boxes_for(self.boxes, name, original, caption, self.image_size)
        sample = {"image": image, "caption": caption, "boxes": boxes, "phrases": phrases, "skipped": skipped,
                  "index": torch.tensor(index)}  # the slot, even when filled by a later image
        if self.on_bad == "mark":
            sample.update(valid=torch.tensor(True), problem="")
        return add_tokens(sample, self.tokenizer)
