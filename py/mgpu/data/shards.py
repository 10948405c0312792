"""Sharded tar data in the webdataset layout: each ``.tar`` shard holds samples as consecutive members that share
a key, ``000123.jpg`` (or .jpeg, .png, .webp) and ``000123.txt`` (the caption, UTF-8); the key is the member's
path up to the first dot of its file name, as webdataset defines it. Other members (``.json``, ``.cls``) are
ignored.

    --data 'shards/{000000..000009}.tar'     brace ranges (zero-padded as written) and {a,b} lists
    --data shards/                            every .tar file in the folder, in name order
    --data 'shards/train-*.tar'               a glob, in name order

How many samples each shard holds comes from ``sizes.json`` beside the shards when it lists them (open_clip's
file: ``{"000000.tar": 10000, ...}``; ``python -m mgpu.data.shards SPEC --write-sizes`` writes it), else from
reading every shard's member headers once at start (no image is read; under DDP each rank reads a part).

``TarSamples`` is the map-style view (validation, inference): sample i is found through the headers of its
shard, read lazily, and reads only its own members. Training streams the shards instead (mgpu.data.stream).
This reader is ~250 lines on Python's ``tarfile`` rather than the webdataset package: the trainer needs every
rank to see the same number of batches, and an exact, documented resume, which webdataset leaves to the user
(webdataset/webdataset#194, #225, #188), and it adds no dependency.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import io
import json
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import images
from .captions import DataError, add_tokens, blank_sample, boxes_for, ON_BAD
from .checks import sum_over_ranks

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def _braces(spec: str) -> list[str]:
    """Expands the first {a..b} range or {x,y} list in spec, recursively; ranges keep the zero-padding of a."""
    found = [m for m in (_RANGE.search(spec), _LIST.search(spec)) if m]
    if not found:
        return [spec]
    m = min(found, key=lambda m: m.start())
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise DataError(f"--data {spec}: the range {m.group(0)} runs backwards")
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = m.group(1).split(",")
    return [out for item in items for out in _braces(spec[:m.start()] + item + spec[m.end():])]


def is_shards(spec: str) -> bool:
    """Whether a --data value names tar shards (rather than 'synthetic' or a caption file)."""
    return spec.endswith(".tar") or Path(spec).is_dir()


def expand(spec: str) -> list[Path]:
    """The shard files a --data value names, in order; a clear error for anything missing."""
    if Path(spec).is_dir():
        paths = sorted(Path(spec).glob("*.tar"))
        if not paths:
            raise DataError(f"--data {spec}: the folder holds no .tar shard")
        return paths
    paths: list[Path] = []
    for item in _braces(spec):
        if any(c in item for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item))
            if not matched:
                raise DataError(f"--data {spec}: {item} matches no file")
            paths += matched
        elif not Path(item).is_file():
            raise DataError(f"--data {spec}: no such shard {item}")
        else:
            paths.append(Path(item))
    return paths


_NAME = re.compile(r"((?:.*/)?[^./]+)\.([^/]*)")


def _split(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by webdataset's rule (the key ends at the first dot of the file
    name), or None for a name without one."""
    m = _NAME.fullmatch(name)
    return (m.group(1), m.group(2).lower()) if m else None


@dataclass(frozen=True)
class Record:
    """One sample of a shard: its key and, per extension, where its bytes are (offset, size)."""
    shard: Path
    key: str
    members: dict[str, tuple[int, int]]

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)

    def problem(self) -> str | None:
        """What makes the sample unusable before reading it: a missing image or caption member."""
        if self.image_ext is None:
            return "no image member (.jpg, .jpeg, .png or .webp)"
        return None if CAPTION_EXT in self.members else "no caption member (.txt)"

    def read(self, ext: str) -> bytes:
        offset, size = self.members[ext]
        with open(self.shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shard}: member {self.key}.{ext} is cut short")
        return data


def scan(path: Path) -> Iterator[Record]:
    """The samples of one shard, from its member headers alone (tarfile seeks over the data)."""
    try:
        with tarfile.open(path, "r:") as tar:
            key, members = None, {}
            for info in tar:
                split = _split(info.name) if info.isfile() else None
                if split is None:
                    continue
                if split[0] != key and members:
                    yield Record(path, key, members)
                    members = {}
                key = split[0]
                members[split[1]] = (info.offset_data, info.size)
            if members:
                yield Record(path, key, members)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"--data: {path}: not a readable tar file ({exc})") from None


def sizes(paths: list[Path]) -> list[int]:
    """Samples per shard: sizes.json where it lists a shard, else counted from its headers (DDP ranks share
    the counting)."""
    listed: dict[Path, dict] = {}
    counts: list[float] = []
    todo = []
    for i, path in enumerate(paths):
        folder = path.parent
        if folder not in listed:
            file = folder / "sizes.json"
            try:
                listed[folder] = json.loads(file.read_text()) if file.is_file() else {}
            except (OSError, json.JSONDecodeError) as exc:
                raise DataError(f"--data: {file}: not a JSON object of shard sizes ({exc})") from None
        value = listed[folder].get(path.name)
        counts.append(float(value) if isinstance(value, int) and value >= 0 else 0.0)
        if value is None:
            todo.append(i)
    from .. import distributed

    for i in todo[distributed.rank()::distributed.world_size()]:
        counts[i] = float(sum(1 for _ in scan(paths[i])))
    if todo:  # every rank added its own shards to zeros elsewhere
        summed = sum_over_ranks([counts[i] for i in todo])
        for i, value in zip(todo, summed):
            counts[i] = value
    return [int(c) for c in counts]


class TarSamples(torch.utils.data.Dataset):
    """Every sample of the shards, by position (map-style). ``on_bad`` as for CaptionFile."""

    def __init__(self, spec: str, image_size: int, *, paths: list[Path] | None = None,
                 tokenizer: Callable | None = None, boxes: dict | None = None, on_bad: str = "substitute"):
        """spec: the --data value (named in messages); paths: its shards, if not all of expand(spec)."""
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {', '.join(ON_BAD)}, got {on_bad!r}")
        self.spec = spec
        self.paths = list(paths) if paths is not None else expand(spec)
        self.counts = sizes(self.paths)
        self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        self.positions = list(range(sum(self.counts)))  # this set's samples among all the shards' samples
        self.image_size, self.tokenizer, self.boxes, self.on_bad = image_size, tokenizer, boxes or {}, on_bad
        self._records: dict[int, list[Record]] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def record(self, index: int) -> Record:
        position = self.positions[index]
        shard = bisect.bisect_right(self.starts, position) - 1  # past empty shards, which share its start
        if shard not in self._records:
            self._records[shard] = list(scan(self.paths[shard]))
            if len(self._records[shard]) != self.counts[shard]:
                raise DataError(f"--data {self.spec}: {self.paths[shard]} holds {len(self._records[shard])} samples, "
                                f"its sizes.json says {self.counts[shard]}: rewrite it (--write-sizes)")
        return self._records[shard][position - self.starts[shard]]

    def subset(self, indices: list[int], on_bad: str | None = None) -> "TarSamples":
        part = TarSamples.__new__(TarSamples)
        part.__dict__.update(self.__dict__)
        part.positions = [self.positions[i] for i in indices]
        part.on_bad = on_bad or self.on_bad
        return part

    def image_path(self, index: int) -> str:
        r = self.record(index)
        return f"{r.shard}:{r.key}.{r.image_ext or '?'}"

    def row_info(self, index: int) -> tuple[str, str]:
        r = self.record(index)
        return f"{r.shard.name}:{r.key}", f"{r.key}.{r.image_ext or '?'}"

    def caption(self, index: int) -> str:
        r = self.record(index)
        return r.read(CAPTION_EXT).decode("utf-8").strip() if CAPTION_EXT in r.members else ""

    def problem(self, index: int, decode_pixels: bool) -> str | None:
        r = self.record(index)
        if r.problem():
            return r.problem()
        try:
            data = r.read(r.image_ext)
        except OSError as exc:
            return f"unreadable: {exc}"
        return images.problem(io.BytesIO(data), decode_pixels=decode_pixels)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(len(self) if self.on_bad == "substitute" else 1):
            i = (index + attempt) % len(self)
            sample, problem = read_sample(self.record(i), self.image_size, self.boxes)
            if problem is None:
                break
            if self.on_bad == "raise":
                raise DataError(f"--data {self.spec}: {self.image_path(i)} is {problem} (it could be read when the "
                                f"run started)")
            if self.on_bad == "mark":
                return add_tokens(blank_sample(index, self.image_size, sample["caption"], problem), self.tokenizer)
            skipped.append((self.image_path(i), problem))
        else:
            raise DataError(f"--data {self.spec}: none of its {len(self)} samples can be read")
        sample.update(skipped=skipped, index=torch.tensor(index))
        if self.on_bad == "mark":
            sample.update(valid=torch.tensor(True), problem="")
        return add_tokens(sample, self.tokenizer)


def read_sample(record: Record, size: int, boxes: dict) -> tuple[dict, str | None]:
    """(sample without tokens, None) or ({"caption": what could be read}, why the sample cannot be used)."""
    problem = record.problem()
    caption = ""
    try:
        if CAPTION_EXT in record.members:
            caption = record.read(CAPTION_EXT).decode("utf-8").strip()
        if problem:
            return {"caption": caption}, problem
        image, original = images.decode(io.BytesIO(record.read(record.image_ext)), size)
    except UnicodeDecodeError:
        return {"caption": ""}, "caption not UTF-8"
    except Exception as exc:  # Pillow raises several types for truncated or non-image data
        return {"caption": caption}, images.describe(exc)
    name = f"{record.key}.{record.image_ext}"
    box, phrases = boxes_for(boxes, name, original, caption, size)
    return {"image": image, "caption": caption, "boxes": box, "phrases": phrases}, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgpu.data.shards",
                                description="Count the samples of tar shards (and write sizes.json beside them).")
    p.add_argument("spec", help="shards: a folder, a glob, or braces such as 'shards/{000000..000009}.tar'")
    p.add_argument("--write-sizes", action="store_true", help="write sizes.json in the shards' folder (default: no)")
    args = p.parse_args(argv)
    try:
        paths = expand(args.spec)
        counts = [sum(1 for _ in scan(path)) for path in paths]
    except DataError as exc:
        print(f"mgpu.data.shards: error: {exc}", file=sys.stderr)
        return 2
    for path, n in zip(paths, counts):
        print(f"{n}\t{path}")
    print(f"{sum(counts)}\tsamples in {len(paths)} shard(s)")
    if args.write_sizes:
        for folder in sorted({path.parent for path in paths}):
            file = folder / "sizes.json"
            old = json.loads(file.read_text()) if file.is_file() else {}
            old.update({path.name: n for path, n in zip(paths, counts) if path.parent == folder})
            file.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
            print(f"wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
