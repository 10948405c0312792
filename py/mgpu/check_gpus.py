"""``python check_gpus.py``: what this machine has, what PyTorch will see, and why.

Exit codes: 0 usable GPUs and no problem; 1 usable GPUs with problems; 2 usage error; 3 no usable GPU
(with --torch: none that torch can use).
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import sys
from dataclasses import asdict

from . import diagnose, gpus, visible
from .scenario import ScenarioError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3


def _percent(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"MAX_UTIL must be an integer from 0 to 100, got {text!r}")
    return value


_UNITS = {"": 1.0, "g": 1.0, "gb": 1.0, "gib": 1.0, "m": 1 / 1024, "mb": 1 / 1024, "mib": 1 / 1024}


def _gib(text: str) -> float:
    """--plan: GiB as a number, or with a unit: 15, 15G, 15GiB, 15360M (GB and MB are read as GiB and MiB,
    as nvidia-smi's figures are)."""
    number = text.strip().lower().rstrip("gimb")
    unit = text.strip().lower()[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be GiB above 0, as 15, 15G or 15360M; got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of MiB, 0 or more, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="check_gpus.py",
        description="Show the GPUs, what PyTorch will see of them (CUDA_VISIBLE_DEVICES), who uses them, "
                    "and every problem with what to do. MGPU_FAKE_GPUS=<scenario.json> shows a scenario's GPUs.",
        epilog="exit codes: 0 usable GPUs, no problem; 1 usable GPUs with problems; 2 usage error; "
               "3 no usable GPU (with --torch: none that torch can use)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plan", metavar="GB", type=_gib,
                   help="how many replicas of a model needing GB GiB of GPU memory fit on each visible GPU")
    p.add_argument("--context-mib", metavar="MIB", type=_nonnegative_int, default=512,
                   help="CUDA context memory each replica needs on top of --plan (default: 512)")
    p.add_argument("--torch", action="store_true",
                   help="also import torch: CUDA build, device count, NCCL version, peer access")
    p.add_argument("--max-util", metavar="PCT", type=_percent, default=None,
                   help="a GPU above this utilization is busy (default: $MAX_UTIL or 70)")
    return p


def _max_util(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    if args.max_util is not None:
        return args.max_util
    try:
        return _percent(os.environ.get("MAX_UTIL", "70"))
    except argparse.ArgumentTypeError as exc:
        p.error(f"environment variable {exc}")
        raise  # p.error exits; this line is for type checkers


def _memory(used: int | None, total: int | None) -> str:
    if total is None:
        return "unknown" if used is None else f"{used / 1024:.1f} / ?"
    return f"{'?' if used is None else f'{used / 1024:.1f}'} / {diagnose.gib(total)}"


def _rows(gpu: gpus.Gpu, vis: visible.Visibility, me: str) -> list[list[str]]:
    """The GPU's row, then one row per MIG instance: each is a device CUDA can be given."""
    cuda = vis.cuda_index(gpu.index)
    if gpu.lost is not None:
        return [[str(gpu.index), "-", gpu.uuid or "?", gpu.pci_bus_id or "?", f"(cannot be read: {gpu.lost})",
                 "?", "?", "?"]]
    procs = "; ".join(
        f"{p.pid} {p.name}" + (f" ({'you' if p.user == me else p.user})" if p.user else "")
        + (f" {diagnose.gib(p.used_memory_mib)}" if p.used_memory_mib is not None else "")
        for p in gpu.processes) or ("-" if gpu.processes_known else "? (cannot be listed)")
    util = "n/a" if gpu.utilization_gpu is None else f"{gpu.utilization_gpu}%"
    rows = [[str(gpu.index), "-" if cuda is None else str(cuda), gpu.uuid, gpu.pci_bus_id or "-", gpu.name,
             _memory(gpu.memory_used_mib, gpu.memory_total_mib), util, procs]]
    for n, mig in enumerate(gpu.mig_devices):
        mig_cuda = vis.mig_cuda_index(mig.uuid)
        name = f"MIG {mig.name}" if mig.name and "MIG" not in mig.name else mig.name or "MIG"
        rows.append([f"{gpu.index}/mig{n}", "-" if mig_cuda is None else str(mig_cuda), mig.uuid,
                     gpu.pci_bus_id or "-", name, _memory(mig.memory_used_mib, mig.memory_total_mib), "n/a", "-"])
    return rows


def _table(rows: list[list[str]]) -> list[str]:
    head = ["GPU", "CUDA", "UUID", "PCI BUS ID", "NAME", "MEMORY USED / TOTAL", "UTIL",
            "PROCESSES (pid name user memory)"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in [head, *rows]]


def _seen(vis: visible.Visibility) -> str:
    if vis.mig is not None and vis.physical:
        return f"cuda:0 = {vis.mig} (a MIG instance of GPU {vis.physical[0]})"
    return ", ".join(f"cuda:{c} = GPU {i}" for c, i in enumerate(vis.physical))


def render_text(inv: gpus.Inventory, vis: visible.Visibility, found: list[diagnose.Problem],
                plan: diagnose.Plan | None, view: diagnose.TorchView | None, me: str) -> str:
    source = {"scenario": f"scenario {inv.detail}", "nvml": "NVML", "nvidia-smi": "nvidia-smi"}.get(inv.source)
    lines = []
    if source:
        lines.append(f"{len(inv.gpus)} GPU(s) from {source}; driver {inv.driver_version or '?'}, "
                     f"CUDA {inv.cuda_version or '?'}")
        cvd = "(unset)" if vis.raw is None else repr(vis.raw)
        lines.append(f"CUDA_VISIBLE_DEVICES={cvd}  CUDA_DEVICE_ORDER="
                     f"{os.environ.get('CUDA_DEVICE_ORDER', '(unset: FASTEST_FIRST)')}")
        lines += [""] + _table([row for g in inv.gpus for row in _rows(g, vis, me)]) + [""]
        seen = _seen(vis)
        count = len(vis.physical)
        lines.append(f"PyTorch will see {count} GPU(s){': ' + seen if seen else ''}. "
                     + (f"Training prints 'Using {count} GPUs for training'." if count > 1 else
                        "Training prints 'Using single GPU for training'." if count == 1 else ""))
    else:
        lines.append("No GPU found: CPU mode (PyTorch will run on the CPU).")
    if view:
        lines.append(f"torch {view.version}, CUDA build {view.cuda or 'none (CPU-only)'}, "
                     f"{view.device_count} device(s), NCCL {view.nccl or '-'}")
    if plan:
        lines += [""] + diagnose.plan_lines(plan)
    if found:
        lines += ["", "Problems:"] + [f"  [{p.severity}] {p.code}: {p.message}" for p in found]
    else:
        lines += ["", "No problems found."]
    return "\n".join(lines)


def _gpu_json(g: gpus.Gpu, vis: visible.Visibility) -> dict:
    return {"index": g.index, "cuda_index": vis.cuda_index(g.index), "uuid": g.uuid, "pci_bus_id": g.pci_bus_id,
            "name": g.name, "memory_used_mib": g.memory_used_mib, "memory_total_mib": g.memory_total_mib,
            "utilization_gpu": g.utilization_gpu, "compute_capability": g.compute_capability,
            "processes": [asdict(p) for p in g.processes], "processes_known": g.processes_known,
            "mig_devices": [m.uuid for m in g.mig_devices], "lost": g.lost, "faults": g.faults}


def render_json(inv: gpus.Inventory, vis: visible.Visibility, found: list[diagnose.Problem],
                plan: diagnose.Plan | None, view: diagnose.TorchView | None) -> str:
    out = {
        "source": inv.source,
        "driver_version": inv.driver_version,
        "cuda_version": inv.cuda_version,
        "cuda_visible_devices": vis.raw,
        "cuda_device_order": os.environ.get("CUDA_DEVICE_ORDER"),
        "cuda_order": {"nvml_indices": vis.order.indices, "setting": vis.order.setting, "guess": vis.order.guess},
        "gpus": [_gpu_json(g, vis) for g in inv.gpus],
        "mig_devices": [{"uuid": m.uuid, "parent_index": g.index, "cuda_index": vis.mig_cuda_index(m.uuid),
                         "name": m.name, "memory_used_mib": m.memory_used_mib, "memory_total_mib": m.memory_total_mib}
                        for g in inv.gpus for m in g.mig_devices],
        "links": [{"gpus": [a, b], "level": level} for (a, b), level in sorted(inv.links.items())],
        "problems": [asdict(p) for p in found],
    }
    if plan:
        out["plan"] = plan.as_dict()
    if view:
        out["torch"] = asdict(view)
    return json.dumps(out, indent=2)


def exit_code(vis: visible.Visibility, found: list[diagnose.Problem], plan: diagnose.Plan | None,
              view: diagnose.TorchView | None = None) -> int:
    if not vis.physical or (plan is not None and plan.total == 0):
        return EXIT_NO_GPU
    if view is not None and (view.cuda is None or view.device_count == 0):
        return EXIT_NO_GPU  # --torch: training would run on the CPU, whatever NVML shows
    return EXIT_PROBLEMS if any(p.severity != "info" for p in found) else EXIT_OK



def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    max_util = _max_util(args, p)
    try:
        inv = gpus.inventory()
    except ScenarioError as exc:
        print(f"check_gpus.py: {gpus.SCENARIO_ENV}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    me = getpass.getuser()
    vis = visible.resolve(os.environ.get("CUDA_VISIBLE_DEVICES"), inv.gpus)
    found = diagnose.problems(inv, vis, max_util, me)
    view = diagnose.torch_view() if args.torch else None
    if view:
        differs = False
        if inv.source != "scenario":
            vis, differs = visible.join_uuids(vis, view.uuids, inv.gpus)
        found += diagnose.torch_problems(view, vis, inv)
        if differs:
            found.append(diagnose.Problem(
                "cuda_order", "info", f"torch's devices are {_seen(vis)}: the CUDA column shows what torch "
                                      "reports, which differs from mgpu's estimate of CUDA's order"))
    plan = diagnose.plan(inv, vis, args.plan, args.context_mib) if args.plan else None
    if args.json:
        print(render_json(inv, vis, found, plan, view))
    else:
        print(render_text(inv, vis, found, plan, view, me))
    return exit_code(vis, found, plan, view)
