"""Scenario files: the one validator (mgpu.scenario) and its command line, `python -m mgpu.scenario`.

The shipped scenarios load; every malformed one is refused with the JSON path, by the library (with
the file) and by the command line (one stderr line, nothing on stdout, exit 2); records are exact."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SCENARIOS, scenario_data
from mgpu import gpus, scenario

BAD = ROOT / "tests" / "fixtures" / "bad-scenarios"


def expected_faults():
    rows = (line.split("\t") for line in (BAD / "expected.tsv").read_text().splitlines())
    return [(name, fragment) for name, fragment in rows if not name.startswith("#")]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "py"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mgpu.scenario", *args], capture_output=True, text=True,
                          env=full_env, timeout=60, check=False)


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path):
    inv = scenario.load_scenario(path)
    assert inv.source == "scenario" and inv.detail == str(path)
    assert [g.index for g in inv.gpus] == list(range(len(inv.gpus)))
    for g in inv.gpus:
        assert (g.memory_total_mib is None) == (g.memory_used_mib is None)
        assert g.memory_total_mib is None or 0 <= g.memory_used_mib <= g.memory_total_mib


def test_shipped_scenarios_are_what_the_docs_say():
    idle = scenario.load_scenario(SCENARIOS / "4x-rtx4090-idle.json")
    assert [g.name for g in idle.gpus] == ["NVIDIA GeForce RTX 4090"] * 4
    assert all(g.utilization_gpu == 0 and not g.processes for g in idle.gpus)
    busy = scenario.load_scenario(SCENARIOS / "4x-rtx4090-gpu2-busy.json")
    assert [g.utilization_gpu for g in busy.gpus] == [0, 0, 95, 0]
    assert busy.gpus[2].processes == [gpus.GpuProcess(4242, "python", 20270, "alice")]
    a100 = scenario.load_scenario(SCENARIOS / "8x-a100-80gb.json")
    assert len(a100.gpus) == 8 and {g.memory_total_mib for g in a100.gpus} == {81920} and not a100.links
    quads = scenario.load_scenario(SCENARIOS / "8x-h100-2-nvlink-quads.json")
    assert quads.link(0, 3) == "NV6" and quads.link(7, 4) == "NV6" and quads.link(3, 4) == "SYS"
    mig = scenario.load_scenario(SCENARIOS / "2x-a100-40gb-mig.json")
    assert [m.name for m in mig.gpus[0].mig_devices] == ["3g.20gb", "2g.10gb", "1g.5gb"]
    assert mig.gpus[0].utilization_gpu is None and mig.gpus[1].mig_devices == []
    gb10 = scenario.load_scenario(SCENARIOS / "1x-gb10-unified-memory.json")
    assert gb10.gpus[0].memory_free_mib is None and "memory_unknown" in gb10.gpus[0].faults


@pytest.mark.parametrize("name,fragment", expected_faults())
def test_malformed_scenarios_are_refused_naming_file_and_path(name, fragment):
    with pytest.raises(scenario.ScenarioError) as err:
        scenario.load_scenario(BAD / name)
    assert str(err.value).startswith(f"{BAD / name}: ")
    assert fragment in str(err.value)
    assert err.value.detail == str(err.value)[len(f"{BAD / name}: "):]


def test_the_cli_refuses_every_malformed_scenario_with_one_stderr_line():
    checked = 0
    for name, fragment in expected_faults():
        done = cli(str(BAD / name))
        assert (done.returncode, done.stdout) == (2, ""), name
        assert done.stderr.count("\n") == 1 and fragment in done.stderr, (name, done.stderr)
        assert not done.stderr.startswith(str(BAD)), "the shell adds the file name itself"
        checked += 1
    assert checked == len(list(BAD.glob("*.json")))


def test_every_bad_fixture_is_listed():
    assert {n for n, _ in expected_faults()} == {p.name for p in BAD.glob("*.json")}


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(scenario.ScenarioError, match="cannot read the scenario file"):
        scenario.load_scenario(tmp_path / "nope.json")
    done = cli(str(tmp_path / "no such.json"))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "cannot read the scenario file (No such file or directory)\n"
    done = cli(str(tmp_path))
    assert done.returncode == 2 and "cannot read the scenario file (Is a directory)" in done.stderr


def test_usage_errors_exit_2():
    assert cli().returncode == 2 and "one of the arguments FILE --machine is required" in cli().stderr
    both = cli(str(SCENARIOS / "4x-rtx4090-idle.json"), "--machine")
    assert both.returncode == 2 and "not allowed with" in both.stderr


QUADS_GPUS = [
    ("0", "GPU-4100007e-3b1d-4f6a-9c2e-0d8b7a6f0000", "00000000:18:00.0"),
    ("1", "GPU-4100017e-3b1d-4f6a-9c2e-0d8b7a6f0001", "00000000:2A:00.0"),
    ("2", "GPU-4100027e-3b1d-4f6a-9c2e-0d8b7a6f0002", "00000000:3A:00.0"),
    ("3", "GPU-4100037e-3b1d-4f6a-9c2e-0d8b7a6f0003", "00000000:5D:00.0"),
    ("4", "GPU-4100047e-3b1d-4f6a-9c2e-0d8b7a6f0004", "00000000:9A:00.0"),
    ("5", "GPU-4100057e-3b1d-4f6a-9c2e-0d8b7a6f0005", "00000000:AB:00.0"),
    ("6", "GPU-4100067e-3b1d-4f6a-9c2e-0d8b7a6f0006", "00000000:BA:00.0"),
    ("7", "GPU-4100077e-3b1d-4f6a-9c2e-0d8b7a6f0007", "00000000:DB:00.0"),
]


def quads_records() -> str:
    lines = [f"gpu,{i},{uuid},0,1,81559,{bus},NVIDIA H100 80GB HBM3" for i, uuid, bus in QUADS_GPUS]
    for a in range(8):
        for b in range(a + 1, 8):
            lines.append(f"link,{a},{b},{'NV6' if a // 4 == b // 4 else 'SYS'}")
    return "\n".join(lines) + "\n"


def test_records_of_the_two_quads_server_are_exact():
    done = cli(str(SCENARIOS / "8x-h100-2-nvlink-quads.json"))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == quads_records()


def test_records_of_mig_processes_and_unknown_memory():
    done = cli(str(SCENARIOS / "2x-a100-40gb-mig.json"))
    assert done.returncode == 0 and done.stdout.splitlines() == [
        "gpu,0,GPU-a1400a7e-3b1d-4f6a-9c2e-0d8b7a6f0000,NA,9037,40960,00000000:07:00.0,NVIDIA A100-SXM4-40GB",
        "mig,0,MIG-5c1e0a7e-9b1d-5f6a-8c2e-0d8b7a6f3001,9011,19968,3g.20gb",
        "mig,0,MIG-5c1e0a7e-9b1d-5f6a-8c2e-0d8b7a6f2002,13,9856,2g.10gb",
        "mig,0,MIG-5c1e0a7e-9b1d-5f6a-8c2e-0d8b7a6f1003,13,4864,1g.5gb",
        "proc,0,5151,8998,carol",
        "gpu,1,GPU-a1401a7e-3b1d-4f6a-9c2e-0d8b7a6f0001,0,4,40960,00000000:0F:00.0,NVIDIA A100-SXM4-40GB",
        "link,0,1,NV12",
    ]
    gb10 = cli(str(SCENARIOS / "1x-gb10-unified-memory.json"))
    assert gb10.stdout.splitlines() == [
        "gpu,0,GPU-6b100a7e-3b1d-4f6a-9c2e-0d8b7a6f0000,3,NA,NA,0000000F:01:00.0,NVIDIA GB10",
        "proc,0,6161,14336,dave"]
    busy = cli(str(SCENARIOS / "4x-rtx4090-gpu2-busy.json")).stdout.splitlines()
    assert busy[2:4] == ["gpu,2,GPU-5c1e2a7e-3b1d-4f6a-9c2e-0d8b7a6f0002,95,20582,24564,NA,NVIDIA GeForce RTX 4090",
                         "proc,2,4242,20270,alice"]


def test_records_in_index_order_and_unknown_process_fields(write_scenario):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"].reverse()
    data["gpus"][0]["processes"] = [{"pid": 7, "name": "a, b"}]  # GPU 3; a process name may hold a comma
    done = cli(str(write_scenario(data)))
    lines = done.stdout.splitlines()
    assert [line.split(",")[1] for line in lines] == ["0", "1", "2", "3", "3"]
    assert lines[-1] == "proc,3,7,NA,NA"


def test_the_cli_imports_neither_torch_nor_nvml():
    probe = ("import sys; sys.argv = ['x', {path!r}]; from mgpu import scenario; scenario.main();"
             "print(sorted(m for m in ('torch', 'pynvml', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe.format(path=str(SCENARIOS / "8x-a100-80gb.json"))],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "py")},
                          check=False)
    assert done.stdout.splitlines()[-1] == "[]", done.stderr


def test_null_utilization_memory_and_optional_fields(write_scenario):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"][1]["utilization_gpu"] = None
    data["gpus"][2].update(memory_total_mib=None, memory_used_mib=None)
    data["gpus"][3].update(memory_total_mib=None, memory_used_mib=5)  # used known, total not: still unknown free
    del data["driver_version"]
    data["gpus"][0]["processes"] = [{"pid": 7, "name": "python"}]
    inv = scenario.load_scenario(write_scenario(data))
    assert inv.gpus[1].utilization_gpu is None and inv.driver_version is None
    assert inv.gpus[0].processes[0] == gpus.GpuProcess(7, "python", None, None)
    assert inv.gpus[2].memory_free_mib is None and inv.gpus[3].memory_free_mib is None
    assert inv.gpus[0].memory_free_mib == 24564 - 312


def test_mig_devices_as_strings_or_objects(write_scenario):
    data = scenario_data("8x-a100-80gb")
    data["gpus"][1]["mig_devices"] = ["MIG-GPU-a1001a7e-3b1d-4f6a-9c2e-0d8b7a6f0001/1/0",
                                      {"uuid": "MIG-77", "name": "1g.10gb", "memory_total_mib": 9728,
                                       "memory_used_mib": 13}]
    migs = scenario.load_scenario(write_scenario(data)).gpus[1].mig_devices
    assert [m.uuid for m in migs] == ["MIG-GPU-a1001a7e-3b1d-4f6a-9c2e-0d8b7a6f0001/1/0", "MIG-77"]
    assert (migs[0].name, migs[1].memory_free_mib) == (None, 9715)


def topology_of(write_scenario, n: int, topo: dict) -> dict:
    data = scenario_data("8x-a100-80gb")
    data["gpus"] = data["gpus"][:n]
    data["topology"] = topo
    return scenario.load_scenario(write_scenario(data)).links


def test_topology_levels_closest_group_wins(write_scenario):
    links = topology_of(write_scenario, 8, {
        "pcie_switch": [[0, 1], [4, 5]], "pcie_tree": [[0, 1, 2], [4, 5, 6]],
        "host_bridge": [[0, 1, 2, 3], [4, 5, 6, 7]], "numa": [[0, 1, 2, 3, 4, 5, 6, 7]]})
    assert (links[(0, 1)], links[(0, 2)], links[(2, 3)], links[(3, 4)], links[(4, 5)]) == \
        ("PIX", "PXB", "PHB", "NODE", "PIX")
    assert len(links) == 28


def test_topology_overlapping_nvlink_groups_as_a_dgx1_cube_mesh(write_scenario):
    # DGX-1 (V100): quads 0-3 and 4-7 fully linked, plus one bridge between partners; 0-1 doubled
    links = topology_of(write_scenario, 8, {"nvlink": [
        [0, 1, 2, 3], [4, 5, 6, 7], [0, 4], [1, 5], [2, 6], [3, 7], {"gpus": [0, 1], "links": 2}],
        "numa": [[0, 1, 2, 3], [4, 5, 6, 7]]})
    assert (links[(0, 1)], links[(0, 2)], links[(0, 4)], links[(0, 5)], links[(1, 4)]) == \
        ("NV2", "NV1", "NV1", "SYS", "SYS")


def test_no_shared_group_is_sys_and_no_topology_prints_no_links(write_scenario):
    assert topology_of(write_scenario, 3, {"pcie_switch": [[0, 1]]}) == \
        {(0, 1): "PIX", (0, 2): "SYS", (1, 2): "SYS"}
    assert topology_of(write_scenario, 2, {}) == {(0, 1): "SYS"}
    assert "link," not in cli(str(SCENARIOS / "4x-rtx4090-idle.json")).stdout


@pytest.mark.parametrize("topo,fragment", [
    ([[0, 1]], ".topology: must be an object with nvlink"),
    ({"numa": {"0": [0]}}, ".topology.numa: must be a list of GPU groups"),
    ({"numa": [[0, 0]]}, ".topology.numa[0]: must be unique, repeated: 0"),
    ({"numa": [["0"]]}, ".topology.numa[0]: must be a list of at least 1 GPU indices"),
    ({"nvlink": [{"gpus": [0, 1], "links": 0}]}, ".topology.nvlink[0].links: must be an integer from 1 to 64"),
    ({"nvlink": [{"members": [0, 1]}]}, '.topology.nvlink[0]: unknown key "members"'),
    ({"pcie_switch": [[0, 1]], "host_bridge": [[0], [1]]},
     ".topology.pcie_switch[0]: GPUs 0, 1 are behind one PCIe switch, so they must be on one PCIe host bridge too"),
    ({"pcie_switch": [[0, 1]], "numa": [[0]]}, "must be in one NUMA node too"),
])
def test_topology_faults_name_the_path(write_scenario, topo, fragment):
    data = scenario_data("4x-rtx4090-idle")
    data["topology"] = topo
    with pytest.raises(scenario.ScenarioError) as err:
        scenario.load_scenario(write_scenario(data))
    assert fragment in str(err.value)


def test_inventory_rereads_the_scenario_every_call(write_scenario, monkeypatch):
    data = scenario_data("4x-rtx4090-idle")
    path = write_scenario(data)
    monkeypatch.setenv("MGPU_FAKE_GPUS", str(path))
    assert gpus.inventory().gpus[3].utilization_gpu == 0
    data["gpus"][3]["utilization_gpu"] = 77
    path.write_text(json.dumps(data))
    assert gpus.inventory().gpus[3].utilization_gpu == 77


def test_gpus_are_sorted_by_index_and_the_old_names_still_work(write_scenario):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"].reverse()
    assert [g.index for g in gpus.load_scenario(write_scenario(data)).gpus] == [0, 1, 2, 3]
    assert gpus.ScenarioError is scenario.ScenarioError


def test_one_pci_device_spelt_two_ways_is_a_duplicate(write_scenario):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"][0]["pci_bus_id"] = "0000:1b:00.0"
    data["gpus"][1]["pci_bus_id"] = "00000000:1B:00.0"
    with pytest.raises(scenario.ScenarioError, match=r"\.gpus\[\]\.pci_bus_id: must be unique"):
        scenario.load_scenario(write_scenario(data))


@pytest.mark.parametrize("value", ["0", "-1", "x", "101"])
def test_machine_samples_are_validated(value):
    done = cli("--machine", "--samples", value)
    assert done.returncode == 2 and f"must be an integer from 1 to 100, got '{value}'" in done.stderr
