"""Scenario files (``MGPU_FAKE_GPUS``): the one validator for the whole toolkit, and its command line.

    python -m mgpu.scenario FILE        # validate FILE, print its records
    python -m mgpu.scenario --machine   # the same records for this machine (NVML, else nvidia-smi)

Records, one a line, comma-separated, in index order (``mgpu.records``):
    gpu,<index>,<uuid>,<util|NA>,<used_mib|NA>,<total_mib|NA>,<pci_bus_id|NA>,<name>
    mig,<parent index>,<MIG uuid>
    proc,<gpu index>,<pid>,<used_mib|NA>,<user|NA>
    link,<i>,<j>,<level>
A faulty scenario prints nothing on stdout and one line on stderr, ``<JSON path>: <what is wrong>``,
and exits 2. The format is documented in docs/scenarios.md. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import sys

from . import topology
from .gpus import Gpu, GpuProcess, Inventory, MigDevice

EXIT_OK, EXIT_BAD = 0, 2  # --machine adds 1 (the GPU source failed) and 3 (no GPU): mgpu.records

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_GPU_UUID = re.compile(r"^GPU-[0-9A-Za-z][0-9A-Za-z-]*$")
_MIG_UUID = re.compile(r"^MIG-[0-9A-Za-z][0-9A-Za-z/-]*$")
_PCI_BUS_ID = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-7]$")
_CAPABILITY = re.compile(r"^[0-9]+\.[0-9]+$")
_TOP_KEYS = ("gpus", "driver_version", "cuda_version", "topology")
_GPU_KEYS = ("index", "uuid", "name", "memory_total_mib", "memory_used_mib", "utilization_gpu", "processes",
             "mig_devices", "pci_bus_id", "compute_capability", "multiprocessors")
_PROCESS_KEYS = ("pid", "name", "used_memory_mib", "user")
_MIG_KEYS = ("uuid", "name", "memory_total_mib", "memory_used_mib")
_MIG_LIST = 'must be a list of "MIG-..." UUID strings (or objects with "uuid")'


class ScenarioError(ValueError):
    """A scenario file that cannot be used. ``str()`` is "<file>: <JSON path>: <what is wrong>";
    ``detail`` is the same without the file, as ``python -m mgpu.scenario`` prints it."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail


class _Fault(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise _Fault(where, what)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    _need(not unknown, where, f"unknown key {json.dumps(unknown[0]) if unknown else ''}; "
                              f"allowed: {', '.join(allowed)}")


_MEMORY_NULL = "or null when memory is not reported, as on unified-memory systems"


def _int(obj: dict, key: str, where: str, lo: int, hi: int | None = None, nullable: bool = False,
         required: bool = True, null_note: str = "") -> int | None:
    """obj[key], an integer from lo to hi; null too when nullable (null_note, if given, says when)."""
    if key not in obj and not required:
        return None
    _need(key in obj, where, f"missing key \"{key}\"")
    value = obj[key]
    if value is None and nullable:
        return None
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    ok = _is_int(value) and value >= lo and (hi is None or value <= hi)
    if null_note:
        _need(ok, f"{where}.{key}", f"must be {allowed}, got {json.dumps(value)} ({null_note})")
    _need(ok, f"{where}.{key}", f"must be {allowed}{' or null' if nullable else ''}, got {json.dumps(value)}")
    return value


def _text(value: object, at: str, comma_ok: bool = False) -> str:
    if not isinstance(value, str) or value == "":
        raise _Fault(at, f"must be a non-empty string, got {json.dumps(value)}")
    _need(not _CONTROL.search(value), at,
          f"must not hold a newline or other control character, got {json.dumps(value)}")
    _need(comma_ok or "," not in value, at, f"must not hold a comma (mgpu's GPU records are comma-separated), "
                                            f"got {json.dumps(value)}")
    return value


def _str(obj: dict, key: str, where: str, required: bool = True, comma_ok: bool = False,
         pattern: re.Pattern | None = None, looks: str = "") -> str | None:
    if key not in obj and not required:
        return None
    _need(key in obj, where, f"missing key \"{key}\"")
    value = _text(obj[key], f"{where}.{key}", comma_ok)
    _need(pattern is None or bool(pattern.match(value)), f"{where}.{key}", f"must be {looks}, got {json.dumps(value)}")
    return value


def _parse_process(obj: object, where: str) -> GpuProcess:
    _need(isinstance(obj, dict), where, "must be an object with pid, name, used_memory_mib")
    _keys(obj, _PROCESS_KEYS, where)
    return GpuProcess(
        pid=_int(obj, "pid", where, 0),
        name=_str(obj, "name", where, comma_ok=True),
        used_memory_mib=_int(obj, "used_memory_mib", where, 0, nullable=True, required=False,
                             null_note="or null when the driver does not say"),
        user=_str(obj, "user", where, required=False),
    )


def _parse_mig(obj: object, where: str, n: int) -> MigDevice:
    at = f"{where}[{n}]"
    if isinstance(obj, str):
        _text(obj, at)  # a comma or control character is named at the element's own path
        _need(bool(_MIG_UUID.match(obj)), where, f"{_MIG_LIST}, got {json.dumps(obj)} at [{n}]")
        return MigDevice(obj)
    _need(isinstance(obj, dict), at, 'must be a "MIG-..." UUID string or an object with "uuid"')
    _keys(obj, _MIG_KEYS, at)
    total = _int(obj, "memory_total_mib", at, 1, nullable=True, required=False, null_note=_MEMORY_NULL)
    return MigDevice(_str(obj, "uuid", at, pattern=_MIG_UUID, looks='"MIG-..." as nvidia-smi -L prints it'),
                     _str(obj, "name", at, required=False), total,
                     _int(obj, "memory_used_mib", at, 0, total, nullable=True, required=False,
                          null_note=_MEMORY_NULL))


def _parse_gpu(obj: object, where: str) -> Gpu:
    _need(isinstance(obj, dict), where, "must be an object describing one GPU")
    _keys(obj, _GPU_KEYS, where)
    total = _int(obj, "memory_total_mib", where, 1, nullable=True, null_note=_MEMORY_NULL)
    processes = obj.get("processes", [])
    _need(isinstance(processes, list), f"{where}.processes", "must be a list")
    migs = obj.get("mig_devices", [])
    _need(isinstance(migs, list), f"{where}.mig_devices", _MIG_LIST)
    gpu = Gpu(
        index=_int(obj, "index", where, 0),
        uuid=_str(obj, "uuid", where, pattern=_GPU_UUID,
                  looks='"GPU-" followed by letters, digits and hyphens, as nvidia-smi -L prints it'),
        name=_str(obj, "name", where),
        memory_total_mib=total,
        memory_used_mib=_int(obj, "memory_used_mib", where, 0, total, nullable=True, null_note=_MEMORY_NULL),
        utilization_gpu=_int(obj, "utilization_gpu", where, 0, 100, nullable=True),
        processes=[_parse_process(p, f"{where}.processes[{i}]") for i, p in enumerate(processes)],
        mig_devices=[_parse_mig(m, f"{where}.mig_devices", i) for i, m in enumerate(migs)],
        pci_bus_id=_str(obj, "pci_bus_id", where, required=False, pattern=_PCI_BUS_ID,
                        looks='a PCI bus id like "00000000:07:00.0"'),
        compute_capability=_str(obj, "compute_capability", where, required=False, pattern=_CAPABILITY,
                                looks='a compute capability like "8.9"'),
        multiprocessors=_int(obj, "multiprocessors", where, 1, required=False),
    )
    if gpu.memory_free_mib is None:
        gpu.faults["memory_unknown"] = ("memory is not reported (null in the scenario), as on unified-memory "
                                        "systems such as GB10: its free memory is unknown, so no memory "
                                        "requirement counts as met there")
    return gpu


def _unique(values: list[object], where: str) -> None:
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    _need(not dupes, where, f"must be unique, repeated: {', '.join(dupes)}")


def _group(obj: object, where: str, indices: list[int], least: int) -> list[int]:
    _need(isinstance(obj, list) and len(obj) >= least and all(_is_int(i) for i in obj), where,
          f"must be a list of at least {least} GPU indices, got {json.dumps(obj)}")
    for n, i in enumerate(obj):
        _need(i in indices, f"{where}[{n}]", f"GPU {i} is not in .gpus (indices: {', '.join(map(str, indices))})")
    _unique(list(obj), where)
    return list(obj)


def _parse_nvlink(obj: object, where: str, indices: list[int]) -> tuple[list[int], int]:
    if isinstance(obj, dict):
        _keys(obj, ("gpus", "links"), where)
        _need("gpus" in obj, where, 'missing key "gpus"')
        return _group(obj["gpus"], f"{where}.gpus", indices, 2), _int(obj, "links", where, 1, 64, required=False) or 1
    return _group(obj, where, indices, 2), 1


def _parse_topology(obj: object, indices: list[int]) -> dict[tuple[int, int], str]:
    where = ".topology"
    _need(isinstance(obj, dict), where, "must be an object with nvlink, pcie_switch, pcie_tree, host_bridge, numa")
    _keys(obj, ("nvlink", *topology.GROUP_KINDS), where)
    for key, value in obj.items():
        _need(isinstance(value, list), f"{where}.{key}", "must be a list of GPU groups")
    nvlink = [_parse_nvlink(g, f"{where}.nvlink[{n}]", indices) for n, g in enumerate(obj.get("nvlink", []))]
    groups: dict[str, list[list[int]]] = {}
    for kind in topology.GROUP_KINDS:
        groups[kind] = [_group(g, f"{where}.{kind}[{n}]", indices, 1) for n, g in enumerate(obj.get(kind, []))]
        seen: dict[int, int] = {}
        for n, members in enumerate(groups[kind]):
            for i in members:
                _need(i not in seen, f"{where}.{kind}[{n}]", f"GPU {i} is already in {where}.{kind}[{seen.get(i)}]")
                seen[i] = n
    kinds = list(topology.GROUP_KINDS)
    for low_n, low in enumerate(kinds):  # a group must lie inside one group of every wider kind given
        for high in kinds[low_n + 1:]:
            if not groups[high]:
                continue
            for n, members in enumerate(groups[low]):
                homes = {next((k for k, g in enumerate(groups[high]) if i in g), None) for i in members}
                _need(len(homes) == 1 and None not in homes, f"{where}.{low}[{n}]",
                      f"GPUs {', '.join(map(str, members))} are {topology.GROUP_WORDS[low]}, so they must be "
                      f"{topology.GROUP_WORDS[high]} too: put them in one group of {where}.{high}")
    return topology.derive(indices, nvlink, groups)


def _bus(bus_id: str) -> str:
    """One spelling of a PCI bus id: "0000:1b:00.0" and "00000000:1B:00.0" are one device."""
    domain, rest = bus_id.split(":", 1)
    return f"{int(domain, 16):08X}:{rest.upper()}"


def _parse(data: object) -> Inventory:
    _need(isinstance(data, dict), ".", 'the top level must be a JSON object with a "gpus" list')
    _need(isinstance(data.get("gpus"), list), ".gpus", "must be a list of GPUs")
    _keys(data, _TOP_KEYS, ".")
    gpus = [_parse_gpu(g, f".gpus[{i}]") for i, g in enumerate(data["gpus"])]
    _unique([g.index for g in gpus], ".gpus[].index")
    _unique([g.uuid for g in gpus], ".gpus[].uuid")
    _unique([_bus(g.pci_bus_id) for g in gpus if g.pci_bus_id], ".gpus[].pci_bus_id")
    _unique([m.uuid for g in gpus for m in g.mig_devices], ".gpus[].mig_devices[].uuid")
    driver = _str(data, "driver_version", ".", required=False, comma_ok=True)
    cuda = _str(data, "cuda_version", ".", required=False, comma_ok=True)
    gpus.sort(key=lambda g: g.index)
    links = _parse_topology(data["topology"], [g.index for g in gpus]) if "topology" in data else {}
    return Inventory("scenario", "", driver, cuda, gpus, links=links)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def load_scenario(path: str | os.PathLike) -> Inventory:
    """Read and validate a scenario file; every fault is a ScenarioError naming file and JSON path."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ScenarioError(path, f"cannot read the scenario file ({why})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ScenarioError(path, f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except ValueError as exc:
        raise ScenarioError(path, f"not valid JSON: {exc}") from None
    try:
        inv = _parse(data)
    except _Fault as fault:
        raise ScenarioError(path, str(fault)) from None
    inv.detail = path
    return inv


def _samples(text: str) -> int:
    import argparse

    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to 100, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from . import records

    p = argparse.ArgumentParser(
        prog="python -m mgpu.scenario",
        description="Validate a GPU scenario file and print its records (gpu, mig, proc, link lines), or "
                    "print the same records for this machine. Exit 0 ok, 1 the GPU source failed, "
                    "2 bad scenario or usage, 3 no GPU can be read (CPU mode).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("file", nargs="?", metavar="FILE", help="the scenario JSON to validate (no default)")
    what.add_argument("--machine", action="store_true",
                      help="read this machine instead: NVML, else nvidia-smi (default: off)")
    p.add_argument("--samples", type=_samples, default=1, metavar="N",
                   help="with --machine, utilization readings (0.1 s apart) to take the median of (default: 1)")
    args = p.parse_args(argv)
    if args.machine:
        return records.print_machine(args.samples)
    try:
        inv = load_scenario(args.file)
    except ScenarioError as exc:
        print(exc.detail, file=sys.stderr)
        return EXIT_BAD
    sys.stdout.write(records.render(inv))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
