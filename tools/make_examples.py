#!/usr/bin/env python3
"""Makes examples/data/: a tiny real image-caption dataset for the README's examples.

    python tools/make_examples.py              # (re)writes examples/data/
    python tools/make_examples.py --out DIR    # somewhere else (the tests compare the two)

64 small images (PNG and JPEG, 80-128 pixels a side, sizes differ so that resizing and box scaling are
exercised) of one or two coloured shapes, with an English and a Chinese caption each, and a box per shape
with its phrase:

    images/000.png ... images/063.jpg
    train.csv, test.csv     filepath,title,title_zh   (48 and 16 rows; open_clip's layout, paths relative
                            to the file: --data examples/data/train.csv [--csv-caption-key title_zh])
    boxes.json, boxes_zh.json
                            {"images/000.png": [{"box": [x1, y1, x2, y2], "phrase": "a red circle"}, ...]}
                            in the original image's pixels (--box-file, for --loss-region)

Everything is drawn from random.Random(index), so a run writes the same captions, boxes and pixels every
time (JPEG and PNG bytes may differ between Pillow versions; the pixels do not, beyond JPEG noise).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COUNT, TRAIN = 64, 48
SIZES = ((96, 96), (128, 96), (96, 128), (112, 80), (80, 112))
COLOURS = {  # name: (English, Chinese, RGB)
    "red": ("red", "红色", (220, 40, 40)),
    "green": ("green", "绿色", (40, 170, 60)),
    "blue": ("blue", "蓝色", (40, 80, 220)),
    "yellow": ("yellow", "黄色", (235, 200, 30)),
    "purple": ("purple", "紫色", (140, 60, 180)),
    "orange": ("orange", "橙色", (245, 130, 20)),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
BACKGROUNDS = ((245, 245, 240), (230, 235, 245), (240, 230, 220), (225, 240, 225))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=rgb)
    else:
        draw.polygon(((x1 + x2) / 2, y1, x2 - 1, y2 - 1, x1, y2 - 1), fill=rgb)


def _place(rng: random.Random, area: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A square box inside area (x1, y1, x2, y2), at least 20 pixels a side."""
    ax1, ay1, ax2, ay2 = area
    side = rng.randint(20, max(20, min(ax2 - ax1, ay2 - ay1) - 4))
    x = rng.randint(ax1, ax2 - side)
    y = rng.randint(ay1, ay2 - side)
    return x, y, x + side, y + side


def make_sample(index: int) -> tuple[Image.Image, str, str, list[dict], list[dict]]:
    """(image, English caption, Chinese caption, boxes with English phrases, boxes with Chinese phrases)."""
    rng = random.Random(index)
    width, height = SIZES[index % len(SIZES)]
    image = Image.new("RGB", (width, height), BACKGROUNDS[rng.randrange(len(BACKGROUNDS))])
    draw = ImageDraw.Draw(image)
    count = 1 if index % 4 == 0 else 2
    if count == 1:
        areas = [(4, 4, width - 4, height - 4)]
    elif width >= height:  # side by side: the first is left of the second
        areas = [(4, 4, width // 2 - 2, height - 4), (width // 2 + 2, 4, width - 4, height - 4)]
    else:  # one above the other
        areas = [(4, 4, width - 4, height // 2 - 2), (4, height // 2 + 2, width - 4, height - 4)]
    colours = rng.sample(sorted(COLOURS), count)
    objects = []
    for area, colour in zip(areas, colours):
        shape = rng.choice(sorted(SHAPES))
        box = _place(rng, area)
        english, chinese, rgb = COLOURS[colour]
        _draw(draw, shape, box, rgb)
        article = "an" if english[0] in "aeiou" else "a"
        objects.append((box, f"{article} {english} {shape}", f"{chinese}的{SHAPES[shape]}"))
    if count == 1:
        title, title_zh = objects[0][1], "一个" + objects[0][2]
    elif width >= height:
        title, title_zh = f"{objects[0][1]} left of {objects[1][1]}", f"{objects[0][2]}在{objects[1][2]}左边"
    else:
        title, title_zh = f"{objects[0][1]} above {objects[1][1]}", f"{objects[0][2]}在{objects[1][2]}上方"
    boxes = [{"box": list(box), "phrase": phrase} for box, phrase, _ in objects]
    boxes_zh = [{"box": list(box), "phrase": phrase} for box, _, phrase in objects]
    return image, title, title_zh, boxes, boxes_zh


def write(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, boxes, boxes_zh = [], {}, {}
    for index in range(COUNT):
        image, title, title_zh, own, own_zh = make_sample(index)
        name = f"images/{index:03d}." + ("png" if index % 2 == 0 else "jpg")
        if name.endswith(".png"):
            image.save(out / name, optimize=True)
        else:
            image.save(out / name, quality=90)
        rows.append((name, title, title_zh))
        boxes[name], boxes_zh[name] = own, own_zh
    for file, part in (("train.csv", rows[:TRAIN]), ("test.csv", rows[TRAIN:])):
        with open(out / file, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("filepath", "title", "title_zh"))
            writer.writerows(part)
    for file, table in (("boxes.json", boxes), ("boxes_zh.json", boxes_zh)):
        text = "{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in table.items())
        (out / file).write_text(text + "\n}\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "examples" / "data",
                        help="the folder to write (default: examples/data of this checkout)")
    write(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
