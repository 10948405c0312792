"""Scenario files: the shipped ones load, every malformed one is refused with file and JSON path."""

import json

import pytest

from conftest import ROOT, SCENARIOS, scenario_data
from mgpu import gpus

BAD = ROOT / "tests" / "fixtures" / "bad-scenarios"


def expected_faults():
    rows = (line.split("\t") for line in (BAD / "expected.tsv").read_text().splitlines())
    return [(name, fragment) for name, fragment in rows if not name.startswith("#")]


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path):
    inv = gpus.load_scenario(path)
    assert inv.source == "scenario" and inv.detail == str(path)
    assert [g.index for g in inv.gpus] == list(range(len(inv.gpus)))
    assert all(0 <= g.memory_used_mib <= g.memory_total_mib for g in inv.gpus)


def test_shipped_scenarios_are_what_the_readme_says():
    idle = gpus.load_scenario(SCENARIOS / "4x-rtx4090-idle.json")
    assert [g.name for g in idle.gpus] == ["NVIDIA GeForce RTX 4090"] * 4
    assert all(g.utilization_gpu == 0 and not g.processes for g in idle.gpus)
    busy = gpus.load_scenario(SCENARIOS / "4x-rtx4090-gpu2-busy.json")
    assert [g.utilization_gpu for g in busy.gpus] == [0, 0, 95, 0]
    assert busy.gpus[2].processes == [gpus.GpuProcess(4242, "python", 20270, "alice")]
    a100 = gpus.load_scenario(SCENARIOS / "8x-a100-80gb.json")
    assert len(a100.gpus) == 8 and {g.memory_total_mib for g in a100.gpus} == {81920}


@pytest.mark.parametrize("name,fragment", expected_faults())
def test_malformed_scenarios_are_refused_naming_file_and_path(name, fragment):
    with pytest.raises(gpus.ScenarioError) as err:
        gpus.load_scenario(BAD / name)
    assert str(err.value).startswith(f"{BAD / name}: ")
    assert fragment in str(err.value)


def test_every_bad_fixture_is_listed():
    assert {n for n, _ in expected_faults()} == {p.name for p in BAD.glob("*.json")}


def test_missing_file(tmp_path):
    with pytest.raises(gpus.ScenarioError, match="cannot read the scenario file"):
        gpus.load_scenario(tmp_path / "nope.json")


def test_null_utilization_and_optional_fields(write_scenario):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"][1]["utilization_gpu"] = None
    del data["driver_version"]
    data["gpus"][0]["processes"] = [{"pid": 7, "name": "python"}]
    inv = gpus.load_scenario(write_scenario(data))
    assert inv.gpus[1].utilization_gpu is None and inv.driver_version is None
    assert inv.gpus[0].processes[0] == gpus.GpuProcess(7, "python", None, None)


def test_inventory_rereads_the_scenario_every_call(write_scenario, monkeypatch):
    data = scenario_data("4x-rtx4090-idle")
    path = write_scenario(data)
    monkeypatch.setenv("MGPU_FAKE_GPUS", str(path))
    assert gpus.inventory().gpus[3].utilization_gpu == 0
    data["gpus"][3]["utilization_gpu"] = 77
    path.write_text(json.dumps(data))
    assert gpus.inventory().gpus[3].utilization_gpu == 77


def test_gpus_are_sorted_by_index(write_scenario):
    data = scenario_data("4x-rtx4090-idle")
    data["gpus"].reverse()
    assert [g.index for g in gpus.load_scenario(write_scenario(data)).gpus] == [0, 1, 2, 3]
