"""The GPUs as NVML (``nvidia-ml-py``, module ``pynvml``) reports them, answers real drivers give included.

- A GPU whose handle or UUID cannot be read ("GPU is lost") is kept, marked ``lost``; the others are read.
- Memory that NVML does not report (``NotSupported`` on unified-memory systems such as GB10) is None,
  never 0 used or all free, with a fault saying why.
- Processes: ``nvmlDeviceGetComputeRunningProcesses`` calls only the ``_v3`` entry point (drivers
  >= 510.39); on older drivers (R470) it raises ``FunctionNotFound`` (recent nvidia-ml-py wraps that in
  ``NVMLLibraryMismatchError``). Then ``_v2``, then ``nvidia-smi --query-compute-apps``; when nothing
  answers, the GPU says its processes are unknown instead of showing none.
- Topology from ``nvmlDeviceGetTopologyCommonAncestor`` and the NVLink state and remote end of every
  link, else ``nvidia-smi topo -m`` (``mgpu.topology``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter

from . import smi_source, topology
from .gpus import Gpu, GpuProcess, Inventory, MigDevice, SourceUnavailable, process_owner

MIB = 2**20
_COMPUTE = ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2")
_GRAPHICS = ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v2")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _code(nvml, exc: Exception) -> int | None:
    return getattr(exc, "value", None) if isinstance(exc, nvml.NVMLError) else None


def _missing_function(nvml, exc: Exception) -> bool:
    """The driver lacks this entry point: FunctionNotFound, which recent nvidia-ml-py re-raises as
    NVMLLibraryMismatchError for unversioned calls."""
    return _code(nvml, exc) == nvml.NVML_ERROR_FUNCTION_NOT_FOUND or type(exc).__name__ == "NVMLLibraryMismatchError"


class _Reader:
    """Asks NVML about one GPU; remembers what failed, and whether the GPU is lost."""

    def __init__(self, nvml, handle):
        self.nvml, self.handle = nvml, handle
        self.faults: dict[str, str] = {}
        self.lost: str | None = None

    def ask(self, what: str, getter: str, *args, quiet: tuple[int, ...] = ()):
        try:
            return getattr(self.nvml, getter)(self.handle, *args)
        except (self.nvml.NVMLError, AttributeError) as exc:
            code = _code(self.nvml, exc)
            if code == self.nvml.NVML_ERROR_GPU_IS_LOST:
                self.lost = str(exc)
            elif code not in quiet:
                self.faults[what.replace(" ", "_") + "_unreadable"] = f"{what} cannot be read (NVML: {exc})"
            return None


def _memory(nvml, reader: _Reader) -> tuple[int | None, int | None]:
    mem = None
    try:  # v2 excludes memory the driver reserves, matching nvidia-smi on R510+ drivers
        mem = nvml.nvmlDeviceGetMemoryInfo(reader.handle, version=nvml.nvmlMemory_v2)
    except (TypeError, AttributeError, nvml.NVMLError):
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(reader.handle)
        except nvml.NVMLError as exc:
            code = _code(nvml, exc)
            if code == nvml.NVML_ERROR_GPU_IS_LOST:
                reader.lost = str(exc)
            elif code == nvml.NVML_ERROR_NOT_SUPPORTED:
                reader.faults["memory_unknown"] = (
                    "memory is not reported (NVML: Not Supported), as on unified-memory systems such as GB10 "
                    "where the GPU shares system memory: its free memory is unknown, so no memory requirement "
                    "counts as met there")
            else:
                reader.faults["memory_unreadable"] = f"memory cannot be read (NVML: {exc})"
    if mem is None:
        return None, None
    return int(mem.total) // MIB, int(mem.used) // MIB


def _entries(nvml, handle, getters: tuple[str, ...]) -> tuple[list | None, list[str]]:
    """The first answer of the versioned getters; (None, why each failed) when none answers."""
    why = []
    for getter in getters:
        fn = getattr(nvml, getter, None)
        if fn is None:
            why.append(f"{getter}: not in this nvidia-ml-py")
            continue
        try:
            return list(fn(handle)), why
        except Exception as exc:  # noqa: BLE001 - NVMLError or NVMLLibraryMismatchError, both mean "no answer"
            if not isinstance(exc, nvml.NVMLError) and not _missing_function(nvml, exc):
                raise
            why.append(f"{getter}: {'Function Not Found' if _missing_function(nvml, exc) else exc}")
    return None, why


def _named(nvml, pid: int, used: object) -> GpuProcess:
    mib = None if used is None or int(used) >= 2**63 else int(used) // MIB
    name, user = process_owner(pid)
    if name is None:  # another PID namespace (containers), or already gone: NVML may still know the name
        try:
            name = os.path.basename(_text(nvml.nvmlSystemGetProcessName(pid)))
        except nvml.NVMLError:
            name = "?"
    return GpuProcess(pid, name, mib, user)


def _processes(nvml, gpu: Gpu, handles: list, smi_apps: smi_source.ComputeApps) -> None:
    """Fill gpu.processes from the GPU's handle and its MIG instances' handles (in MIG mode only root
    may ask the whole GPU); when no source can list them, say so (gpu.processes_known = False)."""
    found: dict[int, GpuProcess] = {}
    answered, why = False, []
    for handle in handles:
        compute, failed = _entries(nvml, handle, _COMPUTE)
        if compute is None:
            why += failed
            continue
        answered = True
        for p in compute:
            found.setdefault(p.pid, _named(nvml, p.pid, getattr(p, "usedGpuMemory", None)))
    if not answered:
        listed = smi_apps.for_gpu(gpu.uuid)
        if listed is None:
            gpu.processes_known = False
            gpu.faults["processes_unknown"] = (f"its processes cannot be listed ({'; '.join(why)}; {smi_apps.error}):"
                                               " it may be busy although no process is shown")
        else:
            found.update((p.pid, p) for p in listed)
    for p in _entries(nvml, handles[0], _GRAPHICS)[0] or []:
        found.setdefault(p.pid, _named(nvml, p.pid, getattr(p, "usedGpuMemory", None)))
    gpu.processes = sorted(found.values(), key=lambda p: p.pid)


def _migs(nvml, handle) -> list[tuple[MigDevice, object]]:
    """The GPU's MIG instances, each with its NVML handle."""
    try:
        if nvml.nvmlDeviceGetMigMode(handle)[0] != 1:
            return []
        count = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except (nvml.NVMLError, AttributeError):
        return []
    out = []
    for k in range(count):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k)
            uuid = _text(nvml.nvmlDeviceGetUUID(mig))
        except nvml.NVMLError:  # an empty slot
            continue
        reader = _Reader(nvml, mig)
        name = reader.ask("name", "nvmlDeviceGetName")
        total, used = _memory(nvml, reader)
        out.append((MigDevice(uuid, None if name is None else _text(name), total, used), mig))
    return out


def _median_utilization(nvml, handles: dict[int, object], samples: int, interval_s: float) -> dict[int, int | None]:
    readings: dict[int, list[int]] = {i: [] for i in handles}
    for n in range(samples):
        for i, handle in handles.items():
            try:
                readings[i].append(int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except nvml.NVMLError:  # NotSupported on some GPUs and in MIG mode
                pass
        if n + 1 < samples:
            time.sleep(interval_s)
    return {i: round(statistics.median(r)) if r else None for i, r in readings.items()}


def _read_gpu(nvml, index: int, handle, uuid: str, util: int | None, smi_apps) -> Gpu:
    reader = _Reader(nvml, handle)
    name = reader.ask("name", "nvmlDeviceGetName")
    total, used = _memory(nvml, reader)
    pci = reader.ask("PCI bus id", "nvmlDeviceGetPciInfo")
    cc = reader.ask("compute capability", "nvmlDeviceGetCudaComputeCapability", quiet=(nvml.NVML_ERROR_NOT_SUPPORTED,))
    gpu = Gpu(index, uuid, "?" if name is None else _text(name), total, used, util,
              pci_bus_id=None if pci is None else _text(pci.busId),
              compute_capability=None if cc is None else f"{cc[0]}.{cc[1]}")
    if reader.lost is None:
        migs = _migs(nvml, handle)
        gpu.mig_devices = [m for m, _ in migs]
        _processes(nvml, gpu, [handle] + [h for _, h in migs], smi_apps)
    gpu.lost, gpu.faults = reader.lost, {**reader.faults, **gpu.faults}
    return gpu


def _bus_key(bus_id: str) -> tuple[int, ...] | None:
    """"00000000:07:00.0" and "0000:07:00.0" both as (0, 7, 0, 0)."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


def _nvlinks(nvml, handles: dict[int, object], buses: dict[int, str | None]) -> tuple[Counter, Counter]:
    """(links between two GPUs, counted once, keyed (i, j) with i < j; links from each GPU to NVSwitches).
    A link whose far end NVML cannot name counts as a switch link: NVSwitches can be hidden (in VMs),
    which is how NCCL reads it too."""
    by_bus = {_bus_key(b): i for i, b in buses.items() if b}
    pairs: Counter = Counter()
    switch: Counter = Counter()
    for i, handle in handles.items():
        for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
            except nvml.NVMLError as exc:
                if _code(nvml, exc) == nvml.NVML_ERROR_NOT_SUPPORTED:
                    break  # no NVLink on this GPU
                continue
            try:
                kind = nvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
            except (nvml.NVMLError, AttributeError):
                kind = None
            if kind == nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                switch[i] += 1
                continue
            try:
                remote = by_bus.get(_bus_key(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId)))
            except nvml.NVMLError:
                remote = None
            if remote is None:
                if kind in (None, nvml.NVML_NVLINK_DEVICE_TYPE_UNKNOWN):
                    switch[i] += 1
            elif remote > i:
                pairs[(i, remote)] += 1
    return pairs, switch


def _links(nvml, handles: dict[int, object], buses: dict[int, str | None]) -> dict[tuple[int, int], str]:
    """Every pair's level, or SourceUnavailable when NVML cannot tell the PCIe part of it."""
    out = {}
    order = sorted(handles)
    for n, a in enumerate(order):
        for b in order[n + 1:]:
            try:
                code = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])
            except (nvml.NVMLError, AttributeError) as exc:
                raise SourceUnavailable(f"NVML cannot tell how GPU {a} and GPU {b} connect ({exc})") from None
            out[(a, b)] = topology.NVML_ANCESTOR.get(code, "SYS")
    pairs, switch = _nvlinks(nvml, handles, buses)
    for a, b in out:
        if pairs[(a, b)]:
            out[(a, b)] = f"NV{pairs[(a, b)]}"
        elif switch[a] and switch[b]:
            out[(a, b)] = f"NV{min(switch[a], switch[b])}"
    return out


def from_nvml(samples: int = 5, interval_s: float = 0.1) -> Inventory:
    try:
        import pynvml as nvml
    except ImportError:
        raise SourceUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise SourceUnavailable(f"NVML could not start: {exc}") from None
    try:
        inv = Inventory("nvml", "NVML", _text(nvml.nvmlSystemGetDriverVersion()))
        try:
            v = nvml.nvmlSystemGetCudaDriverVersion()
            inv.cuda_version = f"{v // 1000}.{v % 1000 // 10}"
        except nvml.NVMLError:
            pass
        handles, uuids, lost = {}, {}, {}
        for i in range(nvml.nvmlDeviceGetCount()):
            try:
                handles[i] = nvml.nvmlDeviceGetHandleByIndex(i)
                uuids[i] = _text(nvml.nvmlDeviceGetUUID(handles[i]))
            except nvml.NVMLError as exc:
                handles.pop(i, None)
                lost[i] = str(exc)
        utils = _median_utilization(nvml, handles, samples, interval_s)
        smi_apps = smi_source.ComputeApps()
        by_index = {i: _read_gpu(nvml, i, h, uuids[i], utils[i], smi_apps) for i, h in handles.items()}
        by_index.update({i: Gpu(i, "", "?", None, None, None, lost=why) for i, why in lost.items()})
        inv.gpus = [by_index[i] for i in sorted(by_index)]
        live = {g.index: handles[g.index] for g in inv.gpus if g.lost is None}
        try:
            inv.links = _links(nvml, live, {i: by_index[i].pci_bus_id for i in live})
        except SourceUnavailable as exc:
            inv.links, why = smi_source.topo_links()
            inv.notes.append(f"{exc}; {'read nvidia-smi topo -m instead' if inv.links else why}")
    finally:
        nvml.nvmlShutdown()
    return inv
