"""CUDA_VISIBLE_DEVICES as CUDA reads it (the rules PyTorch's own tests pin)."""

import pytest

from mgpu.gpus import Gpu
from mgpu.visible import resolve


def machine(n=8, migs=None):
    migs = migs or {}
    return [Gpu(i, f"GPU-{i}aaa{i}-uuid", "NVIDIA A100", 81920, 0, 0, mig_devices=migs.get(i, []))
            for i in range(n)]


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
    assert resolve("MIG-zzz", gpus).physical == []


def test_no_gpus_at_all():
    assert resolve(None, []).physical == []
    assert "there is none" in resolve("0", []).why
