"""The GPUs as ``nvidia-smi`` prints them: the source when ``nvidia-ml-py`` is missing, and the fallback
for what NVML cannot answer (processes on drivers older than R510, topology).

Every field nvidia-smi prints in brackets (``[N/A]``, ``[Not Supported]``, ``[Unknown Error]``,
``[Insufficient Permissions]``, ...) is unknown (None), never 0. ``NVIDIA_SMI`` names the program.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

from . import topology
from .gpus import Gpu, GpuProcess, Inventory, MigDevice, SourceUnavailable, process_owner

SMI_TIMEOUT_S = 10.0
GPU_FIELDS = "index,uuid,name,memory.used,memory.total,utilization.gpu,pci.bus_id,driver_version"
APP_FIELDS = "gpu_uuid,pid,used_memory,process_name"
_LIST_GPU = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[^)\s]+)\)")
_LIST_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)\s]+)\)")


class ProgramMissing(SourceUnavailable):
    """There is no nvidia-smi to run (named by NVIDIA_SMI, or on PATH)."""


def smi_program() -> str:
    return os.environ.get("NVIDIA_SMI", "nvidia-smi")


def _run(args: list[str], smi: str, timeout_s: float) -> str:
    if shutil.which(smi) is None:
        named = "NVIDIA_SMI=" if "NVIDIA_SMI" in os.environ else ""
        raise ProgramMissing(f"{named}{smi}: no such program" + ("" if named else " on PATH"))
    # In a session (and process group) of its own, so that a timeout or Ctrl-C stops what it started too:
    # nvidia-smi is often a wrapper script (containers, modules), whose child would live on, orphaned.
    proc = subprocess.Popen([smi, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException as e:
        _stop_group(proc)
        if isinstance(e, subprocess.TimeoutExpired):
            raise SourceUnavailable(f"{smi} did not answer within {timeout_s:g} s (a stuck driver or a GPU "
                                    "fallen off the bus can hang it; see dmesg)") from None
        raise
    if proc.returncode != 0:
        why = (out + err).strip().splitlines()
        raise SourceUnavailable(f"{smi} failed (exit {proc.returncode}): {why[0] if why else 'no output'}")
    return out


def _stop_group(proc: subprocess.Popen) -> None:
    """KILL the group of a process that did not answer, and collect it without waiting for good: a process
    stuck in the driver (state D) dies only when the driver lets go."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass


def _csv(args: list[str], smi: str, timeout_s: float) -> list[list[str]]:
    out = _run([*args, "--format=csv,noheader,nounits"], smi, timeout_s)
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def value(text: str, what: str) -> int | None:
    """A number nvidia-smi printed, or None for any bracketed answer or N/A."""
    if text.startswith("[") or text in ("N/A", ""):
        return None
    try:
        return int(float(text))
    except ValueError:
        raise SourceUnavailable(f"nvidia-smi gave {what} {text!r}, not a number") from None


def _text(text: str) -> str | None:
    return None if text.startswith("[") or text in ("N/A", "") else text


def _app(row: list[str]) -> GpuProcess:
    pid = value(row[1], "pid") or 0
    _, user = process_owner(pid)
    return GpuProcess(pid, os.path.basename(",".join(row[3:])) or "?", value(row[2], "used_memory"), user)


class ComputeApps:
    """``--query-compute-apps``, asked at most once, for GPUs whose processes NVML cannot list."""

    def __init__(self, smi: str | None = None, timeout_s: float = SMI_TIMEOUT_S):
        self.smi, self.timeout_s = smi or smi_program(), timeout_s
        self.by_uuid: dict[str, list[GpuProcess]] | None = None
        self.error = ""

    def for_gpu(self, uuid: str) -> list[GpuProcess] | None:
        """The GPU's compute processes; None when nvidia-smi cannot list them (see ``error``)."""
        if self.by_uuid is None and not self.error:
            try:
                rows = _csv([f"--query-compute-apps={APP_FIELDS}"], self.smi, self.timeout_s)
                self.by_uuid = {}
                for row in rows:
                    if len(row) >= 4:
                        self.by_uuid.setdefault(row[0], []).append(_app(row))
            except SourceUnavailable as exc:
                self.error = f"nvidia-smi --query-compute-apps: {exc}"
        return None if self.by_uuid is None else self.by_uuid.get(uuid, [])


def mig_devices(smi: str, timeout_s: float) -> dict[int, list[MigDevice]]:
    """MIG instances per GPU index from ``nvidia-smi -L`` ("  MIG 3g.40gb  Device  0: (UUID: MIG-...)")."""
    out: dict[int, list[MigDevice]] = {}
    current = None
    for line in _run(["-L"], smi, timeout_s).splitlines():
        gpu, mig = _LIST_GPU.match(line), _LIST_MIG.match(line)
        if gpu:
            current = int(gpu.group(1))
        elif mig and current is not None:
            out.setdefault(current, []).append(MigDevice(mig.group(2), mig.group(1)))
    return out


def topo_links(smi: str | None = None, timeout_s: float = SMI_TIMEOUT_S) -> tuple[dict[tuple[int, int], str], str]:
    """(links from ``nvidia-smi topo -m``, "") or ({}, why they are unknown)."""
    smi = smi or smi_program()
    try:
        return topology.parse_topo_matrix(_run(["topo", "-m"], smi, timeout_s)), ""
    except SourceUnavailable as exc:
        return {}, f"the GPU topology is unknown: {exc}"
    except topology.TopoParseError as exc:
        return {}, f"the GPU topology is unknown: {smi} topo -m printed a matrix mgpu cannot read ({exc})"


def from_nvidia_smi(smi: str | None = None, timeout_s: float = SMI_TIMEOUT_S) -> Inventory:
    smi = smi or smi_program()
    gpus, driver = [], None
    width = len(GPU_FIELDS.split(","))
    for row in _csv([f"--query-gpu={GPU_FIELDS}"], smi, timeout_s):
        if len(row) != width:
            raise SourceUnavailable(f"nvidia-smi gave a line of {len(row)} fields, expected {width}: {', '.join(row)}")
        index, uuid, name, used, total, util, bus, driver = row
        gpus.append(Gpu(value(index, "index") or 0, uuid, name, value(total, "memory.total"),
                        value(used, "memory.used"), value(util, "utilization.gpu"), pci_bus_id=_text(bus)))
    inv = Inventory("nvidia-smi", smi, _text(driver or ""), None, gpus,
                    notes=["nvidia-ml-py is not installed: read the GPUs with nvidia-smi instead"])
    apps = ComputeApps(smi, timeout_s)
    for gpu in gpus:
        listed = apps.for_gpu(gpu.uuid)
        gpu.processes = sorted(listed or [], key=lambda p: p.pid)
        if listed is None:
            gpu.processes_known = False
            gpu.faults["processes_unknown"] = (f"its processes cannot be listed ({apps.error}): it may be busy "
                                               "although no process is shown")
        if gpu.memory_total_mib is None:
            gpu.faults["memory_unknown"] = ("memory is not reported by nvidia-smi, as on unified-memory systems such "
                                            "as GB10: its free memory is unknown, so no memory requirement counts "
                                            "as met there")
    try:
        migs = mig_devices(smi, timeout_s)
    except SourceUnavailable as exc:
        migs = {}
        inv.notes.append(f"MIG instances are unknown: {smi} -L failed ({exc})")
    for gpu in gpus:
        gpu.mig_devices = migs.get(gpu.index, [])
    inv.links, why = topo_links(smi, timeout_s)
    if why and len(gpus) > 1:
        inv.notes.append(why)
    return inv
