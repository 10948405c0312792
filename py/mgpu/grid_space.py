"""The value space of a sweep (mgpu.grid): what a key may hold (a value, a list, a range), drawing random
points, and the text of values in flags and names. No torch import."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re

NAME_MAX = 120
RESERVED = ("output_dir", "output-dir", "image_encoder", "image-encoder", "text_encoder", "text-encoder")
RANGES = ("log_uniform", "uniform", "int_uniform")
SHORT = {"batch_size": "bs", "lr": "lr", "learning_rate": "lr", "weight_decay": "wd", "epochs": "ep",
         "max_steps": "steps", "warmup": "wu", "embed_dim": "dim", "image_size": "img", "accum_steps": "acc",
         "grad_clip": "clip", "seed": "seed", "image_encoder": "", "text_encoder": ""}


class GridError(ValueError):
    """A fault in the sweep's definition; the message starts with the JSON path."""


def fmt(value) -> str:
    """A value as its flag text: 0.0003 -> 3e-4, 64 -> 64, 1e-05 -> 1e-5 (short and exact enough for names)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        exponent = math.floor(math.log10(abs(value)))
        if abs(value) < 1e-2 or abs(value) >= 1e6:
            mantissa = float(f"{value / 10 ** exponent:.6g}")
            mantissa_text = str(int(mantissa)) if mantissa.is_integer() else repr(mantissa)
            return f"{mantissa_text}e{exponent}"
        return f"{value:.10g}"
    return str(value)


def safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text)
    while name.startswith("."):
        name = "_" + name[1:]
    if len(name) > NAME_MAX:
        name = name[:NAME_MAX - 9] + "_" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name or "_"


def fail(path: str, what: str):
    raise GridError(f"{path}: {what}")


def scalar_ok(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def check_value(value, path: str) -> None:
    if isinstance(value, str) and re.search(r"[\n\r\x00]", value):
        fail(path, "must not contain a newline")
    if isinstance(value, float) and not math.isfinite(value):
        fail(path, "must be a finite number")


def choices(key: str, value, path: str) -> tuple[list, dict | None]:
    """The values a key takes (a list, or one value), or its range {kind: [lo, hi]}."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", key):
        fail(path, "is not a usable option name (letters, digits, _ . -)")
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in RANGES:
            fail(path, f"must be a value, a list of values, or a range like {{\"log_uniform\": [1e-5, 1e-3]}} "
                        f"(one of {', '.join(RANGES)}), got {json.dumps(value)}")
        kind, bounds = next(iter(value.items()))
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and
                                                                      not isinstance(b, bool) for b in bounds)):
            fail(f"{path}.{kind}", f"must be [low, high], two numbers, got {json.dumps(bounds)}")
        low, high = bounds
        if not low < high or (kind == "log_uniform" and low <= 0) or (kind == "int_uniform" and
                                                                    not all(float(b).is_integer() for b in bounds)):
            fail(f"{path}.{kind}", f"needs low < high{', both above 0' if kind == 'log_uniform' else ''}"
                                    f"{', both integers' if kind == 'int_uniform' else ''}, got {json.dumps(bounds)}")
        return [], {kind: bounds}
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        fail(path, "is an empty list: give at least one value")
    for i, v in enumerate(values):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if not scalar_ok(v):
            fail(where, f"must be a string, number, true, false or null, got {type(v).__name__}")
        check_value(v, where)
    return values, None


def dimension(key: str, value, path: str, own: bool) -> tuple[str, list, dict | None, str]:
    """One key of a configuration: its values (or range) and JSON path. `own`: a configuration's own encoder."""
    if key in RESERVED and not own:
        what = ("each configuration's output folder (under CKPT_DIR, --ckpt-dir)" if "output" in key
                else "the encoders from image_encoders/text_encoders or a configuration's image_encoder/text_encoder")
        fail(path, f"is reserved: the launcher sets {what}")
    values, span = choices(key, value, path)
    if own and (span is not None or not all(isinstance(v, str) and v for v in values)):
        fail(path, f"must be a non-empty string (or a list of them), got {json.dumps(value)}")
    return key, values, span, path


def draw(rng: random.Random, values: list, span: dict | None):
    if span is None:
        return values[int(rng.random() * len(values))]
    kind, (low, high) = next(iter(span.items()))
    if kind == "log_uniform":
        x = math.exp(math.log(low) + rng.random() * (math.log(high) - math.log(low)))
    elif kind == "uniform":
        x = low + rng.random() * (high - low)
    else:
        return int(low) + int(rng.random() * (int(high) - int(low) + 1))
    return float(f"{x:.3g}")  # three significant digits: the flag, the name and the record agree


def points(dims: list, sample: int | None, rng: random.Random, path: str) -> list[dict]:
    """Each point: key -> value. The cross product, or `sample` random points of it."""
    keys = [d[0] for d in dims]
    ranged = [d[3] for d in dims if d[2] is not None]
    if ranged and sample is None:
        fail(ranged[0], "is a range: give --sample N (random search) to draw values from it")
    if sample is None:
        return [dict(zip(keys, combo)) for combo in itertools.product(*(d[1] for d in dims))]
    if not ranged:
        grid = list(itertools.product(*(d[1] for d in dims)))
        order = sorted(range(len(grid)), key=lambda _: rng.random())[:sample]
        return [dict(zip(keys, grid[i])) for i in sorted(order)]
    return [{key: draw(rng, values, span) for key, values, span, _ in dims} for _ in range(sample)]


def label(key: str, value) -> str:
    short = SHORT.get(key, re.sub(r"[^A-Za-z0-9]", "", key))
    if value is True:
        return short or key
    if value is False or value is None:
        return f"no{short or key}"
    return f"{short}{fmt(value)}"
