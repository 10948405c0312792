"""Problems (each with what to do), the memory plan, and torch's view."""

import json

import pytest

from conftest import SCENARIOS, real_gpus
from mgpu import diagnose, gpus
from mgpu.diagnose import TorchView
from mgpu.visible import resolve


def setup(name, cvd=None, max_util=70, me="bob"):
    inv = gpus.load_scenario(SCENARIOS / f"{name}.json")
    vis = resolve(cvd, inv.gpus)
    return inv, vis, diagnose.problems(inv, vis, max_util, me)


def codes(found):
    return [p.code for p in found]


def test_idle_server_has_no_problem():
    assert setup("4x-rtx4090-idle")[2] == []


def test_busy_gpu_names_the_process_the_user_and_a_way_out():
    _, _, found = setup("4x-rtx4090-gpu2-busy", cvd="2,3")
    busy = next(p for p in found if p.code == "gpu_busy")
    assert busy.severity == "warning"
    for words in ("GPU 2 (cuda:0)", "95% busy", "pid 4242 python (user alice, 19.8 GiB)",
                  "Idle now: GPU 0, 1, 3", "try CUDA_VISIBLE_DEVICES=0,3"):
        assert words in busy.message
    assert codes(found) == ["gpu_busy", "hidden_gpus"]


def test_a_busy_gpu_that_is_hidden_is_not_a_problem():
    assert codes(setup("4x-rtx4090-gpu2-busy", cvd="0,1")[2]) == ["hidden_gpus"]


def test_max_util_decides_busy_but_foreign_processes_always_count():
    inv, vis, _ = setup("4x-rtx4090-gpu2-busy")
    assert "gpu_busy" in codes(diagnose.problems(inv, vis, 99, "bob"))  # alice still holds it
    assert "gpu_busy" not in codes(diagnose.problems(inv, vis, 99, "alice"))  # our own process


def test_one_visible_gpu_explains_using_single_gpu():
    _, _, found = setup("4x-rtx4090-idle", cvd="1")
    hidden = next(p for p in found if p.code == "hidden_gpus")
    assert hidden.severity == "warning"
    assert "4 GPUs present, 1 visible" in hidden.message
    assert "Using single GPU for training" in hidden.message


def test_several_visible_gpus_are_only_information():
    hidden = setup("4x-rtx4090-idle", cvd="0,1")[2][0]
    assert (hidden.code, hidden.severity) == ("hidden_gpus", "info")
    assert "Using 2 GPUs for training" in hidden.message


def test_invalid_entries_and_empty_visibility():
    found = setup("4x-rtx4090-idle", cvd="0,two,1")[2]
    bad = next(p for p in found if p.code == "invalid_visible_devices")
    assert "'two' is not a GPU index or UUID" in bad.message and "shows GPU 0" in bad.message
    empty = setup("4x-rtx4090-idle", cvd="")[2][0]
    assert (empty.code, empty.severity) == ("visible_empty", "error")
    dup = setup("4x-rtx4090-idle", cvd="1,1")[2][0]
    assert dup.code == "visible_empty" and "listed twice" in dup.message


def test_mixed_gpus_need_pci_bus_order(monkeypatch):
    inv, vis, found = setup("2x-rtx3090-2x-rtx4090")
    order = next(p for p in found if p.code == "device_order")
    assert order.severity == "warning"
    for words in ("NVIDIA GeForce RTX 3090 / NVIDIA GeForce RTX 4090", "cuda:0 = GPU 2 (NVIDIA GeForce RTX 4090)",
                  "cuda:2 = GPU 0 (NVIDIA GeForce RTX 3090)", "CUDA_VISIBLE_DEVICES=0 is GPU 2 here, not GPU 0",
                  "an estimate", "export CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        assert words in order.message
    assert vis.physical == [2, 3, 0, 1]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert setup("2x-rtx3090-2x-rtx4090")[2] == []
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    assert setup("4x-rtx4090-idle")[2] == []  # identical GPUs: the order cannot differ


def test_mixed_gpus_of_unknown_speed_are_a_guess(write_scenario):
    data = json.loads((SCENARIOS / "2x-rtx3090-2x-rtx4090.json").read_text())
    for g in data["gpus"]:
        del g["compute_capability"]
    inv = gpus.load_scenario(write_scenario(data))
    vis = resolve(None, inv.gpus)
    order = next(p for p in diagnose.problems(inv, vis, 70, "bob") if p.code == "device_order")
    assert "may be two different cards" in order.message and "cannot be told" in order.message
    assert vis.physical == [0, 1, 2, 3]


def test_a_busy_gpu_suggestion_is_in_cuda_numbers(monkeypatch, write_scenario):
    data = json.loads((SCENARIOS / "2x-rtx3090-2x-rtx4090.json").read_text())
    data["gpus"][2].update(utilization_gpu=99)  # a 4090, cuda:0 under FASTEST_FIRST
    inv = gpus.load_scenario(write_scenario(data))
    busy = next(p for p in diagnose.problems(inv, resolve(None, inv.gpus), 70, "bob") if p.code == "gpu_busy")
    assert "GPU 2 (cuda:0)" in busy.message and "Idle now: GPU 0, 1, 3; try CUDA_VISIBLE_DEVICES=1,2,3" in busy.message


def test_mig_visibility_plans_the_instance_and_names_it():
    inv = gpus.load_scenario(SCENARIOS / "2x-a100-40gb-mig.json")
    uuid = "MIG-5c1e0a7e-9b1d-5f6a-8c2e-0d8b7a6f2002"
    vis = resolve(uuid, inv.gpus)
    plan = diagnose.plan(inv, vis, 8, 512)
    assert [(r.index, r.cuda_index, r.free_mib, r.replicas, r.mig) for r in plan.rows] == [(0, 0, 9843, 1, uuid)]
    assert f"  GPU 0 {uuid} (cuda:0): 9.6 GiB free -> 1 replica" in diagnose.plan_lines(plan)
    # MIG instances are isolated: carol's work on another instance of GPU 0 does not make this one busy
    assert "gpu_busy" not in codes(diagnose.problems(inv, vis, 70, "bob"))
    assert "gpu_busy" in codes(diagnose.problems(inv, resolve("0", inv.gpus), 70, "bob"))


def test_no_driver_and_no_gpus():
    none = gpus.Inventory("none", "NVML could not start: NVML Shared Library Not Found")
    found = diagnose.problems(none, resolve(None, []), 70, "bob")
    assert codes(found) == ["no_driver"] and "NVML Shared Library Not Found" in found[0].message
    empty = gpus.Inventory("nvml", "NVML")
    assert codes(diagnose.problems(empty, resolve(None, []), 70, "bob")) == ["no_gpus"]


def test_plan_counts_replicas_per_gpu_and_in_total():
    inv, vis, _ = setup("4x-rtx4090-idle")
    plan = diagnose.plan(inv, vis, 15, 512)
    assert [r.replicas for r in plan.rows] == [1, 1, 1, 1] and plan.total == 4
    text = "\n".join(diagnose.plan_lines(plan))
    assert "4 replicas in total: 4 x 15.5 GiB = 62.0 GiB <= 94.7 GiB free on 4 GPUs" in text
    assert diagnose.plan(inv, vis, 7, 512).total == 12  # 23.7 GiB free / 7.5 GiB = 3 a GPU


def test_plan_skips_a_full_gpu_and_honours_visibility():
    inv, vis, _ = setup("4x-rtx4090-gpu2-busy", cvd="2,3")
    plan = diagnose.plan(inv, vis, 15, 512)
    assert [(r.index, r.cuda_index, r.replicas) for r in plan.rows] == [(2, 0, 0), (3, 1, 1)]
    assert plan.as_dict()["replicas"] == 1


def test_plan_with_nothing_that_fits():
    inv, vis, _ = setup("4x-rtx4090-idle")
    plan = diagnose.plan(inv, vis, 30, 512)
    assert plan.total == 0 and "no GPU has 30.5 GiB free" in diagnose.plan_lines(plan)[-1]


@pytest.mark.parametrize("view,expected", [
    (TorchView("2.13.0+cpu", None), ["torch_no_cuda"]),
    (TorchView("2.13.0", "12.4", device_count=1), ["torch_sees_fewer"]),
    (TorchView("2.13.0", "12.4", device_count=2, nccl="2.21.5"), []),
    (TorchView("2.13.0", "12.4", device_count=2, no_peer_access=[(0, 1)]), ["no_peer_access"]),
    (TorchView("not installed", error="No module named 'torch'"), ["torch_missing"]),
    (TorchView("2.13.0", "12.4", error="CUDA driver version is insufficient"), ["torch_cuda_error", "torch_sees_fewer"]),
])
def test_torch_problems(view, expected):
    inv, vis, _ = setup("4x-rtx4090-idle", cvd="0,1")
    assert codes(diagnose.torch_problems(view, vis, inv)) == expected


def test_real_torch_view_needs_no_gpu():
    if real_gpus():
        pytest.skip(f"this machine has {real_gpus()} GPU(s): the test pins torch's view of a machine without one")
    view = diagnose.torch_view()
    assert view.version.startswith("2.") and view.device_count == 0 and view.error is None
