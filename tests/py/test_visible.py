"""CUDA_VISIBLE_DEVICES as CUDA reads it (the rules PyTorch's own tests pin)."""

import pytest

from mgpu.gpus import Gpu, MigDevice
from mgpu.visible import cuda_order, join_uuids, resolve


def machine(n=8, migs=None):
    migs = migs or {}
    return [Gpu(i, f"GPU-{i}aaa{i}-uuid", "NVIDIA A100", 81920, 0, 0,
                mig_devices=[MigDevice(m) for m in migs.get(i, [])]) for i in range(n)]


def mixed():
    """The 2 x RTX 3090 + 2 x RTX 4090 server: NVML (PCI) order 3090, 3090, 4090, 4090."""
    gpus = [Gpu(i, f"GPU-{i}bbb{i}", name, 24576, 0, 0, pci_bus_id=f"00000000:{i * 32 + 1:02X}:00.0",
                compute_capability=cc, multiprocessors=sm)
            for i, (name, cc, sm) in enumerate([("NVIDIA GeForce RTX 3090", "8.6", 82)] * 2
                                               + [("NVIDIA GeForce RTX 4090", "8.9", 128)] * 2)]
    return gpus


@pytest.mark.parametrize("raw,physical", [
    (None, [0, 1, 2, 3, 4, 5, 6, 7]),
    ("", []),
    ("  ", []),
    ("2,3", [2, 3]),
    ("3,2", [3, 2]),
    (" 1 , 2 ", [1, 2]),
    ("0,1,2,-1,3", [0, 1, 2]),
    ("4,3,two,one", [4, 3]),
    ("1gpu2,2ampere", [1, 2]),
    ("0,9,1", [0]),
    ("9", []),
    ("0,1,0", []),
    ("+1", [1]),
])
def test_ordinals(raw, physical):
    assert resolve(raw, machine()).physical == physical


def test_cuda_index_follows_the_listed_order():
    vis = resolve("3,1", machine(4))
    assert [vis.cuda_index(i) for i in range(4)] == [None, 1, None, 0]


def test_invalid_entries_are_named():
    vis = resolve("4,3,two,one", machine())
    assert vis.invalid == ["two", "one"] and "'two' is not a GPU index or UUID" in vis.why
    vis = resolve("0,9,1", machine())
    assert vis.invalid == ["9", "1"] and "past the last GPU (7)" in vis.why
    vis = resolve("1gpu2,2ampere", machine())
    assert vis.invalid == ["1gpu2", "2ampere"] and "read as" in vis.why


def test_a_duplicate_shows_nothing():
    vis = resolve("0,1,0", machine())
    assert vis.physical == [] and "listed twice" in vis.why


def test_uuids_full_and_unique_prefix():
    gpus = machine(4)
    assert resolve("GPU-2aaa2-uuid,GPU-0aaa0-uuid", gpus).physical == [2, 0]
    assert resolve("GPU-3", gpus).physical == [3]
    vis = resolve("GPU-1aaa1-uuid,GPU-nope", gpus)
    assert vis.physical == [1] and vis.invalid == ["GPU-nope"] and "matches no GPU" in vis.why


def test_an_ambiguous_uuid_prefix_matches_nothing():
    vis = resolve("GPU-", machine(2))
    assert vis.physical == [] and "prefix of 2 GPUs" in vis.why


def test_uuid_list_stops_at_an_ordinal():
    vis = resolve("GPU-1aaa1-uuid,2", machine(4))
    assert vis.physical == [1] and vis.invalid == ["2"]


def test_mig_only_the_first_instance_is_enumerated():
    gpus = machine(2, migs={1: ["MIG-a", "MIG-b"]})
    vis = resolve("MIG-b,MIG-a", gpus)
    assert vis.physical == [1] and vis.invalid == ["MIG-a"] and "only the first MIG" in vis.why
    assert (vis.mig, vis.mig_cuda_index("MIG-b"), vis.mig_cuda_index("MIG-a")) == ("MIG-b", 0, None)
    assert vis.cuda_index(1) is None  # the whole GPU is not a CUDA device; its MIG instance is
    assert resolve("MIG-zzz", gpus).physical == []


def test_mig_uuids_old_and_new_style():
    old = "MIG-GPU-1aaa1-uuid/2/0"
    vis = resolve(old, machine(2, migs={1: [old]}))
    assert (vis.physical, vis.mig, vis.invalid) == ([1], old, [])


def test_a_mig_list_stops_at_a_gpu_uuid():
    vis = resolve("MIG-a,GPU-0aaa0-uuid", machine(2, migs={1: ["MIG-a"]}))
    assert vis.physical == [1] and vis.invalid == ["GPU-0aaa0-uuid"]


def test_identical_gpus_keep_pci_order_whatever_cuda_device_order_says():
    assert cuda_order(machine(4), "FASTEST_FIRST").indices == [0, 1, 2, 3]
    assert cuda_order(machine(4), "FASTEST_FIRST").guess is None


def test_fastest_first_puts_newer_gpus_first_and_ordinals_follow_it():
    order = cuda_order(mixed(), "FASTEST_FIRST")
    assert order.indices == [2, 3, 0, 1] and "estimate" in order.guess
    vis = resolve("0,1", mixed(), "FASTEST_FIRST")
    assert vis.physical == [2, 3]  # CUDA's 0 and 1 are the 4090s, nvidia-smi's 2 and 3
    assert resolve("0,1", mixed(), "PCI_BUS_ID").physical == [0, 1]
    assert resolve(None, mixed(), "FASTEST_FIRST").physical == [2, 3, 0, 1]


def test_cuda_device_order_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert resolve(None, mixed()).physical == [0, 1, 2, 3]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    assert resolve(None, mixed()).physical == [2, 3, 0, 1]


def test_pci_bus_id_order_follows_the_bus_not_the_listed_index():
    gpus = mixed()
    gpus[0].pci_bus_id, gpus[3].pci_bus_id = gpus[3].pci_bus_id, gpus[0].pci_bus_id
    assert cuda_order(gpus, "PCI_BUS_ID").indices == [3, 1, 2, 0]


def test_unknown_speed_of_different_models_is_said_to_be_a_guess():
    gpus = mixed()
    gpus[0].compute_capability = None
    order = cuda_order(gpus, "FASTEST_FIRST")
    assert order.indices == [0, 1, 2, 3] and "cannot be told" in order.guess


def test_lost_gpus_are_not_enumerated():
    gpus = machine(4)
    gpus[1].lost = "GPU is lost"
    vis = resolve("1", gpus)
    assert vis.physical == [2] and cuda_order(gpus, "PCI_BUS_ID").indices == [0, 2, 3]


def test_torch_uuids_give_the_real_order():
    gpus = mixed()
    estimate = resolve(None, gpus, "FASTEST_FIRST")
    real, differs = join_uuids(estimate, ["3bbb3", "2bbb2", "0bbb0", "1bbb1"], gpus)  # torch: no "GPU-" prefix
    assert real.physical == [3, 2, 0, 1] and differs and real.order.guess is None
    same, differs = join_uuids(estimate, ["GPU-2bbb2", "GPU-3bbb3", "GPU-0bbb0", "GPU-1bbb1"], gpus)
    assert same.physical == estimate.physical and not differs
    assert join_uuids(estimate, [], gpus) == (estimate, False)
    assert join_uuids(estimate, ["ffff-unknown"], gpus) == (estimate, False)
    migs = machine(2, migs={1: ["MIG-abc"]})
    joined, _ = join_uuids(resolve("MIG-abc", migs), ["MIG-abc"], migs)
    assert (joined.physical, joined.mig) == ([1], "MIG-abc")


def test_no_gpus_at_all():
    assert resolve(None, []).physical == []
    assert "there is none" in resolve("0", []).why
