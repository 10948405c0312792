"""What CUDA (and so PyTorch) will show of the machine's GPUs, from ``CUDA_VISIBLE_DEVICES``.

The rules are CUDA's, as PyTorch's own tests pin them:
- unset: every GPU; ``""``: none;
- a list of ordinals, ``GPU-`` UUIDs (a unique prefix is enough) or one ``MIG-`` UUID;
- each ordinal is read like C's ``strtoul`` (``"1gpu"`` is 1); parsing stops at the first entry that
  is not valid (negative, not a number, no such GPU): ``"0,1,-1,3"`` shows 0 and 1;
- a GPU listed twice makes CUDA show no GPU at all;
- only the first MIG instance is enumerated.
Ordinals count in CUDA's order, which matches nvidia-smi's only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
or when all GPUs are the same model; this module assumes PCI order and ``mgpu.diagnose`` warns otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .gpus import Gpu

_ORDINAL = re.compile(r"[+-]?\d+")


@dataclass
class Visibility:
    raw: str | None  # the variable as set; None when unset
    physical: list[int] = field(default_factory=list)  # physical indices; position = CUDA index
    invalid: list[str] = field(default_factory=list)  # entries CUDA ignores, from the first bad one on
    why: str | None = None  # why CUDA stops (or shows nothing)

    def cuda_index(self, physical_index: int) -> int | None:
        try:
            return self.physical.index(physical_index)
        except ValueError:
            return None


def _by_uuid(entry: str, gpus: list[Gpu]) -> tuple[Gpu | None, str]:
    hits = [g for g in gpus if g.uuid.startswith(entry)]
    if len(hits) == 1:
        return hits[0], ""
    return None, "matches no GPU" if not hits else f"is a prefix of {len(hits)} GPUs' UUIDs"


def _by_mig(entry: str, gpus: list[Gpu]) -> tuple[Gpu | None, str]:
    for gpu in gpus:
        if entry in gpu.mig_devices:
            return gpu, ""
    return None, "matches no MIG instance"


def _by_ordinal(entry: str, gpus: list[Gpu]) -> tuple[Gpu | None, str]:
    match = _ORDINAL.match(entry)
    if not match:
        return None, "is not a GPU index or UUID"
    value = int(match.group())
    if value < 0:
        return None, "is negative"
    if value >= len(gpus):
        return None, f"is past the last GPU ({len(gpus) - 1})" if gpus else "names a GPU, and there is none"
    return gpus[value], ""


def resolve(raw: str | None, gpus: list[Gpu]) -> Visibility:
    """Apply CUDA's parsing of ``CUDA_VISIBLE_DEVICES`` (``raw``) to the GPUs in PCI order."""
    ordered = sorted(gpus, key=lambda g: g.index)
    if raw is None:
        return Visibility(None, [g.index for g in ordered])
    entries = [e.strip() for e in raw.split(",")]
    if raw.strip() == "":
        return Visibility(raw, [], [], "it is empty, which hides every GPU")
    if entries[0].startswith("GPU-"):
        lookup, kind = _by_uuid, "GPU-"
    elif entries[0].startswith("MIG-"):
        lookup, kind = _by_mig, "MIG-"
    else:
        lookup, kind = _by_ordinal, ""
    vis = Visibility(raw)
    for n, entry in enumerate(entries):
        if kind and not entry.startswith(kind):
            gpu, problem = None, f"is not a {kind} UUID like the first entry"
        else:
            gpu, problem = lookup(entry, ordered)
        if gpu is None:
            vis.invalid, vis.why = entries[n:], f"{entry!r} {problem}"
            break
        if gpu.index in vis.physical:
            return Visibility(raw, [], entries, f"GPU {gpu.index} is listed twice, so CUDA shows no GPU at all")
        if kind == "" and _is_partial(entry):
            vis.invalid.append(entry)
            vis.why = f"{entry!r} is read as {gpu.index}"
        vis.physical.append(gpu.index)
        if kind == "MIG-" and len(entries) > 1:
            vis.invalid, vis.why = entries[1:], "CUDA enumerates only the first MIG instance"
            break
    return vis


def _is_partial(entry: str) -> bool:
    """True for an ordinal with trailing garbage that strtoul silently drops, like '1gpu'."""
    match = _ORDINAL.match(entry)
    return bool(match) and match.end() != len(entry)
