"""nvidia-smi as the source (no nvidia-ml-py), answers real drivers give included, and the
`nvidia-smi topo -m` parser against the layouts real drivers print."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, SCENARIOS, use_fake_smi
from mgpu import gpus, records, scenario, smi_source, topology

FAKE_SMI = str(ROOT / "tests" / "fakes" / "nvidia-smi")
TOPO = ROOT / "tests" / "fixtures" / "nvidia-smi-topo"


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now fails


@pytest.fixture
def smi(monkeypatch, no_nvml):
    def use(name: str, **env: str) -> None:
        use_fake_smi(monkeypatch, name, **env)
    return use


def test_without_nvidia_ml_py_nvidia_smi_is_read(smi):
    smi("4x-rtx4090-gpu2-busy")
    inv = gpus.inventory()
    assert (inv.source, inv.driver_version) == ("nvidia-smi", "550.54.15")
    assert [g.utilization_gpu for g in inv.gpus] == [0, 0, 95, 0]
    assert [(p.pid, p.name, p.used_memory_mib) for p in inv.gpus[2].processes] == [(4242, "python", 20270)]
    assert any("nvidia-ml-py is not installed" in n for n in inv.notes)
    assert any("the GPU topology is unknown" in n for n in inv.notes) and inv.links == {}


def test_pci_bus_ids_mig_instances_and_topology_come_from_nvidia_smi(smi):
    smi("2x-a100-40gb-mig")
    inv = gpus.inventory()
    assert [g.pci_bus_id for g in inv.gpus] == ["00000000:07:00.0", "00000000:0F:00.0"]
    assert [(m.name, m.uuid[:13]) for m in inv.gpus[0].mig_devices] == \
        [("3g.20gb", "MIG-5c1e0a7e-"), ("2g.10gb", "MIG-5c1e0a7e-"), ("1g.5gb", "MIG-5c1e0a7e-")]
    assert inv.gpus[0].utilization_gpu is None  # [N/A] in MIG mode


@pytest.mark.parametrize("bracketed", ["[N/A]", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]"])
def test_any_bracketed_answer_is_unknown_never_zero(smi, bracketed):
    smi("1x-gb10-unified-memory", MGPU_FAKE_SMI_MISSING=bracketed)
    gpu = gpus.inventory().gpus[0]
    assert (gpu.memory_used_mib, gpu.memory_total_mib, gpu.memory_free_mib) == (None, None, None)
    assert "memory_unknown" in gpu.faults and gpu.utilization_gpu == 3


def test_a_hanging_nvidia_smi_is_a_failed_source_and_what_it_started_is_stopped(no_nvml, monkeypatch, tmp_path):
    monkeypatch.setenv("MGPU_FAKE_SMI_HANG", "1")
    monkeypatch.setenv("MGPU_FAKE_SMI_PIDS", str(tmp_path / "pids"))
    with pytest.raises(gpus.SourceUnavailable, match="did not answer within 1 s"):
        smi_source.from_nvidia_smi(FAKE_SMI, timeout_s=1)
    child = int((tmp_path / "pids").read_text())  # the wrapper's hanging child: KILLed with its group
    deadline = time.monotonic() + 10
    while _running(child):
        assert time.monotonic() < deadline, f"nvidia-smi's child {child} still runs after the timeout"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Is the process there and not a zombie (an orphan's zombie may stay where PID 1 does not reap)?"""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_without_nvidia_ml_py_or_nvidia_smi(no_nvml, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent-dir")
    inv = gpus.inventory()
    assert inv.source == "none" and "nvidia-ml-py is not installed" in inv.detail
    assert "nvidia-smi: no such program on PATH" in inv.detail


def machine_cli(tmp_path, env: dict) -> subprocess.CompletedProcess:
    """python -m mgpu.scenario --machine in a process where import pynvml fails."""
    shadow = tmp_path / "no-nvml"
    shadow.mkdir(exist_ok=True)
    (shadow / "pynvml.py").write_text("raise ImportError('nvidia-ml-py is not installed here')\n")
    full = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT / "py")]), **env}
    return subprocess.run([sys.executable, "-m", "mgpu.scenario", "--machine"], capture_output=True, text=True,
                          env=full, timeout=60, check=False)


def test_machine_records_from_nvidia_smi_match_the_scenario(tmp_path):
    done = machine_cli(tmp_path, {"NVIDIA_SMI": FAKE_SMI,
                                  "MGPU_FAKE_SMI_SCENARIO": str(SCENARIOS / "8x-h100-2-nvlink-quads.json"),
                                  "MGPU_FAKE_SMI_TOPO": str(TOPO / "8x-h100-2-nvlink-quads.txt")})
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == records.render(scenario.load_scenario(SCENARIOS / "8x-h100-2-nvlink-quads.json"))


def test_machine_records_of_a_busy_mig_server_from_nvidia_smi(tmp_path):
    done = machine_cli(tmp_path, {"NVIDIA_SMI": FAKE_SMI,
                                  "MGPU_FAKE_SMI_SCENARIO": str(SCENARIOS / "2x-a100-40gb-mig.json")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:4] == [line for line in lines if line.startswith("mig,0,")] and len(lines) == 6
    assert lines[4] == "proc,0,5151,8998,NA"  # pid 5151 is not ours to name: user unknown
    assert lines[0].startswith("gpu,0,GPU-a1400a7e-3b1d-4f6a-9c2e-0d8b7a6f0000,NA,9037,40960,00000000:07:00.0,")


def test_machine_exit_codes_cpu_mode_and_failures(tmp_path):
    cpu = machine_cli(tmp_path, {"PATH": "/nonexistent-dir"})
    assert (cpu.returncode, cpu.stdout) == (3, "") and "no GPU can be read" in cpu.stderr
    named = machine_cli(tmp_path, {"NVIDIA_SMI": "/nonexistent/nvidia-smi"})
    assert named.returncode == 1 and "NVIDIA_SMI=/nonexistent/nvidia-smi: no such program" in named.stderr
    failed = machine_cli(tmp_path, {"NVIDIA_SMI": FAKE_SMI, "MGPU_FAKE_SMI_FAIL": "Unable to determine the device "
                                    "handle for GPU 0000:3B:00.0: GPU is lost"})
    assert (failed.returncode, failed.stdout) == (1, "") and "GPU is lost" in failed.stderr
    assert failed.stderr.count("\n") == 1


# ---------------------------------------------------------------- nvidia-smi topo -m


def test_current_driver_layout_with_escapes_nics_and_numa_columns():
    links = topology.parse_topo_matrix((TOPO / "8x-h100-2-nvlink-quads.txt").read_text())
    assert len(links) == 28 and links[(0, 3)] == "NV6" and links[(3, 4)] == "SYS" and links[(6, 7)] == "NV6"


def test_older_driver_layout_and_soc():
    text = (TOPO / "8x-pcie-older-driver.txt").read_text()
    links = topology.parse_topo_matrix(text)
    assert (links[(0, 1)], links[(0, 2)], links[(0, 4)], links[(6, 7)]) == ("PIX", "PHB", "SYS", "PIX")
    assert topology.parse_topo_matrix(text.replace("SYS", "SOC")) == links


def test_a_copy_whose_tabs_became_spaces_parses_the_same():
    text = (TOPO / "8x-h100-2-nvlink-quads.txt").read_text()
    assert topology.parse_topo_matrix(text.expandtabs(8)) == topology.parse_topo_matrix(text)


def test_one_gpu_has_no_pairs():
    text = "\t\x1b[4mGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\nGPU0\t X \t0-63\t0\t\tN/A\n"
    assert topology.parse_topo_matrix(text) == {}


@pytest.mark.parametrize("text,message", [
    ("No devices were found\n", "no header line naming GPU0"),
    ("\tGPU0\tGPU1\nGPU0\t X \tSYS\n", "no row for GPU1"),
    ("\tGPU0\tGPU1\nGPU0\t X \tSYS\nGPU1\tPIX\t X \n", "GPU0-GPU1 is SYS but GPU1-GPU0 is PIX"),
    ("\tGPU0\tGPU1\nGPU0\t X \tFAST\nGPU1\tFAST\t X \n", "GPU0-GPU1 is 'FAST', not one of"),
    ("\tGPU0\tGPU1\nGPU0\tPIX\tPIX\nGPU1\tPIX\t X \n", "does not have X on the diagonal"),
    ("\tGPU0\tGPU2\nGPU0\t X \tPIX\nGPU2\tPIX\t X \n", "GPU columns are not GPU0..GPU1"),
])
def test_matrices_mgpu_cannot_read_are_refused_with_the_reason(text, message):
    with pytest.raises(topology.TopoParseError, match=message):
        topology.parse_topo_matrix(text)


def test_levels_rank_closest_first():
    levels = ["SYS", "PIX", "NV4", "NODE", "NV12", "PHB", "PXB"]
    assert sorted(levels, key=topology.rank) == ["NV12", "NV4", "PIX", "PXB", "PHB", "NODE", "SYS"]
    with pytest.raises(ValueError, match="not a topology level"):
        topology.rank("X")
