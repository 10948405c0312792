"""What CUDA (and so PyTorch) will show of the machine's GPUs, from ``CUDA_VISIBLE_DEVICES`` and
``CUDA_DEVICE_ORDER``.

Order: CUDA numbers GPUs "fastest first" unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; NVML and nvidia-smi
always number them in PCI bus order. Identical GPUs tie, and ties keep PCI order, so the two agree on a
server of one model. CUDA's heuristic is not published: ``cuda_order`` estimates it as newer compute
capability first, then more multiprocessors, then PCI order, and says when that is a guess (``--torch``
in check_gpus.py reads the real order from torch and joins it on UUIDs). A lost GPU is not enumerated.

``CUDA_VISIBLE_DEVICES`` rules are CUDA's, as PyTorch's own tests pin them:
- unset: every GPU; ``""``: none;
- a list of ordinals (positions in CUDA's order, not nvidia-smi's numbers), ``GPU-`` UUIDs (a unique
  prefix is enough) or ``MIG-`` UUIDs; entries after the first must be of the same kind;
- each ordinal is read like C's ``strtoul`` (``"1gpu"`` is 1); parsing stops at the first entry that
  is not valid (negative, not a number, no such GPU): ``"0,1,-1,3"`` shows 0 and 1;
- a GPU listed twice makes CUDA show no GPU at all;
- only the first MIG instance is enumerated: a MIG list is one CUDA device.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .gpus import Gpu

_ORDINAL = re.compile(r"[+-]?\d+")


@dataclass
class CudaOrder:
    indices: list[int]  # NVML indices in the order CUDA enumerates them; position = CUDA ordinal
    setting: str  # CUDA_DEVICE_ORDER as CUDA applies it: FASTEST_FIRST or PCI_BUS_ID
    guess: str | None = None  # None when the order is certain, else why it is an estimate


def _bus_key(gpu: Gpu) -> tuple:
    try:
        domain, bus, rest = (gpu.pci_bus_id or "").split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16), gpu.index
    except ValueError:
        return (-1, -1, -1, -1, gpu.index)  # NVML's index is PCI order already


def _capability(gpu: Gpu) -> tuple[int, int]:
    major, minor = (gpu.compute_capability or "0.0").split(".")
    return int(major), int(minor)


def cuda_order(gpus: list[Gpu], device_order: str | None = None) -> CudaOrder:
    """The order CUDA enumerates ``gpus`` in; ``device_order`` is CUDA_DEVICE_ORDER (read from the
    environment when None)."""
    setting = device_order if device_order is not None else os.environ.get("CUDA_DEVICE_ORDER", "")
    setting = "PCI_BUS_ID" if setting == "PCI_BUS_ID" else "FASTEST_FIRST"
    alive = sorted((g for g in gpus if g.lost is None), key=_bus_key)
    if setting == "PCI_BUS_ID" or len({g.name for g in alive}) < 2:
        return CudaOrder([g.index for g in alive], setting)
    if any(g.compute_capability is None for g in alive):
        return CudaOrder([g.index for g in alive], setting,
                         "the GPUs differ and their compute capabilities are unknown, so CUDA's fastest-first "
                         "order cannot be told; this assumes PCI order")
    ranked = sorted(alive, key=lambda g: (tuple(-x for x in _capability(g)), -(g.multiprocessors or 0)))
    tied = {}
    for g in ranked:
        tied.setdefault((_capability(g), g.multiprocessors), set()).add(g.name)
    unsure = any(len(names) > 1 for names in tied.values())
    why = ("an estimate: CUDA does not publish its fastest-first rule; mgpu ranks newer compute capability "
           "first, then more multiprocessors" + (" (unknown for some models here)" if unsure else ""))
    return CudaOrder([g.index for g in ranked], setting, why)


@dataclass
class Visibility:
    raw: str | None  # the variable as set; None when unset
    physical: list[int] = field(default_factory=list)  # NVML indices; position = CUDA index
    invalid: list[str] = field(default_factory=list)  # entries CUDA ignores, from the first bad one on
    why: str | None = None  # why CUDA stops (or shows nothing)
    mig: str | None = None  # the MIG instance CUDA shows (as cuda:0) when the list names MIG UUIDs
    order: CudaOrder = field(default_factory=lambda: CudaOrder([], "FASTEST_FIRST"))

    def cuda_index(self, physical_index: int) -> int | None:
        """The CUDA index of a whole GPU; None when hidden, or when only one of its MIG instances shows."""
        if self.mig is not None or physical_index not in self.physical:
            return None
        return self.physical.index(physical_index)

    def mig_cuda_index(self, uuid: str) -> int | None:
        return 0 if self.mig == uuid else None


def _by_uuid(entry: str, gpus: list[Gpu]) -> tuple[Gpu | None, str]:
    hits = [g for g in gpus if g.uuid.startswith(entry)]
    if len(hits) == 1:
        return hits[0], ""
    return None, "matches no GPU" if not hits else f"is a prefix of {len(hits)} GPUs' UUIDs"


def _by_mig(entry: str, gpus: list[Gpu]) -> tuple[Gpu | None, str]:
    for gpu in gpus:
        if any(m.uuid == entry for m in gpu.mig_devices):
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


def resolve(raw: str | None, gpus: list[Gpu], device_order: str | None = None) -> Visibility:
    """Apply CUDA's parsing of ``CUDA_VISIBLE_DEVICES`` (``raw``) to the GPUs, ordinals counted in
    CUDA's order (``cuda_order(gpus, device_order)``)."""
    order = cuda_order(gpus, device_order)
    by_index = {g.index: g for g in gpus}
    ordered = [by_index[i] for i in order.indices]
    if raw is None:
        return Visibility(None, list(order.indices), order=order)
    entries = [e.strip() for e in raw.split(",")]
    if raw.strip() == "":
        return Visibility(raw, [], [], "it is empty, which hides every GPU", order=order)
    if entries[0].startswith("GPU-"):
        lookup, kind = _by_uuid, "GPU-"
    elif entries[0].startswith("MIG-"):
        lookup, kind = _by_mig, "MIG-"
    else:
        lookup, kind = _by_ordinal, ""
    vis = Visibility(raw, order=order)
    for n, entry in enumerate(entries):
        if kind and not entry.startswith(kind):
            gpu, problem = None, f"is not a {kind} UUID like the first entry"
        else:
            gpu, problem = lookup(entry, ordered)
        if gpu is None:
            vis.invalid, vis.why = entries[n:], f"{entry!r} {problem}"
            break
        if gpu.index in vis.physical:
            return Visibility(raw, [], entries, f"GPU {gpu.index} is listed twice, so CUDA shows no GPU at all",
                              order=order)
        if kind == "" and _is_partial(entry):
            vis.invalid.append(entry)
            vis.why = f"{entry!r} is read as {int(_ORDINAL.match(entry).group())}"
        vis.physical.append(gpu.index)
        if kind == "MIG-":
            vis.mig = entry
            if len(entries) > 1:
                vis.invalid, vis.why = entries[1:], "CUDA enumerates only the first MIG instance"
            break
    return vis


def _bare(uuid: str) -> str:
    return uuid[4:] if uuid[:4] in ("GPU-", "MIG-") else uuid


def join_uuids(vis: Visibility, uuids: list[str], gpus: list[Gpu]) -> tuple[Visibility, bool]:
    """The visibility CUDA really has, from the UUIDs of its devices in its order (torch reports them
    without the "GPU-" prefix), and whether it differs from the estimate ``vis``. Devices whose UUID
    matches no GPU (or a MIG instance) are dropped."""
    physical, mig = [], None
    for uuid in uuids:
        for gpu in gpus:
            if _bare(gpu.uuid) == _bare(uuid):
                physical.append(gpu.index)
            for m in gpu.mig_devices:
                if _bare(m.uuid) == _bare(uuid):
                    physical.append(gpu.index)
                    mig = m.uuid
    if not physical:  # torch sees no device, or none of these GPUs (a scenario, while torch sees the real machine)
        return vis, False
    joined = Visibility(vis.raw, physical, vis.invalid, vis.why, mig,
                        CudaOrder(vis.order.indices, vis.order.setting, None))
    return joined, physical != vis.physical or mig != vis.mig


def _is_partial(entry: str) -> bool:
    """True for an ordinal with trailing garbage that strtoul silently drops, like '1gpu'."""
    match = _ORDINAL.match(entry)
    return bool(match) and match.end() != len(entry)
