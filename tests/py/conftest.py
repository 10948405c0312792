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

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "examples" / "scenarios"
MIB = 2**20


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
    """NVML as a scenario describes it. v1 memory counts 500 MiB driver-reserved memory as used, as
    R510+ drivers do, so a test can tell whether the v2 call was made."""

    def __init__(self, data: dict, util_sequences: dict[int, list[int]] | None = None):
        self.data = copy.deepcopy(data)
        self.gpus = sorted(self.data["gpus"], key=lambda g: g["index"])
        self.util_sequences = util_sequences or {}
        self.util_calls: dict[int, int] = {}
        self.memory_versions: list[object] = []
        self.init_error: int | None = None
        self.shutdowns = 0

    def _err(self, code: int):
        return pynvml.NVMLError(code)

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
        return ("gpu", i)

    def nvmlDeviceGetName(self, h):
        return self.gpus[h[1]]["name"]

    def nvmlDeviceGetUUID(self, h):
        if h[0] == "mig":
            return self.gpus[h[1]]["mig_devices"][h[2]]
        return self.gpus[h[1]]["uuid"]

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        self.memory_versions.append(version)
        g = self.gpus[h[1]]
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
        if self.gpus[i]["utilization_gpu"] is None:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=self.gpus[i]["utilization_gpu"], memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=None if p.get("used_memory_mib") is None
                                else p["used_memory_mib"] * MIB)
                for p in self.gpus[h[1]].get("processes", [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):  # the same processes again: must be merged
        return self.nvmlDeviceGetComputeRunningProcesses(h)[:1]

    def nvmlSystemGetProcessName(self, pid):
        for g in self.gpus:
            for p in g.get("processes", []):
                if p["pid"] == pid:
                    return f"/usr/bin/{p['name']}".encode()
        raise self._err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetMigMode(self, h):
        on = 1 if self.gpus[h[1]].get("mig_devices") else 0
        return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return len(self.gpus[h[1]].get("mig_devices", []))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        return ("mig", h[1], k)


@pytest.fixture
def fake_nvml(monkeypatch):
    """fake_nvml(scenario_dict, util_sequences=None) -> FakeNvml patched onto pynvml; sleeps skipped."""
    from mgpu import gpus

    monkeypatch.setattr(gpus.time, "sleep", lambda s: None)

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
