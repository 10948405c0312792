"""mgpu.data.images: the fast reader gives Pillow's image within a stated tolerance, in every mode, and names
what cannot be read."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from mgpu.data import images


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """Shapes with soft edges and grain: JPEG-like content with real high frequencies."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (120, 140, 160))
    draw = ImageDraw.Draw(img)
    for _ in range(30):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.2) * width
        draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / (a - b).pow(2).mean().item())


@pytest.mark.parametrize("size, out", [((640, 480), 224), ((1024, 768), 224), ((640, 480), 64), ((1024, 768), 64)])
def test_reduced_jpeg_decoding_stays_within_the_stated_tolerance_of_pillows_full_path(size, out):
    original = scene(*size)
    jpeg = encoded(original, "JPEG", quality=90)
    fast, dims = images.decode(io.BytesIO(jpeg), out)
    reference = images.reference(io.BytesIO(jpeg), out)
    assert fast.shape == (3, out, out) and fast.dtype == torch.float32 and dims == size
    assert 0 <= fast.min() and fast.max() <= 1
    # the tolerance (docs/data.md): a mean difference under 1.5 grey levels and a PSNR above 40 dB
    assert (fast - reference).abs().mean().item() * 255 < 1.5 and psnr(fast, reference) > 40
    if out == 224:  # the trainer's size: closer to Pillow's full path than JPEG q90 is to the lossless original
        lossless = images.reference(io.BytesIO(encoded(original, "PNG")), out)
        assert psnr(fast, reference) > psnr(reference, lossless)


@pytest.mark.parametrize("size, out", [((48, 40), 224), ((640, 480), 224), ((33, 17), 32), ((300, 200), 64)])
def test_without_reduced_decoding_the_resize_is_pillows_within_two_grey_levels(size, out):
    png = io.BytesIO(encoded(scene(*size), "PNG"))  # draft() does nothing for PNG: only the resize differs
    fast, _ = images.decode(png, out)
    png.seek(0)
    assert (fast - images.reference(png, out)).abs().max().item() * 255 <= 2.0 + 1e-4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_every_mode_becomes_three_channels(mode):
    img = scene(80, 60).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    fast, dims = images.decode(io.BytesIO(encoded(img, fmt)), 32)
    assert fast.shape == (3, 32, 32) and dims == (80, 60)


def test_problems_are_named_and_a_truncated_file_is_found_only_by_decoding(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image\n")
    whole = encoded(scene(640, 480), "JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "good.jpg").write_bytes(whole)
    assert images.problem(tmp_path / "nope.jpg", decode_pixels=False) == "missing"
    assert images.problem(tmp_path / "text.jpg", decode_pixels=False) == "unreadable: UnidentifiedImageError"
    assert images.problem(tmp_path / "cut.jpg", decode_pixels=False) is None
    assert images.problem(tmp_path / "cut.jpg", decode_pixels=True) == "unreadable: OSError"
    assert images.problem(tmp_path / "good.jpg", decode_pixels=True) is None
    with pytest.raises(OSError):
        images.decode(tmp_path / "cut.jpg", 64)
    assert images.describe(FileNotFoundError()) == "missing"
