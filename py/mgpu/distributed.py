"""Processes and devices: ``setup`` starts DDP when torchrun, the legacy launcher or --distributed asks for it
and picks the device; ``announce`` says which mode runs; the small helpers work the same with and without
torch.distributed initialised."""

from __future__ import annotations

import ctypes
import io
import logging
import os
import re
import signal
import sys
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


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of its own piece, summed over every rank's
    loss (what torch.distributed.nn.functional.all_gather does; that one warns on every run that it is
    deprecated, and its suggested replacement is a private module)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss reaches every piece
        return grad[dist.get_rank()]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' tensors concatenated in rank order, with gradients flowing back to each owner.
    Every rank must pass the same shape (use drop_last in the sampler)."""
    if world_size() == 1:
        return t
    return _GatherWithGrad.apply(t).flatten(0, 1)


def stop_with_agent() -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set) each worker leads a session of its own, so nothing stops it
    when the agent is killed (SIGKILL, the OOM killer): it would train on as an orphan, holding its GPU.
    Ask the kernel for SIGTERM when the agent ends (Linux prctl PR_SET_PDEATHSIG); the loop then stops at
    its next check step, with a checkpoint. The agent starts its workers from its main thread, whose end
    is the agent's. A worker whose agent died before this request stops at once: torchrun's own children
    lead their sessions (start_new_session), and such a one whose parent is no Python process (a reaper
    took it: init, tini, systemd) has lost its agent. A program between torchrun and the trainer (torchrun
    --no-python nsys ...) leaves the trainer outside that rule."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getsid(0) != os.getpid():  # not started by the agent itself
        return
    parent = os.getppid()
    try:
        if "python" in os.path.basename(os.readlink(f"/proc/{parent}/exe")):
            return
    except OSError:
        return  # another user's process: it cannot be told apart, so it is taken for the agent
    print(f"mgpu.train_clip: torchrun's agent is gone (this process's parent is now pid {parent}): stopping",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def visible_cuda_devices() -> int:
    """The CUDA devices this process can use: torch's count, except that a list of MIG instances counts as
    one (CUDA enumerates only the first MIG instance of CUDA_VISIBLE_DEVICES; torch's NVML-based count,
    PYTORCH_NVML_BASED_CUDA_CHECK=1, does not know that)."""
    if not torch.cuda.is_available():
        return 0
    count = torch.cuda.device_count()
    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip().startswith("MIG-"):
        return min(count, 1)
    return count


def local_rank(args, cuda_devices: int) -> int:
    """This process's index on its node: --local-rank (the legacy launcher), LOCAL_RANK (torchrun), else
    the global rank modulo the visible GPUs (--dist-url tcp://... --rank r started by hand or a script)."""
    if args.local_rank is not None:
        return args.local_rank
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", "0"))
    return rank % cuda_devices if cuda_devices else 0


def _check_gpus_per_rank(local: int, cuda_devices: int) -> None:
    """One process per GPU: NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), and a rank past
    the last GPU fails in set_device ("invalid device ordinal"). Say so before either happens."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if per_node > cuda_devices:
        raise SetupError(f"{per_node} processes on this node (NPROC_PER_NODE / --nproc-per-node) but {cuda_devices} "
                         f"visible GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): "
                         f"DDP needs one GPU per process; start {cuda_devices} process(es) or make more GPUs visible")
    if local >= cuda_devices:
        raise SetupError(f"local rank {local} has no GPU: {cuda_devices} visible "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
                         "DDP needs one GPU per process")


def make_deterministic() -> None:
    """--deterministic: what bit-exact results on a GPU need (docs/training.md). Before any CUDA work:
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle."""
    config = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if config not in (":4096:8", ":16:8"):
        log.warning("--deterministic: CUBLAS_WORKSPACE_CONFIG=%s; cuBLAS is deterministic only with :4096:8 or :16:8",
                    config)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _check_bf16(args, device: torch.device) -> None:
    """bf16 autocast on a GPU older than Ampere is emulated: it runs, slowly. Say so, and what to use."""
    if args.amp != "bf16" or device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False):
        return
    major, minor = torch.cuda.get_device_capability(device)
    log.warning("--amp bf16: %s (compute capability %d.%d) has no native bfloat16 (Ampere, 8.0, and newer have): "
                "it is emulated and slow; use --amp fp16 (with its GradScaler)", torch.cuda.get_device_name(device),
                major, minor)


def _init_process_group(args, cuda: bool) -> None:
    kwargs = {}
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
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


def setup(args) -> tuple[torch.device, int]:
    """Start DDP when torchrun / the legacy launcher / --distributed says so; pick the device and make it
    current (torch.cuda.set_device, so nothing else, e.g. the DataLoader's pin-memory thread, opens a
    context on GPU 0). Returns (device, number of DataParallel GPUs or 0)."""
    if args.deterministic:
        make_deterministic()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    want_ddp = args.distributed or env_world > 1 or (args.world_size or 1) > 1
    if args.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", args.device):
        raise SetupError(f"--device {args.device}: allowed are auto, cpu, cuda, cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"--device {args.device}: this PyTorch sees no CUDA device "
                         f"(torch {torch.__version__}; run python check_gpus.py --torch)")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    count = visible_cuda_devices() if cuda else 0
    if args.dp and not cuda:
        log.warning("--dp: ignored, there is no GPU to spread the batch over (%s): training on the CPU",
                    "--device cpu" if args.device == "cpu" else "no CUDA device visible")
    if want_ddp:
        if args.dp:
            raise SetupError("--dp and DDP exclude each other: use one process per GPU (torchrun) or --dp, not both")
        local = local_rank(args, count)
        device = torch.device("cpu")
        if cuda:
            _check_gpus_per_rank(local, count)
            device = torch.device(f"cuda:{local}")
            torch.cuda.set_device(device)
        _init_process_group(args, cuda)
        _check_bf16(args, device)
        return device, 0
    if not cuda:
        return torch.device("cpu"), 0
    device = torch.device(args.device if args.device.startswith("cuda:") else "cuda:0")
    if device.index >= count:
        raise SetupError(f"--device {args.device}: there are {count} visible GPU(s), cuda:0 to cuda:{count - 1}")
    torch.cuda.set_device(device)
    _check_bf16(args, device)
    if args.dp and args.device.startswith("cuda:"):
        log.warning("--dp with --device %s: DataParallel spreads over every visible GPU; choose them with "
                    "CUDA_VISIBLE_DEVICES instead. Training on %s alone", args.device, args.device)
        return device, 0
    return device, count if args.dp else 0


def announce(device: torch.device, dp_gpus: int) -> None:
    """The "Using 2 GPUs for training" line users know, for whichever mode this run is in."""
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


def all_gather_state(state):
    """[rank 0's state, rank 1's, ...] on every rank (a list of one when not distributed). state: what
    torch.save writes and torch.load(weights_only=True) reads (tensors, numbers, strings, lists, dicts);
    it travels as torch.save bytes, since all_gather_object cannot unpickle tensors in torch 2.13."""
    if world_size() == 1:
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    out = [None] * world_size()
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(data), map_location="cpu", weights_only=True) for data in out]


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
