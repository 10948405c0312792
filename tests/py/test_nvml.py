"""Reading GPUs through NVML (a fake NVML patched onto pynvml) and the nvidia-smi fallback."""

import os
import sys

import pynvml
import pytest

from conftest import ROOT, SCENARIOS, scenario_data
from mgpu import gpus


def test_nvml_reads_what_nvidia_smi_shows(fake_nvml):
    nvml = fake_nvml(scenario_data("4x-rtx4090-gpu2-busy"))
    inv = gpus.inventory()
    assert (inv.source, inv.driver_version, inv.cuda_version) == ("nvml", "550.54.15", "12.4")
    assert [g.uuid for g in inv.gpus] == [g["uuid"] for g in nvml.gpus]
    busy = inv.gpus[2]
    assert (busy.name, busy.memory_used_mib, busy.memory_total_mib, busy.utilization_gpu) == \
        ("NVIDIA GeForce RTX 4090", 20582, 24564, 95)
    assert nvml.shutdowns == 1


def test_memory_is_read_with_the_v2_call(fake_nvml):
    nvml = fake_nvml(scenario_data("4x-rtx4090-idle"))
    inv = gpus.inventory()
    assert set(nvml.memory_versions) == {pynvml.nvmlMemory_v2}
    assert inv.gpus[0].memory_used_mib == 312  # v1 would say 812 (driver-reserved memory counted)


def test_utilization_is_the_median_of_samples(fake_nvml):
    nvml = fake_nvml(scenario_data("4x-rtx4090-idle"), util_sequences={0: [0, 100, 0, 0, 0], 1: [90, 95, 0, 92, 91]})
    inv = gpus.inventory(samples=5)
    assert [g.utilization_gpu for g in inv.gpus[:2]] == [0, 91]
    assert nvml.util_calls == {0: 5, 1: 5}


def test_unsupported_utilization_is_none(fake_nvml):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"][3]["utilization_gpu"] = None
    fake_nvml(data)
    assert gpus.inventory().gpus[3].utilization_gpu is None


def test_processes_merge_compute_and_graphics_and_name_foreign_pids(fake_nvml):
    data = scenario_data("4x-rtx4090-gpu2-busy")
    data["gpus"][2]["processes"].append({"pid": os.getpid(), "name": "ignored", "used_memory_mib": None})
    fake_nvml(data)
    procs = gpus.inventory().gpus[2].processes
    assert [p.pid for p in procs] == sorted([4242, os.getpid()])
    alice = next(p for p in procs if p.pid == 4242)
    me = next(p for p in procs if p.pid == os.getpid())
    assert (alice.name, alice.used_memory_mib, alice.user) == ("python", 20270, None)  # not in our /proc
    assert me.used_memory_mib is None and me.user is not None and me.name  # read from /proc


def test_mig_instances_are_listed(fake_nvml):
    data = scenario_data("8x-a100-80gb")
    data["gpus"][1]["mig_devices"] = ["MIG-11111111-2222", "MIG-33333333-4444"]
    fake_nvml(data)
    inv = gpus.inventory()
    assert inv.gpus[1].mig_devices == ["MIG-11111111-2222", "MIG-33333333-4444"]
    assert inv.gpus[0].mig_devices == []


def test_no_driver_is_cpu_mode_with_the_reason(fake_nvml):
    nvml = fake_nvml(scenario_data("4x-rtx4090-idle"))
    nvml.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    inv = gpus.inventory()
    assert inv.source == "none" and inv.gpus == []
    assert "NVML could not start" in inv.detail and "Not Found" in inv.detail


def test_the_scenario_wins_over_nvml(fake_nvml, monkeypatch):
    fake_nvml(scenario_data("8x-a100-80gb"))
    monkeypatch.setenv("MGPU_FAKE_GPUS", str(SCENARIOS / "4x-rtx4090-idle.json"))
    assert len(gpus.inventory().gpus) == 4


def test_without_nvidia_ml_py_nvidia_smi_is_read(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now fails
    monkeypatch.setenv("NVIDIA_SMI", str(ROOT / "tests" / "fakes" / "nvidia-smi"))
    monkeypatch.setenv("MGPU_FAKE_SMI_SCENARIO", str(SCENARIOS / "4x-rtx4090-gpu2-busy.json"))
    inv = gpus.inventory()
    assert (inv.source, inv.driver_version) == ("nvidia-smi", "550.54.15")
    assert [g.utilization_gpu for g in inv.gpus] == [0, 0, 95, 0]
    assert [(p.pid, p.name, p.used_memory_mib) for p in inv.gpus[2].processes] == [(4242, "python", 20270)]
    assert any("nvidia-ml-py is not installed" in n for n in inv.notes)


def test_without_nvidia_ml_py_a_hanging_nvidia_smi_is_cpu_mode_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("MGPU_FAKE_SMI_HANG", "1")
    with pytest.raises(gpus.SourceUnavailable, match="did not answer within 1 s"):
        gpus.from_nvidia_smi(str(ROOT / "tests" / "fakes" / "nvidia-smi"), timeout_s=1)


def test_without_nvidia_ml_py_or_nvidia_smi(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setenv("NVIDIA_SMI", "mgpu-no-such-nvidia-smi")
    inv = gpus.inventory()
    assert inv.source == "none" and "nvidia-ml-py is not installed" in inv.detail
