"""The CUDA paths, checked by structure on a machine without a GPU: torch.cuda's answers are monkeypatched,
and what the trainer does with them (set_device, refusals, warnings, autocast inside DataParallel's
replica threads) is observed."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.distributed as dist

from mgpu import distributed
from mgpu.clip import CLIP
from mgpu.models import image_encoder, text_encoder
from mgpu.train_params import parse_args
from mgpu.train_setup import build_model


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `n` GPUs as torch sees it; records set_device and init_process_group calls."""
    calls: dict[str, list] = {"set_device": [], "init": []}

    def install(n: int, capability: tuple[int, int] = (8, 0), name: str = "NVIDIA A100"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(str(torch.device(d))))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or capability >= (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls["init"].append((a, kw)))
        return calls
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES",
                "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return install


def test_device_cuda_n_becomes_the_current_device(gpus):
    calls = gpus(2)
    device, dp = distributed.setup(parse_args(["--device", "cuda:1"]))
    assert (str(device), dp, calls["set_device"]) == ("cuda:1", 0, ["cuda:1"])
    with pytest.raises(distributed.SetupError, match=r"--device cuda:5: there are 2 visible GPU\(s\), cuda:0 to cuda:1"):
        distributed.setup(parse_args(["--device", "cuda:5"]))


def test_dataparallel_takes_every_visible_gpu_and_says_when_dp_is_ignored(gpus, caplog):
    gpus(3)
    assert distributed.setup(parse_args(["--dp"]))[1] == 3
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        assert distributed.setup(parse_args(["--dp", "--device", "cuda:2"])) == (torch.device("cuda:2"), 0)
    assert "--dp with --device cuda:2: DataParallel spreads over every visible GPU" in caplog.text
    gpus(0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        assert distributed.setup(parse_args(["--dp"])) == (torch.device("cpu"), 0)
    assert "--dp: ignored, there is no GPU to spread the batch over (no CUDA device visible): training on the CPU" \
        in caplog.text


def test_a_rank_started_by_hand_takes_its_rank_modulo_the_visible_gpus(gpus):
    calls = gpus(4)
    args = parse_args(["--dist-url", "tcp://127.0.0.1:1", "--world-size", "8", "--rank", "6"])
    device, _ = distributed.setup(args)
    assert str(device) == "cuda:2" and calls["set_device"] == ["cuda:2"]
    assert calls["init"][0][1]["rank"] == 6 and calls["init"][0][1]["world_size"] == 8
    assert distributed.local_rank(parse_args(["--local-rank", "1", "--rank", "6"]), 4) == 1  # the launcher's word wins


def test_a_list_of_mig_instances_is_one_cuda_device(gpus, monkeypatch):
    gpus(3)  # torch's NVML-based count can say 3 for three MIG UUIDs; CUDA enumerates only the first
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1f2e3d4c-aaaa-bbbb-cccc-000000000001,MIG-1f2e3d4c-aaaa-bbbb-cccc-2")
    assert distributed.visible_cuda_devices() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert distributed.visible_cuda_devices() == 3


def test_more_processes_than_gpus_is_an_error_naming_both_numbers(gpus, monkeypatch):
    calls = gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(distributed.SetupError) as err:
        distributed.setup(parse_args([]))
    assert "4 processes on this node (NPROC_PER_NODE / --nproc-per-node) but 2 visible GPU(s) " \
           "(CUDA_VISIBLE_DEVICES=0,1): DDP needs one GPU per process" in str(err.value)
    assert calls["set_device"] == [] and calls["init"] == []  # refused before any CUDA or NCCL call


def test_bf16_on_a_gpu_without_native_bf16_warns_and_suggests_fp16(gpus, caplog):
    gpus(1, capability=(7, 5), name="Tesla T4")
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        distributed.setup(parse_args(["--amp", "bf16"]))
    assert "--amp bf16: Tesla T4 (compute capability 7.5) has no native bfloat16" in caplog.text
    assert "use --amp fp16 (with its GradScaler)" in caplog.text
    gpus(1, capability=(8, 6), name="RTX 3090")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        distributed.setup(parse_args(["--amp", "bf16"]))
    assert "bfloat16" not in caplog.text


def test_the_forward_enters_autocast_itself_so_dataparallel_replica_threads_get_its_dtype():
    """DataParallel's parallel_apply re-enters autocast in each replica thread with only `enabled`, and a
    thread's autocast dtype defaults to float16 on CUDA. The CPU stands in: the thread enters float16
    autocast the same way; the model's own autocast must win."""
    torch.manual_seed(0)
    model = CLIP(image_encoder("starnet_s050"), text_encoder("clip:tiny"), embed_dim=16)
    seen = []
    model.image_projection.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tokens = torch.randint(1, 300, (2, 5))
    tokens[:, -1] = 49407

    def replica(dtype):
        model.autocast_dtype = dtype
        with torch.autocast("cpu", dtype=torch.float16, enabled=True):  # what the replica thread runs under
            model(torch.rand(2, 3, 32, 32), tokens)
    for dtype in (torch.bfloat16, None):
        worker = threading.Thread(target=replica, args=(dtype,))
        worker.start()
        worker.join()
    assert seen == [torch.bfloat16, torch.float16]  # without its own autocast the replica would run float16
    replicated = model._replicate_for_data_parallel()
    assert replicated.autocast_dtype is model.autocast_dtype  # DataParallel's copies carry the setting


def test_the_trainer_sets_the_models_autocast_dtype_from_amp():
    base = ["--image-encoder", "starnet_s050", "--text-encoder", "clip:tiny", "--embed-dim", "16"]
    assert build_model(parse_args([*base, "--amp", "bf16"])).autocast_dtype is torch.bfloat16
    assert build_model(parse_args([*base, "--amp", "fp16"])).autocast_dtype is torch.float16
    assert build_model(parse_args(base)).autocast_dtype is None


def test_deterministic_sets_what_bit_exact_results_need(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        distributed.make_deterministic()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
