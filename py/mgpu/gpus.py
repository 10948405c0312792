"""Which GPUs this machine has and how busy they are: one answer for the whole toolkit.

Sources, first that applies wins:
1. ``MGPU_FAKE_GPUS=<scenario.json>``: the GPUs a scenario file describes (re-read on every call;
   ``mgpu.scenario``);
2. NVML through ``nvidia-ml-py`` (``import pynvml``; ``mgpu.nvml_source``);
3. ``nvidia-smi`` queries, when ``nvidia-ml-py`` is not installed (``mgpu.smi_source``);
4. none: CPU mode, with the reason.

This module is the data model and ``inventory()``, the one entry point. Nothing here imports torch,
and the sources are imported only when they are asked, so ``python -m mgpu.scenario`` starts fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

SCENARIO_ENV = "MGPU_FAKE_GPUS"


class SourceUnavailable(RuntimeError):
    """This source cannot answer on this machine; the message says why."""


@dataclass
class GpuProcess:
    pid: int
    name: str
    used_memory_mib: int | None = None
    user: str | None = None


@dataclass
class MigDevice:
    """One MIG instance: a device of its own for CUDA (``CUDA_VISIBLE_DEVICES=MIG-...``)."""

    uuid: str
    name: str | None = None  # the profile, e.g. "3g.40gb", or NVML's "NVIDIA A100 ... MIG 3g.40gb"
    memory_total_mib: int | None = None
    memory_used_mib: int | None = None

    @property
    def memory_free_mib(self) -> int | None:
        return _free(self.memory_total_mib, self.memory_used_mib)


def _free(total: int | None, used: int | None) -> int | None:
    """Free memory, or None when either number is unknown: unknown memory never reads as free."""
    if total is None or used is None:
        return None
    return max(total - used, 0)


@dataclass
class Gpu:
    index: int  # NVML's (and nvidia-smi's) index: PCI bus order
    uuid: str  # "GPU-...", or "" when the GPU cannot be read at all (see lost)
    name: str
    memory_total_mib: int | None  # None: not reported (unified memory, as on GB10) or unreadable
    memory_used_mib: int | None
    utilization_gpu: int | None  # None: not reported (MIG mode, some GPUs) or unreadable
    processes: list[GpuProcess] = field(default_factory=list)
    mig_devices: list[MigDevice] = field(default_factory=list)
    pci_bus_id: str | None = None  # "00000000:07:00.0" as NVML and nvidia-smi print it
    compute_capability: str | None = None  # "8.9"; orders CUDA's "fastest first" enumeration
    multiprocessors: int | None = None  # SM count, the tie-breaker of that order when known
    lost: str | None = None  # why the GPU cannot be read at all ("GPU is lost"); None when it answers
    # What could not be read, in words, by kind: "memory_unknown" (not reported: unified memory),
    # "processes_unknown" (no source lists them), "<what>_unreadable" (an NVML error).
    faults: dict[str, str] = field(default_factory=dict)
    processes_known: bool = True  # False: no source could list its processes (it may be busy)

    @property
    def memory_free_mib(self) -> int | None:
        return _free(self.memory_total_mib, self.memory_used_mib)


@dataclass
class Inventory:
    source: str  # "scenario" | "nvml" | "nvidia-smi" | "none"
    detail: str  # the scenario path, or why there is no GPU source
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (i, j) -> level as nvidia-smi topo -m prints it (NV<k>, PIX, PXB, PHB, NODE, SYS), for GPU
    # indices i < j; empty when the topology is not known.
    links: dict[tuple[int, int], str] = field(default_factory=dict)

    def link(self, a: int, b: int) -> str | None:
        return self.links.get((min(a, b), max(a, b)))


def process_owner(pid: int) -> tuple[str | None, str | None]:
    """(name, user) of a local process from /proc, (None, None) when it is not visible here
    (gone, or in another PID namespace, as NVML's host PIDs are inside a container)."""
    import pwd

    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            name = f.read().strip()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None, None
    try:
        return name, pwd.getpwuid(uid).pw_name
    except KeyError:
        return name, str(uid)


def machine(samples: int = 5, interval_s: float = 0.1) -> Inventory:
    """The real machine's GPUs: NVML, else nvidia-smi when nvidia-ml-py is missing, else none."""
    from . import nvml_source, smi_source

    try:
        return nvml_source.from_nvml(samples, interval_s)
    except SourceUnavailable as nvml_exc:
        if "not installed" not in str(nvml_exc):
            return Inventory("none", str(nvml_exc))
        try:
            return smi_source.from_nvidia_smi()
        except SourceUnavailable as smi_exc:
            return Inventory("none", f"{nvml_exc}; {smi_exc}")


def inventory(samples: int = 5, interval_s: float = 0.1) -> Inventory:
    """The GPUs as the whole toolkit sees them. Raises mgpu.scenario.ScenarioError for a bad scenario."""
    scenario = os.environ.get(SCENARIO_ENV)
    if scenario:
        from .scenario import load_scenario

        return load_scenario(scenario)
    return machine(samples, interval_s)


def __getattr__(name: str):
    """``gpus.load_scenario`` and ``gpus.ScenarioError`` still work; they live in mgpu.scenario."""
    if name in ("load_scenario", "ScenarioError"):
        from . import scenario

        return getattr(scenario, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
