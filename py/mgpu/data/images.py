"""Reading one image into the tensor the models take: (3, size, size) float32 in [0, 1], squashed to a square
(the aspect ratio is not kept), bicubic with antialiasing.

The reference is Pillow's ``Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)``; two steps make
the same image faster (``bench/data_pipeline.py`` measures both, and the difference):

- JPEG files are decoded at a reduced scale (Pillow's ``draft``: libjpeg scales by 1/2, 1/4 or 1/8 inside the
  DCT) when the reduced image is still at least ``size`` pixels on both sides, so the final resize always
  shrinks. This is the one step that changes pixel values: a 640x480 JPEG read for 224 px differs from the
  reference by about 1/255 on average (up to ~27/255 on single pixels at sharp edges), less than JPEG quality 90
  differs from the original; the tests hold it to a mean under 1.5/255 and a PSNR above 40 dB.
- The resize runs in torch on uint8 (``interpolate(mode="bicubic", antialias=True)``, Pillow's filter with
  a = -0.5 and the same support): within one grey level of Pillow's resize, about 5x faster.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F


def decode(source: str | Path | BinaryIO, size: int, *, reduced: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, size, size) float tensor in [0, 1] and the image's original (width, height).

    reduced=False decodes every pixel (the reference path, for comparisons). Raises what Pillow raises for a
    missing, truncated or non-image file (FileNotFoundError, PIL.UnidentifiedImageError, OSError, ...)."""
    from PIL import Image

    with Image.open(source) as img:
        original = img.size
        if reduced:
            img.draft("RGB", (size, size))  # JPEG only; a no-op for other formats
        if img.mode != "RGB":
            img = img.convert("RGB")
        pixels = torch.from_numpy(np.array(img))  # (H, W, 3) uint8; np.array decodes and copies once
    image = pixels.permute(2, 0, 1).unsqueeze(0)  # a channels-last view: torch's fast uint8 path
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return image[0].float().div_(255).contiguous(), original


def reference(source: str | Path | BinaryIO, size: int) -> torch.Tensor:
    """Pillow's plain path (full decode, Pillow's resize), as a tensor: what ``decode`` is compared with."""
    from PIL import Image

    with Image.open(source) as img:
        img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(img))
    return pixels.permute(2, 0, 1).float().div_(255).contiguous()


def problem(source: str | Path | BinaryIO, *, decode_pixels: bool) -> str | None:
    """None if the image can be read, else why not ("missing", "unreadable: <error>").

    decode_pixels=False reads only the header (finds missing files and files that are not images, about
    0.05 ms each); True also decodes the pixels at the smallest scale (finds truncated files too)."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            if decode_pixels:
                img.draft(img.mode, (1, 1))
                img.load()
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # Pillow raises several types for truncated or non-image files
        return f"unreadable: {type(exc).__name__}"
    return None


def describe(exc: BaseException) -> str:
    """The reason ``problem`` would give for an exception raised by ``decode``."""
    return "missing" if isinstance(exc, FileNotFoundError) else f"unreadable: {type(exc).__name__}"
