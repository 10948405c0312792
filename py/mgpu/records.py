"""The plain-text records ``python -m mgpu.scenario`` prints for the shell (lib/gpu.sh), one a line:

    gpu,<index>,<uuid>,<util|NA>,<used_mib|NA>,<total_mib|NA>,<pci_bus_id|NA>,<name>
    mig,<parent index>,<MIG uuid>,<used_mib|NA>,<total_mib|NA>,<name|NA>
    proc,<gpu index>,<pid>,<used_mib|NA>,<user|NA>
    link,<i>,<j>,<level>

GPUs in index order, each followed by its MIG instances and its processes; links last, for i < j.
Text fields never hold a comma or a control character: a scenario refuses them, and what a real
driver reports is cleaned here (each such character becomes a space). A GPU that cannot be read at
all is left out (the shell must not give it work) and named on stderr, as is every other fault.
"""

from __future__ import annotations

import re
import sys

from .gpus import Gpu, Inventory

_UNSAFE = re.compile(r"[,\x00-\x1f\x7f]")
EXIT_SOURCE_FAILED, EXIT_NO_GPU = 1, 3


def _clean(text: str | None) -> str:
    return "NA" if text is None or text == "" else _UNSAFE.sub(" ", text)


def _num(value: int | None) -> str:
    return "NA" if value is None else str(value)


def gpu_lines(gpu: Gpu) -> list[str]:
    lines = [",".join(["gpu", str(gpu.index), _clean(gpu.uuid), _num(gpu.utilization_gpu), _num(gpu.memory_used_mib),
                       _num(gpu.memory_total_mib), _clean(gpu.pci_bus_id), _clean(gpu.name)])]
    lines += [f"mig,{gpu.index},{_clean(m.uuid)},{_num(m.memory_used_mib)},{_num(m.memory_total_mib)},{_clean(m.name)}"
              for m in gpu.mig_devices]
    lines += [f"proc,{gpu.index},{p.pid},{_num(p.used_memory_mib)},{_clean(p.user)}" for p in gpu.processes]
    return lines


def render(inv: Inventory) -> str:
    """Every record of an inventory, newline-terminated; "" when there is nothing to print."""
    lines: list[str] = []
    for gpu in sorted(inv.gpus, key=lambda g: g.index):
        if gpu.lost is None:
            lines += gpu_lines(gpu)
    shown = {g.index for g in inv.gpus if g.lost is None}
    lines += [f"link,{a},{b},{level}" for (a, b), level in sorted(inv.links.items()) if a in shown and b in shown]
    return "".join(line + "\n" for line in lines)


def faults(inv: Inventory) -> list[str]:
    """One line per thing the shell should hear about: lost GPUs, unreadable values, unlisted processes
    (the inventory's notes, which only say which source answered, are not among them)."""
    out = []
    for gpu in inv.gpus:
        if gpu.lost is not None:
            out.append(f"GPU {gpu.index}: cannot be read ({gpu.lost}); left out. See nvidia-smi and dmesg")
            continue
        out += [f"GPU {gpu.index}: {fault}" for fault in gpu.faults.values()]
    return out


def _read_machine(samples: int) -> tuple[Inventory | None, str, int]:
    """(inventory, "", 0), or (None, why, exit code): 3 when the machine has no GPU driver (CPU mode),
    1 when a driver is there but its answer failed (nvidia-smi hung or failed, NVIDIA_SMI names nothing)."""
    import os

    from . import nvml_source, smi_source
    from .gpus import SourceUnavailable

    try:
        return nvml_source.from_nvml(samples, 0.1), "", 0
    except SourceUnavailable as nvml_exc:
        if "not installed" not in str(nvml_exc):
            return None, f"no GPU can be read: {nvml_exc}", EXIT_NO_GPU
        try:
            return smi_source.from_nvidia_smi(), "", 0
        except smi_source.ProgramMissing as exc:
            code = EXIT_SOURCE_FAILED if "NVIDIA_SMI" in os.environ else EXIT_NO_GPU
            return None, f"no GPU can be read: {nvml_exc}; {exc}", code
        except SourceUnavailable as exc:
            return None, str(exc), EXIT_SOURCE_FAILED


def print_machine(samples: int) -> int:
    """``--machine``: records of this machine on stdout, faults on stderr. Exit 0 with records (even
    when some values are unknown); 3 when no GPU can be read (no driver, or it reports no GPU: CPU
    mode); 1 when the GPU source failed (nvidia-smi hung or failed, NVIDIA_SMI names no program, every
    GPU is lost), with one line on stderr saying why."""
    inv, why, code = _read_machine(samples)
    if inv is None:
        print(why, file=sys.stderr)
        return code
    if not inv.gpus:
        print("no GPU can be read: the driver reports none", file=sys.stderr)
        return EXIT_NO_GPU
    sys.stdout.write(render(inv))
    for line in faults(inv):
        print(line, file=sys.stderr)
    return EXIT_SOURCE_FAILED if all(g.lost is not None for g in inv.gpus) else 0
