"""Shared fixtures: scenario files and a fake NVML patched onto the real pynvml module."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

# One thread a process, in pytest's own (torch reads it when first imported) and in the processes the tests
# start: the test models are tiny, and a second OpenMP thread mostly spins between their small ops, which
# costs a loaded 2-core CI machine CPU time for nothing (a test that needs another count sets its own).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "examples" / "scenarios"
MIB = 2**20


def real_gpus() -> int:
    """How many GPUs the real driver of this machine reports (0 without a driver); for the few tests
    that pin what a machine without GPUs shows, and are skipped where there are GPUs."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def scenario_data(name: str) -> dict:
    return json.loads((SCENARIOS / f"{name}.json").read_text())


@pytest.fixture
def write_scenario(tmp_path):
    """write_scenario(data) -> path of a scenario file holding data, in a folder with spaces."""
    folder = tmp_path / "scenario dir"
    folder.mkdir()

    def write(data: dict, name: str = "scenario.json") -> Path:
        path = folder / name
        path.write_text(json.dumps(data))
        return path

    return write


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MGPU_FAKE_GPUS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "MAX_UTIL", "NVIDIA_SMI"):
        monkeypatch.delenv(var, raising=False)


class FakeNvml:
    """NVML as a scenario describes it, with the answers real drivers give on bad days.

    v1 memory counts 500 MiB driver-reserved memory as used, as R510+ drivers do, so a test can tell
    whether the v2 call was made. Knobs (attributes, set before inventory() runs):
    - ``lost``: GPU indices whose every query raises GPU_IS_LOST; ``lost_handles``: indices whose
      handle cannot even be taken;
    - ``processes_api``: "v3" (a current driver), "v2" (R470: the unversioned call, which is _v3, is
      missing), "none" (neither _v3 nor _v2); ``missing_style``: how a missing entry point surfaces,
      "mismatch" (recent nvidia-ml-py's NVMLLibraryMismatchError) or "function_not_found";
    - ``dead_pids``: processes NVML lists whose name it cannot give any more; ``root_only_mig``: a GPU
      in MIG mode refuses to list its processes (NO_PERMISSION), its instances answer;
    - ``ancestors``: {(i, j): NVML_TOPOLOGY_*} and ``nvlinks``: {i: [("gpu", j) | ("switch", None) |
      ("hidden", None), ...]} one entry per active link; ``topology_error``: raise it from the
      common-ancestor call. A GPU with a memory_total_mib of null raises NOT_SUPPORTED for memory.
    """

    def __init__(self, data: dict, util_sequences: dict[int, list[int]] | None = None):
        self.data = copy.deepcopy(data)
        self.gpus = sorted(self.data["gpus"], key=lambda g: g["index"])
        for g in self.gpus:
            g["mig_devices"] = [m if isinstance(m, dict) else {"uuid": m} for m in g.get("mig_devices", [])]
        self.util_sequences = util_sequences or {}
        self.util_calls: dict[int, int] = {}
        self.memory_versions: list[object] = []
        self.init_error: int | None = None
        self.shutdowns = 0
        self.lost: set[int] = set()
        self.lost_handles: set[int] = set()
        self.processes_api = "v3"
        self.missing_style = "mismatch"
        self.process_calls: list[str] = []
        self.root_only_mig = False  # in MIG mode, only root may list the whole GPU's processes
        self.dead_pids: set[int] = set()
        self.ancestors: dict[tuple[int, int], int] = {}
        self.nvlinks: dict[int, list[tuple[str, int | None]]] = {}
        self.topology_error: int | None = None

    def _err(self, code: int):
        return pynvml.NVMLError(code)

    def _gpu(self, h):
        if h[1] in self.lost:
            raise self._err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[h[1]]

    def _missing(self):
        if self.missing_style == "mismatch":
            return pynvml.NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not "
                                                   "match the NVML lib version.")
        return self._err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    def patch(self, monkeypatch) -> "FakeNvml":
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def nvmlInit(self):
        if self.init_error is not None:
            raise self._err(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return self.data.get("driver_version", "550.54.15")

    def nvmlSystemGetCudaDriverVersion(self):
        major, minor = self.data.get("cuda_version", "12.4").split(".")
        return int(major) * 1000 + int(minor) * 10

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if i in self.lost_handles:
            raise self._err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return ("gpu", i)

    def _mig(self, h):
        return self._gpu(h)["mig_devices"][h[2]]

    def nvmlDeviceGetName(self, h):
        if h[0] == "mig":
            return f"{self._gpu(h)['name']} MIG {self._mig(h).get('name', '1g.5gb')}"
        return self._gpu(h)["name"]

    def nvmlDeviceGetUUID(self, h):
        if h[0] == "mig":
            return self._mig(h)["uuid"]
        return self._gpu(h)["uuid"]

    def nvmlDeviceGetPciInfo(self, h):
        bus = self._gpu(h).get("pci_bus_id") or f"00000000:{h[1] + 1:02X}:00.0"  # NVML always has one
        return SimpleNamespace(busId=bus.encode())

    def nvmlDeviceGetCudaComputeCapability(self, h):
        major, minor = self._gpu(h).get("compute_capability", "8.9").split(".")
        return int(major), int(minor)

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        self.memory_versions.append(version)
        g = self._mig(h) if h[0] == "mig" else self._gpu(h)
        if g.get("memory_total_mib") is None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        used = g["memory_used_mib"] + (0 if version is not None else 500)
        return SimpleNamespace(total=g["memory_total_mib"] * MIB, used=used * MIB,
                               free=(g["memory_total_mib"] - used) * MIB)

    def nvmlDeviceGetUtilizationRates(self, h):
        i = h[1]
        seq = self.util_sequences.get(i)
        if seq is not None:
            n = self.util_calls.get(i, 0)
            self.util_calls[i] = n + 1
            return SimpleNamespace(gpu=seq[min(n, len(seq) - 1)], memory=0)
        if self._gpu(h)["utilization_gpu"] is None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=self.gpus[i]["utilization_gpu"], memory=0)

    def _procs(self, h):
        if h[0] == "gpu" and self.root_only_mig and self._gpu(h)["mig_devices"]:
            raise self._err(pynvml.NVML_ERROR_NO_PERMISSION)
        if h[0] == "mig" and h[2] > 0:
            return []  # the scenario's processes all run on the first instance
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=None if p.get("used_memory_mib") is None
                                else p["used_memory_mib"] * MIB)
                for p in self._gpu(h).get("processes", [])]

    def nvmlDeviceGetComputeRunningProcesses(self, h):  # nvidia-ml-py calls the _v3 entry point here
        self.process_calls.append("v3")
        if self.processes_api != "v3":
            raise self._missing()
        return self._procs(h)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h):
        self.process_calls.append("v2")
        if self.processes_api == "none":
            raise self._err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._procs(h)

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):  # the same processes again: must be merged
        if self.processes_api != "v3":
            raise self._missing()
        return self._procs(h)[:1]

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, h):
        if self.processes_api == "none":
            raise self._err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._procs(h)[:1]

    def nvmlSystemGetProcessName(self, pid):
        for g in self.gpus:
            for p in g.get("processes", []):
                if p["pid"] == pid and pid not in self.dead_pids:
                    return f"/usr/bin/{p['name']}".encode()
        raise self._err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetMigMode(self, h):
        on = 1 if self._gpu(h).get("mig_devices") else 0
        return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7 if self._gpu(h).get("mig_devices") else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        if k >= len(self._gpu(h)["mig_devices"]):
            raise self._err(pynvml.NVML_ERROR_NOT_FOUND)  # an empty slot
        return ("mig", h[1], k)

    def nvmlDeviceGetTopologyCommonAncestor(self, h1, h2):
        if self.topology_error is not None:
            raise self._err(self.topology_error)
        a, b = sorted((h1[1], h2[1]))
        return self.ancestors.get((a, b), pynvml.NVML_TOPOLOGY_SYSTEM)

    def _link(self, h, link):
        self._gpu(h)  # a lost GPU answers nothing
        links = self.nvlinks.get(h[1])
        if not links:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if link >= len(links):
            raise self._err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]

    def nvmlDeviceGetNvLinkState(self, h, link):
        self._link(h, link)
        return pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        kind = self._link(h, link)[0]
        if kind == "hidden":
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return {"gpu": pynvml.NVML_NVLINK_DEVICE_TYPE_GPU, "switch": pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH}[kind]

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        kind, remote = self._link(h, link)
        if kind != "gpu":
            return SimpleNamespace(busId=b"00000000:C1:00.0")  # an NVSwitch, not a GPU
        return SimpleNamespace(busId=self.nvmlDeviceGetPciInfo(("gpu", remote)).busId.lower())


@pytest.fixture
def fake_nvml(monkeypatch):
    """fake_nvml(scenario_dict, util_sequences=None) -> FakeNvml patched onto pynvml; sleeps skipped."""
    from mgpu import nvml_source

    monkeypatch.setattr(nvml_source.time, "sleep", lambda s: None)

    def make(data: dict, util_sequences: dict[int, list[int]] | None = None) -> FakeNvml:
        return FakeNvml(data, util_sequences).patch(monkeypatch)

    return make


def run_check_gpus(*args: str, env: dict | None = None, python_path: list[str] | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real top-level check_gpus.py in a new process."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MGPU_FAKE_GPUS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "MAX_UTIL")}
    full_env.update(env or {})
    if python_path:
        full_env["PYTHONPATH"] = os.pathsep.join(python_path)
    return subprocess.run([sys.executable, str(ROOT / "check_gpus.py"), *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, check=False)


def use_fake_smi(monkeypatch, name: str, **env: str) -> None:
    """tests/fakes/nvidia-smi as NVIDIA_SMI, answering from examples/scenarios/NAME.json; env: more settings."""
    monkeypatch.setenv("NVIDIA_SMI", str(ROOT / "tests" / "fakes" / "nvidia-smi"))
    monkeypatch.setenv("MGPU_FAKE_SMI_SCENARIO", str(ROOT / "examples" / "scenarios" / f"{name}.json"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
