"""Explain what a user on this machine needs to know: problems (each with what to do) and memory plans."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .gpus import Gpu, Inventory
from .visible import Visibility

SEVERITIES = ("info", "warning", "error")  # only warnings and errors change check_gpus' exit code


@dataclass
class Problem:
    code: str
    severity: str
    message: str


def gib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB"


def _gpu_list(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


def is_busy(gpu: Gpu, max_util: int, me: str) -> bool:
    """Too busy to start work on: utilization above max_util, or another user's process on it."""
    foreign = [p for p in gpu.processes if p.user not in (None, me)]
    return (gpu.utilization_gpu or 0) > max_util or bool(foreign)


def _describe_processes(gpu: Gpu, me: str) -> str:
    parts = []
    for p in gpu.processes:
        who = "yours" if p.user == me else (f"user {p.user}" if p.user else "user unknown")
        mem = f", {gib(p.used_memory_mib)}" if p.used_memory_mib is not None else ""
        parts.append(f"pid {p.pid} {p.name} ({who}{mem})")
    return "; ".join(parts)


def _suggest(inv: Inventory, vis: Visibility, max_util: int, me: str) -> str:
    """A CUDA_VISIBLE_DEVICES with as many GPUs as now, idle ones first among those already chosen."""
    idle = [g.index for g in inv.gpus if not is_busy(g, max_util, me)]
    keep = [i for i in vis.physical if i in idle]
    extra = [i for i in idle if i not in keep]
    pick = sorted((keep + extra)[: max(len(vis.physical), 1)])
    if not pick:
        return "No GPU is idle right now: wait (run_train_clip.sh waits for you), or ask the owners"
    return f"Idle now: GPU {_gpu_list(idle)}; try CUDA_VISIBLE_DEVICES={','.join(map(str, pick))}"


def _visibility_problems(inv: Inventory, vis: Visibility) -> list[Problem]:
    out: list[Problem] = []
    n_all, n_vis = len(inv.gpus), len(vis.physical)
    if vis.raw is not None and vis.why and n_vis == 0:
        out.append(Problem("visible_empty", "error",
                           f"CUDA_VISIBLE_DEVICES={vis.raw!r} shows no GPU: {vis.why}. PyTorch will run on "
                           "the CPU. List GPUs by index (nvidia-smi's numbers), e.g. CUDA_VISIBLE_DEVICES=0,1"))
    elif vis.invalid:
        out.append(Problem("invalid_visible_devices", "warning",
                           f"CUDA_VISIBLE_DEVICES={vis.raw!r}: {vis.why}; CUDA ignores {', '.join(map(repr, vis.invalid))}"
                           f" and shows GPU {_gpu_list(vis.physical)}. Write plain indices or full UUIDs, "
                           "comma-separated, e.g. CUDA_VISIBLE_DEVICES=0,1"))
    if 0 < n_vis < n_all:
        hidden = [g.index for g in inv.gpus if g.index not in vis.physical]
        words = "this is why training prints 'Using single GPU for training'" if n_vis == 1 \
            else f"training will print 'Using {n_vis} GPUs for training'"
        out.append(Problem("hidden_gpus", "warning" if n_vis == 1 else "info",
                           f"{n_all} GPUs present, {n_vis} visible: CUDA_VISIBLE_DEVICES={vis.raw} hides GPU "
                           f"{_gpu_list(hidden)}; {words}. To use them all, unset CUDA_VISIBLE_DEVICES"))
    return out


def _order_problem(inv: Inventory) -> list[Problem]:
    names = sorted({g.name for g in inv.gpus})
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if len(names) < 2 or order == "PCI_BUS_ID":
        return []
    return [Problem("device_order", "warning",
                    f"the GPUs differ ({' / '.join(names)}) and CUDA_DEVICE_ORDER={order}: CUDA numbers them "
                    "fastest first, nvidia-smi by PCI bus, so 'GPU 0' may be two different cards and jobs land "
                    "on the wrong GPU. export CUDA_DEVICE_ORDER=PCI_BUS_ID (the CUDA column assumes it)")]


def problems(inv: Inventory, vis: Visibility, max_util: int, me: str) -> list[Problem]:
    """Every problem a user should hear about, most serious first."""
    if inv.source == "none":
        return [Problem("no_driver", "error",
                        f"no NVIDIA GPU can be read ({inv.detail}): PyTorch will run on the CPU. On a GPU "
                        "server install the NVIDIA driver (nvidia-smi must work); to rehearse without GPUs, "
                        "set MGPU_FAKE_GPUS=examples/scenarios/4x-rtx4090-idle.json")]
    if not inv.gpus:
        return [Problem("no_gpus", "error", f"the driver ({inv.source}) reports no GPU: check nvidia-smi and dmesg")]
    out = _visibility_problems(inv, vis) + _order_problem(inv)
    for gpu in inv.gpus:
        cuda = vis.cuda_index(gpu.index)
        if cuda is None or not is_busy(gpu, max_util, me):
            continue
        util = gpu.utilization_gpu or 0
        load = f"{util}% busy (above MAX_UTIL {max_util}%)" if util > max_util else f"at {util}% utilization"
        out.append(Problem("gpu_busy", "warning",
                           f"GPU {gpu.index} (cuda:{cuda}) is {load} with {gib(gpu.memory_used_mib)} of "
                           f"{gib(gpu.memory_total_mib)} used by {_describe_processes(gpu, me) or 'unlisted processes'}"
                           f": work there runs slowly or out of memory. {_suggest(inv, vis, max_util, me)}"))
    out += [Problem("note", "info", note) for note in inv.notes]
    return sorted(out, key=lambda p: -SEVERITIES.index(p.severity))


# ---------------------------------------------------------------- memory plan


@dataclass
class PlanRow:
    index: int
    cuda_index: int
    free_mib: int
    replicas: int


@dataclass
class Plan:
    need_gib: float
    context_mib: int
    rows: list[PlanRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.replicas for r in self.rows)

    def as_dict(self) -> dict:
        return {"need_gib": self.need_gib, "context_mib": self.context_mib, "replicas": self.total,
                "gpus": [asdict(r) for r in self.rows]}


def plan(inv: Inventory, vis: Visibility, need_gib: float, context_mib: int) -> Plan:
    """How many replicas of a model needing need_gib (plus a CUDA context each) fit on each visible GPU."""
    per_replica = need_gib * 1024 + context_mib
    out = Plan(need_gib, context_mib)
    for cuda, index in enumerate(vis.physical):
        gpu = next(g for g in inv.gpus if g.index == index)
        out.rows.append(PlanRow(index, cuda, gpu.memory_free_mib, int(gpu.memory_free_mib // per_replica)))
    return out


def plan_lines(p: Plan) -> list[str]:
    per = p.need_gib * 1024 + p.context_mib
    lines = [f"Plan for a model needing {p.need_gib:g} GiB a replica (+{gib(p.context_mib)} CUDA context):"]
    for r in p.rows:
        lines.append(f"  GPU {r.index} (cuda:{r.cuda_index}): {gib(r.free_mib)} free -> "
                     f"{r.replicas} replica{'s' if r.replicas != 1 else ''}")
    free = sum(r.free_mib for r in p.rows)
    if p.total:
        lines.append(f"  {p.total} replica{'s' if p.total != 1 else ''} in total: {p.total} x {gib(per)} = {gib(p.total * per)} "
                     f"<= {gib(free)} free on {len(p.rows)} GPUs")
    else:
        lines.append(f"  no GPU has {gib(per)} free: use a smaller batch or model, or free a GPU")
    return lines


# ---------------------------------------------------------------- torch's view (only with --torch)


@dataclass
class TorchView:
    version: str
    cuda: str | None = None
    device_count: int = 0
    nccl: str | None = None
    no_peer_access: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None


def torch_view() -> TorchView:
    """Ask torch what it sees, without creating CUDA contexts (no mem_get_info) or breaking fork."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError as exc:
        return TorchView("not installed", error=str(exc))
    view = TorchView(torch.__version__, torch.version.cuda)
    try:
        view.device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if view.device_count:
            view.nccl = ".".join(map(str, torch.cuda.nccl.version()))
            pairs = [(a, b) for a in range(view.device_count) for b in range(view.device_count) if a < b]
            view.no_peer_access = [(a, b) for a, b in pairs if not torch.cuda.can_device_access_peer(a, b)]
    except RuntimeError as exc:
        view.error = str(exc).splitlines()[0]
    return view


def torch_problems(view: TorchView, vis: Visibility, inv: Inventory) -> list[Problem]:
    visible = len(vis.physical)
    if view.error and view.version == "not installed":
        return [Problem("torch_missing", "error", f"PyTorch is not importable here: {view.error}")]
    out = []
    if view.error:
        out.append(Problem("torch_cuda_error", "error", f"torch {view.version} fails to start CUDA: {view.error}"))
    if view.cuda is None and visible:
        out.append(Problem("torch_no_cuda", "error",
                           f"torch {view.version} is a CPU-only build, so it cannot use the {visible} visible "
                           "GPU(s): install a CUDA build (see https://pytorch.org/get-started/locally/)"))
    elif view.device_count < visible:
        fake = " (the GPUs come from a scenario; torch sees the real machine)" if inv.source == "scenario" else ""
        out.append(Problem("torch_sees_fewer", "warning",
                           f"torch sees {view.device_count} CUDA device(s), NVML shows {visible} visible{fake}: "
                           "check that the driver supports torch's CUDA "
                           f"{view.cuda} (driver {inv.driver_version}, CUDA {inv.cuda_version})"))
    for a, b in view.no_peer_access:
        out.append(Problem("no_peer_access", "info",
                           f"no peer-to-peer access between cuda:{a} and cuda:{b}: NCCL copies through host "
                           "memory, so gradient sync is slower (see nvidia-smi topo -m)"))
    return out
