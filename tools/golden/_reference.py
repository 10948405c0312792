"""Loading the reference implementations for the golden scripts (not part of mgpu, not used by tests).

open_clip's package __init__ imports torchvision (image transforms), which the text side never uses;
``open_clip_module(name)`` loads one of its modules (``tokenizer``, ``transformer``, ``model``) with
the package body skipped and an empty stand-in for the one torchvision name ``open_clip.utils`` imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "golden"


def open_clip_module(name: str) -> types.ModuleType:
    if "open_clip" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or spec.origin is None:
            raise SystemExit("open_clip is not installed: see tools/golden/README.md")
        package = types.ModuleType("open_clip")
        package.__path__ = [str(Path(spec.origin).parent)]
        sys.modules["open_clip"] = package
        if importlib.util.find_spec("torchvision") is None:
            misc = types.ModuleType("torchvision.ops.misc")
            misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})  # image towers only; never built here
            sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                                "torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc})
    return importlib.import_module(f"open_clip.{name}")


def versions() -> dict[str, str]:
    from importlib.metadata import version
    names = ("open_clip_torch", "transformers", "ftfy", "regex", "torch", "numpy", "safetensors")
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except Exception:
            pass
    return out


def mgpu_on_path() -> None:
    """Make `import mgpu` find this repository's package (for the --compare checks)."""
    sys.path.insert(0, str(ROOT / "py"))


def open_clip_train_function(module: str, name: str):
    """One top-level function of open_clip_train (e.g. train.get_clip_metrics), compiled from the
    installed file's own source with numpy and torch in scope: the module itself imports the whole of
    open_clip (and torchvision) for its other functions."""
    import ast

    import numpy
    import torch

    spec = importlib.util.find_spec("open_clip_train")
    if spec is None or spec.origin is None:
        raise SystemExit("open_clip_train (part of open_clip_torch) is not installed: see tools/golden/README.md")
    path = Path(spec.origin).parent / f"{module}.py"
    tree = ast.parse(path.read_text(), str(path))
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {"np": numpy, "torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]
