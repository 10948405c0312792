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


def _memory(gpu: Gpu) -> str:
    if gpu.memory_total_mib is None or gpu.memory_used_mib is None:
        return "memory use unknown"
    return f"{gib(gpu.memory_used_mib)} of {gib(gpu.memory_total_mib)} used"


def _suggest(inv: Inventory, vis: Visibility, max_util: int, me: str) -> str:
    """A CUDA_VISIBLE_DEVICES with as many GPUs as now, idle ones first among those already chosen.
    A GPU whose processes cannot be listed, or that cannot be read, is never called idle."""
    idle = [g.index for g in inv.gpus if g.lost is None and g.processes_known and not is_busy(g, max_util, me)]
    keep = [i for i in vis.physical if i in idle]
    extra = [i for i in idle if i not in keep]
    pick = sorted((keep + extra)[: max(len(vis.physical), 1)])
    if not pick:
        return "No GPU is idle right now: wait (run_train_clip.sh waits for you), or ask the owners"
    cuda = sorted(vis.order.indices.index(i) for i in pick if i in vis.order.indices)
    return f"Idle now: GPU {_gpu_list(idle)}; try CUDA_VISIBLE_DEVICES={','.join(map(str, cuda))}"


def _visibility_problems(inv: Inventory, vis: Visibility) -> list[Problem]:
    out: list[Problem] = []
    n_all, n_vis = len(inv.gpus), len(vis.physical)
    if vis.raw is not None and vis.why and n_vis == 0:
        out.append(Problem("visible_empty", "error",
                           f"CUDA_VISIBLE_DEVICES={vis.raw!r} shows no GPU: {vis.why}. PyTorch will run on "
                           "the CPU. List GPUs by CUDA index or GPU- UUID, e.g. CUDA_VISIBLE_DEVICES=0,1"))
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


def _order_problem(inv: Inventory, vis: Visibility) -> list[Problem]:
    """CUDA's numbers are not nvidia-smi's: say how they map, or that they cannot be told."""
    order = vis.order
    alive = sorted(g.index for g in inv.gpus if g.lost is None)
    names = sorted({g.name for g in inv.gpus if g.lost is None})
    if order.setting == "PCI_BUS_ID" or (order.guess is None and order.indices == alive):
        return []
    setting = os.environ.get("CUDA_DEVICE_ORDER", "(unset: FASTEST_FIRST)")
    fix = ("export CUDA_DEVICE_ORDER=PCI_BUS_ID, and CUDA's numbers become nvidia-smi's (mgpu's launchers "
           "need that, or GPU- UUIDs)")
    if order.indices == alive:  # a guess that happens to agree: the models differ and their speeds are unknown
        return [Problem("device_order", "warning",
                        f"the GPUs differ ({' / '.join(names)}) and CUDA_DEVICE_ORDER={setting}: CUDA numbers them "
                        f"fastest first, nvidia-smi by PCI bus, so 'GPU 0' may be two different cards and jobs land "
                        f"on the wrong GPU ({order.guess}). {fix}")]
    by_index = {g.index: g for g in inv.gpus}
    mapping = ", ".join(f"cuda:{c} = GPU {i} ({by_index[i].name})" for c, i in enumerate(order.indices) if c != i)
    return [Problem("device_order", "warning",
                    f"the GPUs differ ({' / '.join(names)}) and CUDA_DEVICE_ORDER={setting}: CUDA numbers them "
                    f"fastest first, nvidia-smi by PCI bus, so the numbers disagree: {mapping}"
                    f"{' (' + order.guess + ')' if order.guess else ''}. CUDA_VISIBLE_DEVICES=0 is GPU "
                    f"{order.indices[0]} here, not GPU 0. {fix}")]


def _gpu_problems(gpu: Gpu) -> list[Problem]:
    """A GPU that cannot be read, or values it does not report."""
    if gpu.lost is not None:
        return [Problem("gpu_lost", "error",
                        f"GPU {gpu.index} cannot be read ({gpu.lost}): it is left out of every plan, and CUDA does not "
                        "count it, so CUDA's numbers after it are one lower than nvidia-smi's. Look for Xid errors "
                        "in dmesg; a GPU reset or a reboot brings it back")]
    out = []
    for kind, text in gpu.faults.items():
        code = kind if kind in ("memory_unknown", "processes_unknown") else "gpu_fault"
        out.append(Problem(code, "info" if kind == "memory_unknown" else "warning", f"GPU {gpu.index}: {text}"))
    return out


def problems(inv: Inventory, vis: Visibility, max_util: int, me: str) -> list[Problem]:
    """Every problem a user should hear about, most serious first."""
    if inv.source == "none":
        return [Problem("no_driver", "error",
                        f"no NVIDIA GPU can be read ({inv.detail}): PyTorch will run on the CPU. On a GPU "
                        "server install the NVIDIA driver (nvidia-smi must work); to rehearse without GPUs, "
                        "set MGPU_FAKE_GPUS=examples/scenarios/4x-rtx4090-idle.json")]
    if not inv.gpus:
        return [Problem("no_gpus", "error", f"the driver ({inv.source}) reports no GPU: check nvidia-smi and dmesg")]
    out = _visibility_problems(inv, vis) + _order_problem(inv, vis)
    for gpu in inv.gpus:
        out += _gpu_problems(gpu)
        # A MIG instance is isolated from the others' work: its own memory is what counts (the plan).
        cuda = vis.cuda_index(gpu.index)
        if cuda is None or gpu.lost is not None or not is_busy(gpu, max_util, me):
            continue
        util = gpu.utilization_gpu or 0
        load = f"{util}% busy (above MAX_UTIL {max_util}%)" if util > max_util else f"at {util}% utilization"
        out.append(Problem("gpu_busy", "warning",
                           f"GPU {gpu.index} (cuda:{cuda}) is {load} with {_memory(gpu)} by "
                           f"{_describe_processes(gpu, me) or 'unlisted processes'}"
                           f": work there runs slowly or out of memory. {_suggest(inv, vis, max_util, me)}"))
    out += [Problem("note", "info", note) for note in inv.notes]
    return sorted(out, key=lambda p: -SEVERITIES.index(p.severity))


# ---------------------------------------------------------------- memory plan


@dataclass
class PlanRow:
    index: int
    cuda_index: int
    free_mib: int | None  # None: memory not reported (unified memory) or the GPU cannot be read
    replicas: int
    mig: str | None = None  # the MIG instance CUDA shows, whose memory this row counts


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
    """How many replicas of a model needing need_gib (plus a CUDA context each) fit on each visible GPU
    (on the MIG instance CUDA shows, when CUDA_VISIBLE_DEVICES names one). Unknown memory fits nothing."""
    per_replica = need_gib * 1024 + context_mib
    out = Plan(need_gib, context_mib)
    for cuda, index in enumerate(vis.physical):
        gpu = next(g for g in inv.gpus if g.index == index)
        mig = next((m for m in gpu.mig_devices if m.uuid == vis.mig), None)
        free = mig.memory_free_mib if mig else gpu.memory_free_mib
        if gpu.lost is not None:
            free = None
        out.rows.append(PlanRow(index, cuda, free, 0 if free is None else int(free // per_replica), vis.mig))
    return out


def plan_lines(p: Plan) -> list[str]:
    per = p.need_gib * 1024 + p.context_mib
    lines = [f"Plan for a model needing {p.need_gib:g} GiB a replica (+{gib(p.context_mib)} CUDA context):"]
    for r in p.rows:
        where = f"GPU {r.index}{' ' + r.mig if r.mig else ''} (cuda:{r.cuda_index})"
        free = "memory unknown" if r.free_mib is None else f"{gib(r.free_mib)} free"
        lines.append(f"  {where}: {free} -> {r.replicas} replica{'s' if r.replicas != 1 else ''}")
    free_total = sum(r.free_mib or 0 for r in p.rows)
    if p.total:
        lines.append(f"  {p.total} replica{'s' if p.total != 1 else ''} in total: {p.total} x {gib(per)} = {gib(p.total * per)} "
                     f"<= {gib(free_total)} free on {len(p.rows)} GPUs")
    else:
        unknown = [str(r.index) for r in p.rows if r.free_mib is None]
        lines.append(f"  no GPU has {gib(per)} free: use a smaller batch or model, or free a GPU"
                     + (f" (the free memory of GPU {', '.join(unknown)} is unknown: with unified memory, see "
                        "how much system memory is free)" if unknown else ""))
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
    uuids: list[str] = field(default_factory=list)  # each CUDA device's UUID, in CUDA's order


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
            view.uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(view.device_count)]
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
