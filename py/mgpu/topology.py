"""How each pair of GPUs is connected, in the words of ``nvidia-smi topo -m``.

Levels, closest first: ``NV<k>`` (a bonded set of k NVLinks, directly or through NVSwitches), ``PIX``
(at most one PCIe bridge), ``PXB`` (several PCIe bridges, no host bridge), ``PHB`` (a PCIe host bridge,
typically the CPU), ``NODE`` (between host bridges within one NUMA node), ``SYS`` (across NUMA nodes).

Three ways to learn them: derived from a scenario's ``topology`` (``derive``), from NVML
(``mgpu.nvml_source``), or parsed from ``nvidia-smi topo -m`` (``parse_topo_matrix``).
"""

from __future__ import annotations

import re

PCIE_LEVELS = ("PIX", "PXB", "PHB", "NODE", "SYS")
# Scenario topology keys, innermost first, and the level two GPUs in one group of that key share.
GROUP_KINDS = {"pcie_switch": "PIX", "pcie_tree": "PXB", "host_bridge": "PHB", "numa": "NODE"}
GROUP_WORDS = {"pcie_switch": "behind one PCIe switch", "pcie_tree": "under one tree of PCIe switches",
               "host_bridge": "on one PCIe host bridge", "numa": "in one NUMA node"}
# nvmlDeviceGetTopologyCommonAncestor's answers (NVML_TOPOLOGY_*) as nvidia-smi names them;
# INTERNAL (two GPUs on one board) is behind a single on-board switch.
NVML_ANCESTOR = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}

_LEVEL = re.compile(r"^(NV(\d+)|PIX|PXB|PHB|NODE|SYS)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GPU_COLUMN = re.compile(r"^GPU(\d+)$")


def is_level(text: str) -> bool:
    return bool(_LEVEL.match(text))


def rank(level: str) -> tuple[int, int]:
    """Sort key, closest first: more NVLinks beat fewer, any NVLink beats PCIe, PIX beats PXB ..."""
    match = _LEVEL.match(level)
    if not match:
        raise ValueError(f"not a topology level: {level!r}")
    if match.group(2):
        return 0, -int(match.group(2))
    return 1 + PCIE_LEVELS.index(level), 0


def derive(indices: list[int], nvlink: list[tuple[list[int], int]],
           groups: dict[str, list[list[int]]]) -> dict[tuple[int, int], str]:
    """The level of every pair i < j from NVLink groups (members, links per pair) and the PCIe/NUMA
    groups of ``GROUP_KINDS`` (each a partition of some GPUs). A pair in several NVLink groups gets the
    largest link count; a pair sharing no group at all is ``SYS``."""
    links: dict[tuple[int, int], str] = {}
    ordered = sorted(indices)
    for n, a in enumerate(ordered):
        for b in ordered[n + 1:]:
            shared = [k for members, k in nvlink if a in members and b in members]
            if shared:
                links[(a, b)] = f"NV{max(shared)}"
                continue
            links[(a, b)] = "SYS"
            for kind, level in GROUP_KINDS.items():
                if any(a in g and b in g for g in groups.get(kind, [])):
                    links[(a, b)] = level
                    break
    return links


def _is_header(tokens: list[str]) -> bool:
    """The header starts with GPU0 followed by another column name; a row starts GPU<k> X/level."""
    return tokens[:1] == ["GPU0"] and (len(tokens) == 1 or not (tokens[1] in ("X", "SOC") or is_level(tokens[1])))


class TopoParseError(ValueError):
    """``nvidia-smi topo -m`` printed something this parser does not understand; says what."""


def parse_topo_matrix(text: str) -> dict[tuple[int, int], str]:
    """The GPU-to-GPU part of ``nvidia-smi topo -m``, as real drivers print it: a tab-separated
    matrix whose header (underlined with ANSI escapes by current drivers) names GPU0..GPUn, then NIC
    columns and CPU/NUMA affinity, one row per GPU and NIC, then a legend. Older drivers say SOC for SYS.
    Copies whose tabs became spaces parse too: the GPU columns come first and hold no spaces."""
    lines = [_ANSI.sub("", line) for line in text.splitlines()]
    header_at = next((n for n, line in enumerate(lines) if _is_header(line.split())), None)
    if header_at is None:
        raise TopoParseError("no header line naming GPU0")
    columns = []
    for token in lines[header_at].split():
        match = _GPU_COLUMN.match(token)
        if not match:
            break
        columns.append(int(match.group(1)))
    if columns != list(range(len(columns))):
        raise TopoParseError(f"GPU columns are not GPU0..GPU{len(columns) - 1}: {lines[header_at].strip()!r}")
    rows: dict[int, list[str]] = {}
    for line in lines[header_at + 1:]:
        tokens = line.split()
        match = _GPU_COLUMN.match(tokens[0]) if tokens else None
        if not match:
            continue
        cells = ["SYS" if cell == "SOC" else cell for cell in tokens[1:len(columns) + 1]]
        if len(cells) < len(columns):
            raise TopoParseError(f"row {tokens[0]} has {len(cells)} GPU cells, expected {len(columns)}")
        rows[int(match.group(1))] = cells
    missing = [i for i in columns if i not in rows]
    if missing:
        raise TopoParseError(f"no row for GPU{missing[0]}")
    links: dict[tuple[int, int], str] = {}
    for a in columns:
        if rows[a][a] != "X":
            raise TopoParseError(f"row GPU{a} does not have X on the diagonal, got {rows[a][a]!r}")
        for b in columns[a + 1:]:
            level, back = rows[a][b], rows[b][a]
            if not is_level(level):
                raise TopoParseError(f"GPU{a}-GPU{b} is {level!r}, not one of NV<k>, PIX, PXB, PHB, NODE, SYS")
            if level != back:
                raise TopoParseError(f"GPU{a}-GPU{b} is {level} but GPU{b}-GPU{a} is {back}")
            links[(a, b)] = level
    return links
