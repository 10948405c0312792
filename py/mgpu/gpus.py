"""Which GPUs this machine has and how busy they are: one answer for the whole toolkit.

Sources, first that applies wins:
1. ``MGPU_FAKE_GPUS=<scenario.json>``: the GPUs a scenario file describes (re-read on every call);
2. NVML through ``nvidia-ml-py`` (``import pynvml``);
3. ``nvidia-smi`` CSV queries, when ``nvidia-ml-py`` is not installed;
4. none: CPU mode, with the reason.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SCENARIO_ENV = "MGPU_FAKE_GPUS"
SMI_TIMEOUT_S = 10.0


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file, the JSON path and the fault."""


@dataclass
class GpuProcess:
    pid: int
    name: str
    used_memory_mib: int | None = None
    user: str | None = None


@dataclass
class Gpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_gpu: int | None
    processes: list[GpuProcess] = field(default_factory=list)
    mig_devices: list[str] = field(default_factory=list)

    @property
    def memory_free_mib(self) -> int:
        return max(self.memory_total_mib - self.memory_used_mib, 0)


@dataclass
class Inventory:
    source: str  # "scenario" | "nvml" | "nvidia-smi" | "none"
    detail: str  # the scenario path, or why there is no GPU source
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- scenarios


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ScenarioError(f"{where}: {what}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(obj: dict, key: str, where: str, lo: int, hi: int | None = None,
               nullable: bool = False) -> int | None:
    _need(key in obj, where, f"missing key \"{key}\"")
    value = obj[key]
    if value is None and nullable:
        return None
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    ok = _is_int(value) and value >= lo and (hi is None or value <= hi)
    _need(ok, f"{where}.{key}", f"must be {allowed}{' or null' if nullable else ''}, got {json.dumps(value)}")
    return value


def _str_field(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in obj and not required:
        return None
    _need(key in obj, where, f"missing key \"{key}\"")
    _need(isinstance(obj[key], str) and obj[key] != "", f"{where}.{key}",
          f"must be a non-empty string, got {json.dumps(obj[key])}")
    return obj[key]


def _parse_process(obj: object, where: str) -> GpuProcess:
    _need(isinstance(obj, dict), where, "must be an object with pid, name, used_memory_mib")
    return GpuProcess(
        pid=_int_field(obj, "pid", where, 0),
        name=_str_field(obj, "name", where),
        used_memory_mib=_int_field(obj, "used_memory_mib", where, 0, nullable=True)
        if "used_memory_mib" in obj else None,
        user=_str_field(obj, "user", where, required=False),
    )


def _parse_gpu(obj: object, where: str) -> Gpu:
    _need(isinstance(obj, dict), where, "must be an object describing one GPU")
    total = _int_field(obj, "memory_total_mib", where, 1)
    processes = obj.get("processes", [])
    _need(isinstance(processes, list), f"{where}.processes", "must be a list")
    migs = obj.get("mig_devices", [])
    _need(isinstance(migs, list) and all(isinstance(m, str) and m.startswith("MIG-") for m in migs),
          f"{where}.mig_devices", 'must be a list of "MIG-..." UUID strings')
    return Gpu(
        index=_int_field(obj, "index", where, 0),
        uuid=_str_field(obj, "uuid", where),
        name=_str_field(obj, "name", where),
        memory_total_mib=total,
        memory_used_mib=_int_field(obj, "memory_used_mib", where, 0, total),
        utilization_gpu=_int_field(obj, "utilization_gpu", where, 0, 100, nullable=True),
        processes=[_parse_process(p, f"{where}.processes[{i}]") for i, p in enumerate(processes)],
        mig_devices=list(migs),
    )


def load_scenario(path: str | os.PathLike) -> Inventory:
    """Read and validate a scenario file; every fault is a ScenarioError naming file and JSON path."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario file ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    where = f"{path}: ."
    _need(isinstance(data, dict), path, 'the top level must be a JSON object with a "gpus" list')
    _need(isinstance(data.get("gpus"), list), f"{path}: .gpus", "must be a list of GPUs")
    gpus = [_parse_gpu(g, f"{path}: .gpus[{i}]") for i, g in enumerate(data["gpus"])]
    for key in ("index", "uuid"):
        seen = [getattr(g, key) for g in gpus]
        dupes = sorted({str(v) for v in seen if seen.count(v) > 1})
        _need(not dupes, f"{path}: .gpus[].{key}", f"must be unique, repeated: {', '.join(dupes)}")
    driver = _str_field(data, "driver_version", where, required=False)
    cuda = _str_field(data, "cuda_version", where, required=False)
    gpus.sort(key=lambda g: g.index)
    return Inventory("scenario", path, driver, cuda, gpus)


# ---------------------------------------------------------------- NVML


class SourceUnavailable(RuntimeError):
    """This source cannot answer on this machine; the message says why."""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def process_owner(pid: int) -> tuple[str | None, str | None]:
    """(name, user) of a local process from /proc, (None, None) when it is not visible here."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None, None
    try:
        return name, pwd.getpwuid(uid).pw_name
    except KeyError:
        return name, str(uid)


def _nvml_processes(nvml, handle) -> list[GpuProcess]:
    found: dict[int, GpuProcess] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            procs = getattr(nvml, getter)(handle)
        except (nvml.NVMLError, AttributeError):
            continue
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            mib = None if used is None or used >= 2**63 else int(used) // 2**20
            name, user = process_owner(p.pid)
            if name is None:  # another PID namespace (containers): NVML may still know the name
                try:
                    name = os.path.basename(_text(nvml.nvmlSystemGetProcessName(p.pid)))
                except nvml.NVMLError:
                    name = "?"
            found.setdefault(p.pid, GpuProcess(p.pid, name, mib, user))
    return sorted(found.values(), key=lambda p: p.pid)


def _nvml_memory(nvml, handle):
    try:  # v2 excludes memory the driver reserves, matching nvidia-smi on R510+ drivers
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except (TypeError, AttributeError, nvml.NVMLError):
        return nvml.nvmlDeviceGetMemoryInfo(handle)


def _nvml_migs(nvml, handle) -> list[str]:
    try:
        if nvml.nvmlDeviceGetMigMode(handle)[0] != 1:
            return []
        count = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
    except (nvml.NVMLError, AttributeError):
        return []
    uuids = []
    for i in range(count):
        try:
            uuids.append(_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))))
        except nvml.NVMLError:
            continue
    return uuids


def _median_utilization(nvml, handles, samples: int, interval_s: float) -> list[int | None]:
    readings: list[list[int]] = [[] for _ in handles]
    for n in range(samples):
        for i, handle in enumerate(handles):
            try:
                readings[i].append(int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except nvml.NVMLError:  # NotSupported on some GPUs and MIG
                pass
        if n + 1 < samples:
            time.sleep(interval_s)
    return [round(statistics.median(r)) if r else None for r in readings]


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
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            v = nvml.nvmlSystemGetCudaDriverVersion()
            cuda = f"{v // 1000}.{v % 1000 // 10}"
        except nvml.NVMLError:
            cuda = None
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        utils = _median_utilization(nvml, handles, samples, interval_s)
        gpus = []
        for i, handle in enumerate(handles):
            mem = _nvml_memory(nvml, handle)
            gpus.append(Gpu(i, _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle)),
                            int(mem.total) // 2**20, int(mem.used) // 2**20, utils[i],
                            _nvml_processes(nvml, handle), _nvml_migs(nvml, handle)))
    finally:
        nvml.nvmlShutdown()
    return Inventory("nvml", "NVML", driver, cuda, gpus)


# ---------------------------------------------------------------- nvidia-smi


def _smi(args: list[str], smi: str, timeout_s: float) -> list[list[str]]:
    try:
        done = subprocess.run([smi, *args, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"{smi} did not answer within {timeout_s:g} s (a stuck driver or a GPU "
                                "fallen off the bus can hang it; see dmesg)") from None
    if done.returncode != 0:
        why = (done.stdout + done.stderr).strip().splitlines()
        raise SourceUnavailable(f"{smi} failed (exit {done.returncode}): {why[0] if why else 'no output'}")
    return [[f.strip() for f in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _smi_int(value: str, what: str) -> int | None:
    if value.startswith("[") or value in ("N/A", ""):
        return None
    try:
        return int(float(value))
    except ValueError:
        raise SourceUnavailable(f"nvidia-smi gave {what} {value!r}, not a number") from None


def from_nvidia_smi(smi: str | None = None, timeout_s: float = SMI_TIMEOUT_S) -> Inventory:
    smi = smi or os.environ.get("NVIDIA_SMI", "nvidia-smi")
    if shutil.which(smi) is None:
        raise SourceUnavailable(f"no NVML library and no {smi} on PATH")
    fields = "index,uuid,name,memory.used,memory.total,utilization.gpu,driver_version"
    gpus, driver = [], None
    for row in _smi([f"--query-gpu={fields}"], smi, timeout_s):
        if len(row) != 7:
            raise SourceUnavailable(f"nvidia-smi gave a line of {len(row)} fields, expected 7: {', '.join(row)}")
        index, uuid, name, used, total, util, driver = row
        gpus.append(Gpu(_smi_int(index, "index"), uuid, name, _smi_int(total, "memory.total") or 0,
                        _smi_int(used, "memory.used") or 0, _smi_int(util, "utilization.gpu")))
    by_uuid = {g.uuid: g for g in gpus}
    for row in _smi(["--query-compute-apps=gpu_uuid,pid,used_memory,process_name"], smi, timeout_s):
        if len(row) >= 4 and row[0] in by_uuid:
            pid = _smi_int(row[1], "pid") or 0
            _, user = process_owner(pid)
            name = os.path.basename(",".join(row[3:]))
            by_uuid[row[0]].processes.append(GpuProcess(pid, name, _smi_int(row[2], "used_memory"), user))
    return Inventory("nvidia-smi", smi, driver, None, gpus,
                     notes=["nvidia-ml-py is not installed: read the GPUs with nvidia-smi instead"])


# ---------------------------------------------------------------- the one entry point


def inventory(samples: int = 5, interval_s: float = 0.1) -> Inventory:
    """The GPUs as the whole toolkit sees them. Raises ScenarioError for a bad scenario file."""
    scenario = os.environ.get(SCENARIO_ENV)
    if scenario:
        return load_scenario(scenario)
    try:
        return from_nvml(samples, interval_s)
    except SourceUnavailable as nvml_exc:
        if "not installed" not in str(nvml_exc):
            return Inventory("none", str(nvml_exc))
        try:
            return from_nvidia_smi()
        except SourceUnavailable as smi_exc:
            return Inventory("none", f"{nvml_exc}; {smi_exc}")
