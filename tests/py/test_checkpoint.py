"""Checkpoints round-trip between plain, DataParallel, DDP and compiled models, atomically and safely."""

import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mgpu.checkpoint import (CheckpointError, clean_state_dict, latest_checkpoint, load_model, prune_checkpoints,
                             rank_rng_state, read_checkpoint, resume_source, rng_state, save_checkpoint, save_model,
                             set_rng_state, unwrap)


class Sneaky:
    """An object whose unpickling would need this module's code: weights_only loading must refuse it."""


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def ddp_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def data_parallel(model):
    """DataParallel as --dp makes it: where CUDA is available its module must be on cuda:0 (with one GPU the
    constructor moves it there itself); without CUDA it wraps the module where it is, on the CPU."""
    return nn.DataParallel(model.to("cuda:0") if torch.cuda.is_available() else model)


def wrappers(ddp_group):
    return {"plain": lambda m: m, "dataparallel": data_parallel,
            "ddp": nn.parallel.DistributedDataParallel, "compiled": torch.compile,
            "ddp+compiled": lambda m: torch.compile(nn.parallel.DistributedDataParallel(m))}


@pytest.mark.parametrize("saver", ["plain", "dataparallel", "ddp", "compiled", "ddp+compiled"])
@pytest.mark.parametrize("loader", ["plain", "dataparallel", "ddp", "compiled"])
def test_round_trips_between_every_wrapping(tmp_path, ddp_group, saver, loader):
    wrap = wrappers(ddp_group)
    source = wrap[saver](net(0))
    path = save_model(source, tmp_path / "out dir" / "model.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in read_checkpoint(path)["model"])
    target = wrap[loader](net(1))
    report = load_model(target, path)
    assert report.missing == [] and report.unexpected == []
    for a, b in zip(unwrap(source).state_dict().values(), unwrap(target).state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())  # a DataParallel model's weights are on cuda:0 where there is CUDA


def test_wrapped_state_dicts_from_elsewhere_load_too():
    state = {f"module._orig_mod.{k}": v for k, v in net(0).state_dict().items()}
    assert set(clean_state_dict(state)) == set(net().state_dict())
    load_model(net(1), state)


def test_a_mismatch_names_the_keys():
    state = net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['2.bias'\], unexpected \['extra.weight'\]"):
        load_model(net(), state)
    report = load_model(net(), state, strict=False)
    assert report.missing == ["2.bias"] and report.unexpected == ["extra.weight"]


def test_a_crash_during_save_keeps_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = save_model(net(0), tmp_path / "model.pt")
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(net(1), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_unreadable_and_unsafe_files_are_refused(tmp_path):
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "truncated.pt")

    torch.save({"model": {}, "obj": Sneaky()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="unsafe.pt: not a readable checkpoint"):
        read_checkpoint(tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "none.pt")


def test_a_full_checkpoint_restores_optimizer_scheduler_counters_and_rng(tmp_path):
    model = net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 4)).sum().backward()
    opt.step(), sched.step()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "checkpoint_7.pt", model, step=7, epoch=2, optimizer=opt, scheduler=sched,
                           config={"lr": 0.1, "image_encoder": "starnet_s1"})
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())

    state = read_checkpoint(path)
    model2, opt2 = net(1), None
    load_model(model2, state)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    sched2.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    assert (state["step"], state["epoch"], state["config"]["image_encoder"]) == (7, 2, "starnet_s1")
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_latest_checkpoint_is_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (9, 100, 12):
        save_model(net(), tmp_path / f"checkpoint_{step}.pt")
    (tmp_path / "checkpoint_999.pt.tmp").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint_100.pt"


def test_pruning_keeps_the_newest_by_step_not_by_name_and_leaves_other_files(tmp_path):
    for step in (9, 100, 12, 2):
        save_model(net(), tmp_path / f"checkpoint_{step}.pt")
    (tmp_path / "model.pt").write_bytes(b"x")
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_100.pt", "checkpoint_12.pt", "model.pt"]


def test_resume_source_names_the_file_or_finds_the_newest(tmp_path, caplog):
    assert resume_source(None, tmp_path) is None
    with caplog.at_level("INFO", logger="mgpu"):
        assert resume_source("auto", tmp_path) is None
    assert f"no checkpoint in {tmp_path} yet; starting from scratch" in caplog.text
    save_model(net(), tmp_path / "checkpoint_4.pt")
    assert resume_source("auto", tmp_path) == tmp_path / "checkpoint_4.pt"
    assert resume_source(str(tmp_path / "checkpoint_4.pt"), "elsewhere") == tmp_path / "checkpoint_4.pt"
    with pytest.raises(CheckpointError, match=r"--resume .*/gone.pt: no such checkpoint file"):
        resume_source(str(tmp_path / "gone.pt"), tmp_path)


@pytest.fixture
def fake_cuda_generators(monkeypatch):
    """Three GPUs' generators as one-byte states (10, 11, 12); set_rng_state records (state, device)."""
    states = {i: torch.tensor([10 + i], dtype=torch.uint8) for i in range(3)}
    restored = []

    def get(device=0):
        return states[device].clone()

    def put(state, device=0):
        if device >= 1:  # as torch on a machine with one visible GPU: any other index is an error
            raise IndexError(f"no CUDA device {device}")
        restored.append((int(state[0]), device))
    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", put)
    return restored


def test_each_process_saves_the_generators_of_its_own_gpus_and_restores_what_fits(fake_cuda_generators):
    assert "cuda" not in rng_state()  # a CPU process has none
    dp = rng_state([0, 1, 2])  # DataParallel over 3 GPUs: all three are this process's
    assert [int(t[0]) for t in dp["cuda"]] == [10, 11, 12]
    set_rng_state(dp, [0])  # resumed where one GPU is visible (a sweep's job): no IndexError
    assert fake_cuda_generators == [(10, 0)]
    rank2 = rng_state([2])  # DDP rank 2 on cuda:2 saves cuda:2's state ...
    fake_cuda_generators.clear()
    set_rng_state(rank2, [0])  # ... and restores it on whichever GPU rank 2 has now
    assert fake_cuda_generators == [(12, 0)]


def test_checkpoints_keep_one_random_state_per_rank(tmp_path, fake_cuda_generators, caplog):
    per_rank = [rng_state([0]), rng_state([1])]
    path = save_checkpoint(tmp_path / "checkpoint_1.pt", net(), step=1, epoch=0, rng=per_rank)
    state = read_checkpoint(path)
    assert len(state["rng_ranks"]) == 2 and torch.equal(state["rng"]["cuda"][0], per_rank[0]["cuda"][0])
    assert int(rank_rng_state(state, 1)["cuda"][0][0]) == 11  # rank 1 continues with its own generator
    with caplog.at_level("WARNING", logger="mgpu"):
        assert int(rank_rng_state(state, 3)["cuda"][0][0]) == 10
    assert "random state of 2 process(es); rank 3 continues from rank 0's" in caplog.text
    old = {k: v for k, v in state.items() if k != "rng_ranks"}  # written before per-rank states existed
    assert int(rank_rng_state(old, 1)["cuda"][0][0]) == 10


def test_a_bert_tiny_checkpoint_from_before_mean_pooling_is_named_with_its_cause():
    from mgpu.checkpoint import CheckpointError, load_model
    from mgpu.clip import CLIP
    from mgpu.models import image_encoder, text_encoder
    from mgpu.models.text import BertSpec, BertTower

    old = CLIP(image_encoder("starnet_s050"), BertTower(BertSpec(hidden=128, layers=2, heads=2, intermediate=512)), 16)
    new = CLIP(image_encoder("starnet_s050"), text_encoder("bert:tiny-chinese"), 16)
    with pytest.raises(CheckpointError, match=r"^run/model.pt: was trained with BERT's pooler \(text.pooler.dense"
                                              r".*pools by the mean over tokens.*train it again$"):
        load_model(new, {"model": old.state_dict()}, name="run/model.pt")
