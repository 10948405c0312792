"""examples/: the committed dataset is what tools/make_examples.py makes, and the trainer reads it (captions,
Chinese captions, boxes with phrases)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mgpu.data.captions import CaptionFile, read_box_file

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_the_committed_dataset_is_what_the_script_makes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_examples.py"), "--out", str(tmp_path)], check=True)
    assert _files(tmp_path) == _files(DATA)
    for name in _files(DATA):
        if name.endswith((".csv", ".json")):
            assert (tmp_path / name).read_text(encoding="utf-8") == (DATA / name).read_text(encoding="utf-8"), name
        else:  # encoded bytes may differ between Pillow versions; the pixels may not (beyond JPEG noise)
            made, committed = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (tmp_path / name, DATA / name))
            assert made.shape == committed.shape, name
            assert np.abs(made - committed).mean() < 1.0, name


def test_the_dataset_reads_as_the_trainer_reads_it():
    train, test = (list(csv.DictReader(open(DATA / f, encoding="utf-8"))) for f in ("train.csv", "test.csv"))
    assert (len(train), len(test)) == (48, 16)
    rows = train + test
    assert {Path(r["filepath"]).suffix for r in rows} == {".png", ".jpg"}
    assert all(r["title"].isascii() and not r["title_zh"].isascii() for r in rows)
    boxes, boxes_zh = read_box_file(DATA / "boxes.json"), read_box_file(DATA / "boxes_zh.json")
    assert set(boxes) == set(boxes_zh) == {r["filepath"] for r in rows}
    for row in rows:
        width, height = Image.open(DATA / row["filepath"]).size
        for (box, phrase), (box_zh, phrase_zh) in zip(boxes[row["filepath"]], boxes_zh[row["filepath"]]):
            assert box == box_zh and 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
            assert phrase in row["title"] and phrase_zh in row["title_zh"]
    sample = CaptionFile(DATA / "train.csv", 64, caption_key="title_zh", box_file=DATA / "boxes_zh.json")[1]
    assert sample["image"].shape == (3, 64, 64)
    assert len(sample["boxes"]) == 2 and all(not p.isascii() for p in sample["phrases"])
