"""Processes and devices: ``setup`` starts DDP when torchrun, the legacy launcher or --distributed asks for it
and picks the device; ``announce`` says which mode runs; the small helpers work the same with and without
torch.distributed initialised."""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("mgpu.train_clip")


class SetupError(RuntimeError):
    """A device or process-group request this machine cannot meet; the trainer exits 2."""


def is_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_on() else 0


def world_size() -> int:
    return dist.get_world_size() if is_on() else 1


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order, with gradients flowing back to each owner.
    Every rank must pass the same shape (use drop_last in the sampler)."""
    if world_size() == 1:
        return t
    from torch.distributed.nn.functional import all_gather  # autograd-aware

    return torch.cat(all_gather(t), dim=0)


def setup(args) -> tuple[torch.device, int]:
    """Start DDP when torchrun / the legacy launcher / --distributed says so; pick the device.
    Returns (device, number of DataParallel GPUs or 0)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    want_ddp = args.distributed or env_world > 1 or (args.world_size or 1) > 1
    cuda = torch.cuda.is_available() and args.device != "cpu" and not args.device.startswith("cpu")
    if args.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", args.device):
        raise SetupError(f"--device {args.device}: allowed are auto, cpu, cuda, cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"--device {args.device}: this PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}; run python check_gpus.py --torch)")
    if want_ddp:
        if args.dp:
            raise SetupError("--dp and DDP exclude each other: use one process per GPU (torchrun) or --dp, not both")
        if cuda:
            torch.cuda.set_device(local_rank)
        kwargs = {}
        if args.dist_url != "env://":
            kwargs = dict(world_size=args.world_size or env_world, rank=args.rank if args.rank is not None
                          else int(os.environ.get("RANK", "0")))
        backend, timeout = "nccl" if cuda else "gloo", timedelta(seconds=args.dist_timeout)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and args.dist_url == "env://":
            # torchrun's agent store outlives a restart: without a prefix per attempt, a restarted rank can
            # read a dead worker's address and the new group never connects (seen with torch 2.13 + gloo)
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=not agent_store and rank == 0, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"mgpu/attempt_{restart}/", store),
                                    rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=args.dist_url, timeout=timeout, **kwargs)
        return torch.device(f"cuda:{local_rank}" if cuda else "cpu"), 0
    if not cuda:
        return torch.device("cpu"), 0
    device = torch.device(args.device if args.device.startswith("cuda:") else "cuda:0")
    return device, torch.cuda.device_count() if args.dp and args.device in ("auto", "cuda") else 0


def announce(device: torch.device, dp_gpus: int) -> None:
    """The seed's "Using 2 GPUs for training" line, for whichever mode this run is in."""
    world = world_size()
    if world > 1:
        log.info("Using %d %s for training (DDP, one process each, backend %s)", world,
                 "GPUs" if device.type == "cuda" else "CPU processes", dist.get_backend())
    elif dp_gpus > 1:
        log.info("Using %d GPUs for training", dp_gpus)
    elif device.type == "cuda":
        visible = torch.cuda.device_count()
        log.info("Using single GPU for training%s", f" ({visible} visible: add --dp, or start with torchrun "
                 "for DDP)" if visible > 1 else "")
    else:
        log.info("Using CPU for training (%d threads)", torch.get_num_threads())


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks (the values themselves when not distributed)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def check_replicas(model: nn.Module, device: torch.device) -> None:
    """Every rank's parameters must be identical under DDP; a per-tensor checksum compared across ranks
    says so (or names what diverged: a parameter changed outside DDP's view)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    gathered = [torch.empty_like(sums) for _ in range(world_size())]
    dist.all_gather(gathered, sums)
    names = [n for n, _ in model.named_parameters()]
    differ = sorted({names[i] for g in gathered for i in (g != sums).nonzero().flatten().tolist()})
    if differ:
        log.warning("parameters differ between ranks: %s", ", ".join(differ[:5]))
    else:
        log.info("parameters identical on all %d ranks", world_size())
