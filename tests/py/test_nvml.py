"""Reading GPUs through NVML (a fake NVML patched onto pynvml), with the answers real drivers give on
bad days: unified memory, lost GPUs, drivers older than R510, dead PIDs; then NVML's topology."""

import os

import pynvml
import pytest

from conftest import ROOT, SCENARIOS, scenario_data, use_fake_smi
from mgpu import diagnose, gpus, records, scenario, visible

TOPO = ROOT / "tests" / "fixtures" / "nvidia-smi-topo"


@pytest.fixture
def fake_smi(monkeypatch):
    """The fake nvidia-smi as NVIDIA_SMI, answering from a scenario."""
    def use(name: str, **env: str) -> None:
        use_fake_smi(monkeypatch, name, **env)
    return use


def test_nvml_reads_what_nvidia_smi_shows(fake_nvml):
    nvml = fake_nvml(scenario_data("4x-rtx4090-gpu2-busy"))
    inv = gpus.inventory()
    assert (inv.source, inv.driver_version, inv.cuda_version) == ("nvml", "550.54.15", "12.4")
    assert [g.uuid for g in inv.gpus] == [g["uuid"] for g in nvml.gpus]
    busy = inv.gpus[2]
    assert (busy.name, busy.memory_used_mib, busy.memory_total_mib, busy.utilization_gpu) == \
        ("NVIDIA GeForce RTX 4090", 20582, 24564, 95)
    assert all(g.faults == {} and g.lost is None and g.processes_known for g in inv.gpus)
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


def test_unified_memory_is_unknown_never_free(fake_nvml):
    """GB10: nvmlDeviceGetMemoryInfo raises NotSupported (v2 and v1); the GPU is still reported."""
    fake_nvml(scenario_data("1x-gb10-unified-memory"))
    inv = gpus.inventory()
    gpu = inv.gpus[0]
    assert (gpu.name, gpu.memory_total_mib, gpu.memory_used_mib) == ("NVIDIA GB10", None, None)
    assert gpu.memory_free_mib is None
    assert "Not Supported" in gpu.faults["memory_unknown"] and gpu.lost is None
    assert [p.used_memory_mib for p in gpu.processes] == [14336]
    vis = visible.resolve(None, inv.gpus)
    found = diagnose.problems(inv, vis, 70, "bob")
    assert [(p.code, p.severity) for p in found] == [("memory_unknown", "info")]
    plan = diagnose.plan(inv, vis, 1, 512)
    assert plan.total == 0 and "memory unknown -> 0 replicas" in "\n".join(diagnose.plan_lines(plan))
    assert records.render(inv).splitlines()[0] == \
        "gpu,0,GPU-6b100a7e-3b1d-4f6a-9c2e-0d8b7a6f0000,3,NA,NA,0000000F:01:00.0,NVIDIA GB10"


@pytest.mark.parametrize("where", ["lost", "lost_handles"])
def test_a_lost_gpu_is_reported_not_a_traceback(fake_nvml, where):
    nvml = fake_nvml(scenario_data("4x-rtx4090-gpu2-busy"))
    getattr(nvml, where).add(1)
    inv = gpus.inventory()
    assert [g.index for g in inv.gpus] == [0, 1, 2, 3]
    lost = inv.gpus[1]
    assert "GPU is lost" in lost.lost and lost.memory_free_mib is None
    assert inv.gpus[2].utilization_gpu == 95 and inv.gpus[2].lost is None
    out = records.render(inv)
    assert "gpu,1," not in out and out.count("gpu,") == 3
    assert records.faults(inv) == [f"GPU 1: cannot be read ({lost.lost}); left out. See nvidia-smi and dmesg"]
    vis = visible.resolve(None, inv.gpus)
    assert vis.physical == [0, 2, 3] and vis.cuda_index(2) == 1  # CUDA does not count a lost GPU
    lost_problem = next(p for p in diagnose.problems(inv, vis, 70, "bob") if p.code == "gpu_lost")
    assert lost_problem.severity == "error" and "GPU 1 cannot be read" in lost_problem.message
    assert diagnose.plan(inv, visible.resolve("0,1", inv.gpus), 1, 512).rows[1].index == 2


def test_every_gpu_lost_is_a_failed_source(fake_nvml, capsys):
    nvml = fake_nvml(scenario_data("4x-rtx4090-idle"))
    nvml.lost.update(range(4))
    assert scenario.main(["--machine"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("cannot be read") == 4


@pytest.mark.parametrize("style", ["mismatch", "function_not_found"])
def test_r470_drivers_list_processes_through_v2(fake_nvml, style):
    """nvmlDeviceGetComputeRunningProcesses calls _v3 only (driver >= 510.39)."""
    nvml = fake_nvml(scenario_data("4x-rtx4090-gpu2-busy"))
    nvml.processes_api, nvml.missing_style = "v2", style
    inv = gpus.inventory()
    assert [(p.pid, p.used_memory_mib) for p in inv.gpus[2].processes] == [(4242, 20270)]
    assert nvml.process_calls[:2] == ["v3", "v2"] and inv.gpus[2].processes_known


def test_without_v3_or_v2_processes_come_from_nvidia_smi(fake_nvml, fake_smi):
    nvml = fake_nvml(scenario_data("4x-rtx4090-gpu2-busy"))
    nvml.processes_api = "none"
    fake_smi("4x-rtx4090-gpu2-busy", MGPU_FAKE_SMI_LOG=os.devnull)
    inv = gpus.inventory()
    assert [(p.pid, p.name, p.used_memory_mib) for p in inv.gpus[2].processes] == [(4242, "python", 20270)]
    assert all(g.processes_known for g in inv.gpus) and records.faults(inv) == []


def test_nvidia_smi_is_asked_once_for_all_gpus(fake_nvml, fake_smi, tmp_path):
    nvml = fake_nvml(scenario_data("8x-a100-80gb"))
    nvml.processes_api = "none"
    fake_smi("8x-a100-80gb", MGPU_FAKE_SMI_LOG=str(tmp_path / "calls"))
    gpus.inventory()
    assert (tmp_path / "calls").read_text().splitlines() == \
        ["--query-compute-apps=gpu_uuid,pid,used_memory,process_name --format=csv,noheader,nounits"]


def test_when_nothing_lists_processes_the_gpu_is_never_called_free(fake_nvml, fake_smi):
    data = scenario_data("4x-rtx4090-gpu2-busy")
    data["gpus"][2]["utilization_gpu"] = 0  # busy by memory only: only its process list tells
    nvml = fake_nvml(data)
    nvml.processes_api = "none"
    fake_smi("4x-rtx4090-gpu2-busy", MGPU_FAKE_SMI_FAIL="NVIDIA-SMI has failed because it couldn't communicate")
    inv = gpus.inventory()
    gpu = inv.gpus[2]
    assert gpu.processes == [] and not gpu.processes_known
    why = gpu.faults["processes_unknown"]
    assert "nvmlDeviceGetComputeRunningProcesses: Function Not Found" in why and "_v2: Function Not Found" in why
    assert "couldn't communicate" in why and "it may be busy" in why
    found = diagnose.problems(inv, visible.resolve("2", inv.gpus), 70, "bob")
    unknown = [p for p in found if p.code == "processes_unknown"]
    assert len(unknown) == 4 and unknown[0].severity == "warning"
    assert "GPU 2: its processes cannot be listed" in records.faults(inv)[2]


def test_dead_and_foreign_pids_are_listed_not_dropped(fake_nvml):
    data = scenario_data("4x-rtx4090-gpu2-busy")
    data["gpus"][2]["processes"].append({"pid": os.getpid(), "name": "ignored", "used_memory_mib": None})
    data["gpus"][2]["processes"].append({"pid": 2**22 + 12345, "name": "gone", "used_memory_mib": 100})
    nvml = fake_nvml(data)
    nvml.dead_pids.add(2**22 + 12345)
    procs = gpus.inventory().gpus[2].processes
    assert [p.pid for p in procs] == sorted([4242, os.getpid(), 2**22 + 12345])
    alice, me, dead = (next(p for p in procs if p.pid == pid) for pid in (4242, os.getpid(), 2**22 + 12345))
    assert (alice.name, alice.used_memory_mib, alice.user) == ("python", 20270, None)  # not in our /proc
    assert me.used_memory_mib is None and me.user is not None and me.name  # read from /proc
    assert (dead.name, dead.user, dead.used_memory_mib) == ("?", None, 100)


def test_mig_instances_are_devices_with_names_and_memory(fake_nvml):
    fake_nvml(scenario_data("2x-a100-40gb-mig"))
    inv = gpus.inventory()
    migs = inv.gpus[0].mig_devices
    assert [m.uuid for m in migs] == [m["uuid"] for m in scenario_data("2x-a100-40gb-mig")["gpus"][0]["mig_devices"]]
    assert migs[0].name == "NVIDIA A100-SXM4-40GB MIG 3g.20gb" and migs[0].memory_free_mib == 19968 - 9011
    assert inv.gpus[1].mig_devices == [] and inv.gpus[0].utilization_gpu is None


def test_mig_processes_come_from_the_instances_when_the_gpu_refuses(fake_nvml):
    nvml = fake_nvml(scenario_data("2x-a100-40gb-mig"))
    nvml.root_only_mig = True
    gpu = gpus.inventory().gpus[0]
    assert [(p.pid, p.used_memory_mib) for p in gpu.processes] == [(5151, 8998)]
    assert gpu.processes_known and gpu.faults == {}


def test_no_driver_is_cpu_mode_with_the_reason(fake_nvml, capsys):
    nvml = fake_nvml(scenario_data("4x-rtx4090-idle"))
    nvml.init_error = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    inv = gpus.inventory()
    assert inv.source == "none" and inv.gpus == []
    assert "NVML could not start" in inv.detail and "Not Found" in inv.detail
    assert scenario.main(["--machine"]) == 3
    assert capsys.readouterr().err.startswith("no GPU can be read: NVML could not start")


def test_the_scenario_wins_over_nvml(fake_nvml, monkeypatch):
    fake_nvml(scenario_data("8x-a100-80gb"))
    monkeypatch.setenv("MGPU_FAKE_GPUS", str(SCENARIOS / "4x-rtx4090-idle.json"))
    assert len(gpus.inventory().gpus) == 4


# ---------------------------------------------------------------- topology from NVML


def quads_nvml(fake_nvml):
    """The two-quads server as NVML sees it: 18 links a GPU, 6 to each peer in its quad; a PCIe switch
    per pair (NVML_TOPOLOGY_SINGLE), NUMA nodes per quad (NODE), SYS across."""
    nvml = fake_nvml(scenario_data("8x-h100-2-nvlink-quads"))
    for a in range(8):
        nvml.nvlinks[a] = [("gpu", b) for b in range(8) if b != a and a // 4 == b // 4 for _ in range(6)]
        for b in range(a + 1, 8):
            nvml.ancestors[(a, b)] = (pynvml.NVML_TOPOLOGY_SINGLE if a // 2 == b // 2 else
                                      pynvml.NVML_TOPOLOGY_NODE if a // 4 == b // 4 else pynvml.NVML_TOPOLOGY_SYSTEM)
    return nvml


def test_machine_records_from_nvml_match_the_scenario_of_the_same_server(fake_nvml, capsys):
    quads_nvml(fake_nvml)
    assert scenario.main(["--machine"]) == 0
    out = capsys.readouterr()
    expected = records.render(scenario.load_scenario(SCENARIOS / "8x-h100-2-nvlink-quads.json"))
    assert (out.out, out.err) == (expected, "")
    assert "link,0,1,NV6" in out.out and "link,3,4,SYS" in out.out


def test_pcie_levels_from_the_common_ancestor(fake_nvml):
    nvml = fake_nvml(scenario_data("8x-h100-2-nvlink-quads"))
    codes = [pynvml.NVML_TOPOLOGY_INTERNAL, pynvml.NVML_TOPOLOGY_SINGLE, pynvml.NVML_TOPOLOGY_MULTIPLE,
             pynvml.NVML_TOPOLOGY_HOSTBRIDGE, pynvml.NVML_TOPOLOGY_NODE, pynvml.NVML_TOPOLOGY_SYSTEM]
    for b, code in enumerate(codes, start=1):
        nvml.ancestors[(0, b)] = code
    links = gpus.inventory().links
    assert [links[(0, b)] for b in range(1, 7)] == ["PIX", "PIX", "PXB", "PHB", "NODE", "SYS"]


def test_nvswitch_systems_are_nv_between_every_pair(fake_nvml):
    nvml = fake_nvml(scenario_data("8x-a100-80gb"))  # DGX A100: 12 links a GPU, all to NVSwitches
    for a in range(8):
        nvml.nvlinks[a] = [("switch", None)] * 12
    nvml.nvlinks[7] = [("hidden", None)] * 12  # in a VM NVML may not name the far end: still a switch
    links = gpus.inventory().links
    assert set(links.values()) == {"NV12"} and len(links) == 28


def test_without_nvml_topology_nvidia_smi_topo_is_read(fake_nvml, fake_smi):
    nvml = quads_nvml(fake_nvml)
    nvml.topology_error = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake_smi("8x-h100-2-nvlink-quads", MGPU_FAKE_SMI_TOPO=str(TOPO / "8x-h100-2-nvlink-quads.txt"))
    inv = gpus.inventory()
    assert inv.links == scenario.load_scenario(SCENARIOS / "8x-h100-2-nvlink-quads.json").links
    assert any("read nvidia-smi topo -m instead" in n for n in inv.notes)


def test_no_topology_anywhere_is_no_links_and_a_note(fake_nvml, fake_smi):
    nvml = quads_nvml(fake_nvml)
    nvml.topology_error = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake_smi("8x-h100-2-nvlink-quads")  # the fake answers topo -m only with MGPU_FAKE_SMI_TOPO
    inv = gpus.inventory()
    assert inv.links == {} and "link," not in records.render(inv)
    assert any("the GPU topology is unknown" in n for n in inv.notes)
