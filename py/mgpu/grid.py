"""The configurations of a sweep (run_train_clip.sh): from the image x text encoder lists or a JSON config
file, with hyper-parameter grids and random search, printed as lines the launcher reads.

    python -m mgpu.grid --config-file sweep.json [--sample N --seed S] [--check-trainer] [-- ARGS]
    python -m mgpu.grid --image-encoders starnet_s1,starnet_s2 --text-encoders clip:ViT-B/32 [-- ARGS]

A config file is a grid ``{"image_encoders": [...], "text_encoders": [...], "args": {...}}`` or a list
``{"defaults": {...}, "configs": [{"name"?, "image_encoder", "text_encoder", ...}]}``. Any key may hold a
list: the configurations are the cross product (Hydra's multirun, W&B's grid). A key may also hold a
range, ``{"log_uniform": [1e-5, 1e-3]}``, ``{"uniform": [a, b]}`` or ``{"int_uniform": [a, b]}``; with
ranges, ``--sample N`` draws N points (each key drawn alone; lists drawn from), reproducible from
``--seed``. ``--sample`` of a plain grid picks N of its points. Names are built from the keys that vary
(``starnet_s1_clip_ViT-B_32_lr3e-4_bs64``), made safe for file names, unique, and at most 120 characters
(a longer one keeps its start and ends with 8 hex digits of its SHA-256).

Keys become trainer flags (``batch_size: 64`` -> ``--batch-size 64``; true -> a bare flag; false and null
-> nothing). ``gpus_per_job`` and ``need_mem`` are the launcher's, per configuration. The launcher's own
settings (``output_dir``, the encoders outside a configuration) are reserved.

Output, per configuration: name, image encoder, text encoder, JSON path, the varying hyper-parameters as
compact JSON, the launcher settings (``key=value`` words), the number of flag words, the flag words, and
``.``. A fault prints one line ``<JSON path>: <what is wrong>`` (or ``<name> (<path>): ...`` for a
trainer argument) on stderr and exits 2. No torch import unless ``--check-trainer``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import re
import sys
from dataclasses import dataclass, field

from .grid_space import RESERVED, GridError, check_value, dimension, fail, fmt, label, points, safe_name

LAUNCHER_KEYS = ("gpus_per_job", "need_mem")


@dataclass
class Config:
    name: str
    image: str
    text: str
    where: str
    options: dict = field(default_factory=dict)  # key -> value (after expansion), in the file's order
    varying: dict = field(default_factory=dict)  # the keys that vary across the sweep -> this config's value
    paths: dict = field(default_factory=dict)  # key -> JSON path of its value

    def flags(self) -> list[str]:
        words = []
        for key, value in self.options.items():
            if key in LAUNCHER_KEYS or value is False or value is None:
                continue
            words.append("--" + key.replace("_", "-"))
            if value is not True:
                words.append(repr(value) if isinstance(value, float) else str(value))
        return words

    def params(self) -> dict:
        """The varying hyper-parameters (the encoders have their own columns)."""
        return {k: v for k, v in self.varying.items() if k not in ("image_encoder", "text_encoder")}

    def launcher(self) -> str:
        return " ".join(f"{k}={fmt(self.options[k])}" for k in LAUNCHER_KEYS if k in self.options)


def _expand(base: list[tuple[str, object, str, bool]], where: str, name: str | None, sample: int | None,
            rng: random.Random) -> list[Config]:
    """One configuration, its keys as (key, value, JSON path, own encoder?), with lists and ranges -> its points."""
    dims = [dimension(*entry) for entry in base]
    paths = {key: path for key, _, _, path in dims}
    varies = [key for key, values, span, _ in dims if span is not None or len(values) > 1]
    configs = []
    for point in points(dims, sample, rng, where):
        options = {k: v for k, v in point.items() if k not in ("image_encoder", "text_encoder")}
        varying = {k: point[k] for k in varies}
        configs.append(Config(name or "", point["image_encoder"], point["text_encoder"], where, options, varying, paths))
    return configs


def _name_all(configs: list[Config], given: list[str | None]) -> None:
    """Names: the given one or <image>_<text>, then a label for each key that varies in that configuration's
    own definition (a list or a range), e.g. _lr3e-4_bs64. Names must be unique."""
    for config, name in zip(configs, given):
        base = name or f"{config.image}_{config.text}"  # a given name says nothing of the encoders: label them
        labels = [label(k, v) for k, v in config.varying.items()
                  if k not in LAUNCHER_KEYS and (name or k not in ("image_encoder", "text_encoder"))]
        config.name = safe_name("_".join([base, *labels]))
    seen: dict[str, str] = {}
    for config in configs:
        if config.name in seen:
            raise GridError(f"two configurations are both named {config.name!r} ({seen[config.name]} and "
                            f"{config.where}): give them different names")
        seen[config.name] = config.where


def from_file(path: str, sample: int | None = None, seed: int = 0) -> list[Config]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows Notepad) is not part of the JSON
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(f".: cannot read the file ({exc.strerror or exc})") from None
    if not text.strip():
        fail(".", "the file is empty: it must hold one JSON object")
    doc = _one_document(text)
    rng = random.Random(seed)
    if not isinstance(doc, dict):
        fail(".", "must be a JSON object: a grid (image_encoders, text_encoders, args) or a list (defaults, configs)")
    if "configs" in doc:
        return _from_list(doc, sample, rng)
    if "image_encoders" in doc or "text_encoders" in doc:
        return _from_grid(doc, sample, rng)
    fail(".", 'has neither "configs" (a list) nor "image_encoders"/"text_encoders" (a grid)')


class _Twice(dict):
    """A JSON object that names a key twice (json keeps the last silently); the key, for the fault."""
    key = ""


def _pairs(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            twice = _Twice(pairs)
            twice.key = key
            return twice
        obj[key] = value
    return obj


def _key_twice(value, path: str = ".") -> None:
    """Fault at the first object, by JSON path, that names a key twice."""
    if isinstance(value, _Twice):
        fail(path, f"names the key {value.key!r} twice; JSON keeps only the last value: write it once")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _key_twice(item, f"{path.rstrip('.')}[{key}]" if isinstance(key, int) else f"{path.rstrip('.')}.{key}")


def _one_document(text: str):
    """The file's one JSON document; NaN/Infinity, several documents, a key named twice in one object or
    bad JSON are faults."""
    def constant(name):
        raise GridError(f"not valid JSON: {name} is not a JSON number")
    decoder = json.JSONDecoder(parse_constant=constant, object_pairs_hook=_pairs)
    try:
        doc, end = decoder.raw_decode(text, len(text) - len(text.lstrip()))
        count = 1
        while text[end:].strip():
            _, end = decoder.raw_decode(text, len(text) - len(text[end:].lstrip()))
            count += 1
    except json.JSONDecodeError as exc:
        raise GridError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if count > 1:
        fail(".", f"the file holds {count} JSON documents one after another; it must hold one")
    _key_twice(doc)
    return doc


def _object(value, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(path, "must be an object of option: value")
    return value


def _encoder_list(doc: dict, key: str) -> list:
    if key not in doc:
        fail(".", f'missing key "{key}"')
    value = doc[key]
    if not isinstance(value, list) or not value:
        fail(f".{key}", "must be a non-empty list of names")
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            fail(f".{key}[{i}]", f"must be a non-empty string, got {json.dumps(v)}")
        check_value(v, f".{key}[{i}]")
    return value


def _from_grid(doc: dict, sample: int | None, rng: random.Random) -> list[Config]:
    args = _object(doc.get("args"), ".args")
    base = [("image_encoder", _encoder_list(doc, "image_encoders"), ".image_encoders", True),
            ("text_encoder", _encoder_list(doc, "text_encoders"), ".text_encoders", True)]
    base += [(key, value, f".args.{key}", False) for key, value in args.items()]
    configs = _expand(base, ".image_encoders x .text_encoders", None, sample, rng)
    _name_all(configs, [None] * len(configs))
    return configs


def _from_list(doc: dict, sample: int | None, rng: random.Random) -> list[Config]:
    defaults = _object(doc.get("defaults"), ".defaults")
    entries = doc["configs"]
    if not isinstance(entries, list) or not entries:
        fail(".configs", "must be a non-empty list of configurations")
    configs, names = [], []
    for i, entry in enumerate(entries):
        where = f".configs[{i}]"
        if not isinstance(entry, dict):
            fail(where, "must be an object with image_encoder and text_encoder")
        for key in ("image_encoder", "text_encoder"):
            if key not in entry:
                fail(where, f'missing key "{key}"')
        name = entry.get("name")
        if "name" in entry and (not isinstance(name, str) or not name):
            fail(f"{where}.name", f"must be a non-empty string, got {json.dumps(name)}")
        for key in defaults:
            if key in RESERVED:
                fail(f".defaults.{key}", "is reserved: the launcher sets "
                      + ("each configuration's output folder" if "output" in key else "each configuration's own encoders"))
        merged = {key: (value, f".defaults.{key}") for key, value in defaults.items()}
        merged.update({key: (value, f"{where}.{key}") for key, value in entry.items() if key != "name"})
        base = [(key, value, path, key in ("image_encoder", "text_encoder") and path.startswith(where))
                for key, (value, path) in merged.items()]
        expanded = _expand(base, where, name, sample, rng)
        configs += expanded
        names += [name] * len(expanded)
    _name_all(configs, names)
    return configs


def from_lists(images: list[str], texts: list[str]) -> list[Config]:
    for what, items in (("IMAGE_ENCODERS", images), ("TEXT_ENCODERS", texts)):
        if not items:
            raise GridError(f"{what}: is empty: name at least one encoder")
    configs = [Config(f"{image}_{text}", image, text, "IMAGE_ENCODERS x TEXT_ENCODERS") for image in images for text in texts]
    for config in configs:
        config.name = safe_name(config.name)
    _name_all(configs, [c.name for c in configs])
    return configs


def check_trainer(configs: list[Config], rest: list[str]) -> None:
    """Parse every configuration's trainer arguments with the trainer's own parser (imports torch)."""
    from .train_params import parse_args

    for config in configs:
        argv = ["--image-encoder", config.image, "--text-encoder", config.text, "--output-dir", "x",
                *config.flags(), *rest]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(argv)
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "bad arguments"
            message = message.split(" error: ", 1)[-1]
            where = config.where
            quoted = re.findall(r"'([^']*)'", message)
            if quoted and quoted[0] in rest:
                raise GridError(f"{config.name} (trainer arguments after --): the trainer refuses it: {message}") from None
            for flag in re.findall(r"--[A-Za-z0-9][A-Za-z0-9_.-]*", message):
                key = flag[2:].replace("-", "_")
                path = config.paths.get(key) or config.paths.get(flag[2:])
                if path:
                    where = path
                    break
                if flag in rest:
                    where = "trainer arguments after --"
                    break
            raise GridError(f"{config.name} ({where}): the trainer refuses it: {message}") from None


def render(configs: list[Config]) -> str:
    lines = []
    for c in configs:
        flags = c.flags()
        lines += [c.name, c.image, c.text, c.where, json.dumps(c.params(), separators=(",", ":")), c.launcher(),
                  str(len(flags)), *flags, "."]
    return "\n".join(lines) + ("\n" if lines else "")


def _split(text: str) -> list[str]:
    return [item for item in re.split(r"[\s,]+", text) if item]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m mgpu.grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", help="a JSON config file (default: the two encoder lists)")
    p.add_argument("--image-encoders", default="", help="image encoders, comma or space separated")
    p.add_argument("--text-encoders", default="", help="text encoders, comma or space separated")
    p.add_argument("--sample", type=int, help="draw this many random points of the grid (default: all of it)")
    p.add_argument("--seed", type=int, default=0, help="the random search's seed (default 0)")
    p.add_argument("--check-trainer", action="store_true",
                   help="parse each configuration's arguments with mgpu.train_clip's parser (imports torch)")
    args = p.parse_args(argv)
    try:
        if args.sample is not None and args.sample < 1:
            raise GridError(f"--sample: must be an integer of at least 1, got {args.sample}")
        if args.config_file:
            configs = from_file(args.config_file, args.sample, args.seed)
        else:
            if args.sample is not None:
                raise GridError("--sample: needs a config file with lists or ranges (--config-file)")
            configs = from_lists(_split(args.image_encoders), _split(args.text_encoders))
        if args.check_trainer:
            check_trainer(configs, rest)
    except GridError as exc:
        print(exc, file=sys.stderr)
        return 2
    sys.stdout.write(render(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
