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
