"""The Python half of bench/gpu_check.sh: the checks that need Python, each a subcommand that prints one
JSON object (the step's record: status ok | fail | skip, figures, detail) on stdout. Run by gpu_check.sh;
by hand: python bench/gpu_check.py sources | burn SECONDS [STOP_FILE] | embeddings A B [TOL] | weights A B TOL [WHAT] | report DIR.

- sources: the GPUs as NVML (nvidia-ml-py) and nvidia-smi report them, field by field; PyTorch's CUDA
  devices joined on UUID under CUDA_DEVICE_ORDER x CUDA_VISIBLE_DEVICES, against mgpu.visible's
  prediction. Under MGPU_FAKE_GPUS (the smoke mode): the scenario against the fake nvidia-smi.
- burn SECONDS [STOP_FILE]: keeps GPU 0 busy (a loop of matrix products) until STOP_FILE exists, SECONDS at
  most; under MGPU_FAKE_GPUS it sets GPU 0's utilization to 100 in the scenario file instead, then back.
- embeddings A B: the largest difference between two infer_parallel.sh results (same rows).
- report DIR: the table of every step's record in DIR/*.json, and DIR/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "py"))

FAKE = "MGPU_FAKE_GPUS"
MEMORY_SLACK_MIB = 256  # memory.used moves between two reads (the reads themselves hold none)


def record(status: str, detail: str, **figures) -> dict:
    return {"status": status, "detail": detail, "figures": figures}


# ---- sources ----------------------------------------------------------------------------------------------------

def _gpu_fields(inv) -> dict[int, dict]:
    return {g.index: {"uuid": g.uuid, "name": g.name, "memory_total_mib": g.memory_total_mib,
                      "memory_used_mib": g.memory_used_mib, "pids": sorted(p.pid for p in g.processes)}
            for g in inv.gpus}


def _differences(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str]) -> list[str]:
    out = []
    if sorted(a) != sorted(b):
        return [f"GPU indices differ: {names[0]} {sorted(a)}, {names[1]} {sorted(b)}"]
    for i in sorted(a):
        for key in ("uuid", "name", "memory_total_mib"):
            if a[i][key] != b[i][key]:
                out.append(f"GPU {i} {key}: {names[0]} {a[i][key]!r}, {names[1]} {b[i][key]!r}")
        used = (a[i]["memory_used_mib"], b[i]["memory_used_mib"])
        if None in used and used[0] != used[1] or None not in used and abs(used[0] - used[1]) > MEMORY_SLACK_MIB:
            out.append(f"GPU {i} memory_used_mib: {names[0]} {used[0]}, {names[1]} {used[1]}")
    return out


def _torch_uuids(env: dict[str, str]) -> list[str] | str:
    """CUDA's devices as a fresh PyTorch process sees them under env: UUIDs in CUDA order, or an error."""
    code = ("import torch, json; n = torch.cuda.device_count(); "
            "print(json.dumps([str(torch.cuda.get_device_properties(i).uuid) for i in range(n)]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mapping(gpus) -> tuple[list[dict], list[str]]:
    """Each (CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES) case: the physical GPUs PyTorch shows against the
    ones mgpu.visible predicts."""
    from mgpu import visible

    by_uuid = {g.uuid.removeprefix("GPU-"): g.index for g in gpus}
    last = str(len(gpus) - 1)
    cases = [None, "0", last, gpus[0].uuid, gpus[-1].uuid[:12], f"{last},0" if len(gpus) > 1 else "0,0", ""]
    rows, problems = [], []
    wanted = [(order, raw) for order in ("FASTEST_FIRST", "PCI_BUS_ID") for raw in dict.fromkeys(cases)]

    def env_for(order: str, raw: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
        env["CUDA_DEVICE_ORDER"] = order
        if raw is not None:
            env["CUDA_VISIBLE_DEVICES"] = raw
        return env

    with ThreadPoolExecutor(max_workers=8) as pool:  # one fresh process a case: CUDA reads them at its start
        seen_all = list(pool.map(lambda case: _torch_uuids(env_for(*case)), wanted))
    for (order, raw), seen in zip(wanted, seen_all):
        predicted = visible.resolve(raw, gpus, order).physical
        shown = seen if isinstance(seen, str) else [by_uuid.get(u.removeprefix("GPU-"), u) for u in seen]
        ok = shown == predicted
        rows.append({"CUDA_DEVICE_ORDER": order, "CUDA_VISIBLE_DEVICES": raw, "torch": shown,
                     "mgpu": predicted, "agree": ok})
        if not ok:
            problems.append(f"{order} CUDA_VISIBLE_DEVICES={raw!r}: torch shows {shown}, mgpu predicts {predicted}")
    return rows, problems


def sources() -> dict:
    from mgpu import gpus, smi_source

    if os.environ.get(FAKE):
        first = gpus.inventory()
        env_smi = str(ROOT / "tests" / "fakes" / "nvidia-smi")
        os.environ["MGPU_FAKE_SMI_SCENARIO"] = os.environ[FAKE]
        second = smi_source.from_nvidia_smi(env_smi)
        names = ("scenario", "fake nvidia-smi")
    else:
        from mgpu import nvml_source

        first, second = nvml_source.from_nvml(), smi_source.from_nvidia_smi()
        names = ("NVML", "nvidia-smi")
    a, b = _gpu_fields(first), _gpu_fields(second)
    problems = _differences(a, b, names)
    # processes come and go between the two reads on a shared machine: a difference there is a note
    moved = [f"GPU {i}: {names[0]} {a[i]['pids']}, {names[1]} {b[i]['pids']}" for i in sorted(a)
             if i in b and a[i]["pids"] != b[i]["pids"]]
    figures = {"gpus": len(first.gpus), "names": sorted({g.name for g in first.gpus}),
               "memory_total_mib": [g.memory_total_mib for g in first.gpus], "driver": second.driver_version,
               "cuda": first.cuda_version or second.cuda_version, "sources": list(names),
               "processes": {str(i): a[i]["pids"] for i in sorted(a)}, "processes_changed_between_reads": moved}
    if os.environ.get(FAKE) or not first.gpus:
        figures["cuda_mapping"] = "not checked: no CUDA device (smoke mode)"
    else:
        rows, wrong = _mapping(first.gpus)
        figures["cuda_mapping"] = rows
        problems += wrong
    detail = "; ".join(problems) if problems else \
        f"{names[0]} and {names[1]} agree on {len(a)} GPU(s)" + \
        ("" if isinstance(figures["cuda_mapping"], str) else
         f"; torch's devices match mgpu's prediction in {len(figures['cuda_mapping'])} cases")
    return record("fail" if problems else "ok", detail, **figures)


# ---- burn -------------------------------------------------------------------------------------------------------

def _replace(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def burn(seconds: float, stop_file: str | None = None) -> dict:
    """Hold GPU 0 busy until stop_file exists, `seconds` at most. Prints "busy" on stderr once it is."""
    def stopped() -> bool:
        return bool(stop_file) and Path(stop_file).exists()

    scenario, start = os.environ.get(FAKE), time.monotonic()
    done = start + seconds
    if scenario:
        path = Path(scenario)
        original = path.read_text()
        data = json.loads(original)
        data["gpus"][0]["utilization_gpu"] = 100
        _replace(path, json.dumps(data))  # a reader never sees a half-written file
        print("busy", file=sys.stderr, flush=True)
        try:
            while time.monotonic() < done and not stopped():
                time.sleep(0.05)
        finally:
            _replace(path, original)
        return record("ok", f"scenario GPU 0 at 100 % for {time.monotonic() - start:.1f} s")
    import torch

    device = torch.device("cuda", 0)
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    products, told = 0, False
    while time.monotonic() < done and not stopped():
        for _ in range(50):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(device)
        products += 50
        if not told:
            print("busy", file=sys.stderr, flush=True)
            told = True
    return record("ok", f"GPU 0 busy for {time.monotonic() - start:.1f} s ({products} bf16 4096^3 products)",
                  products=products)


# ---- embeddings -------------------------------------------------------------------------------------------------

def embeddings(first: str, second: str, tolerance: float) -> dict:
    import numpy as np

    worst = {}
    for name in ("image_embeddings.npy", "text_embeddings.npy"):
        x, y = np.load(Path(first) / name), np.load(Path(second) / name)
        if x.shape != y.shape:
            return record("fail", f"{name}: shapes {x.shape} and {y.shape} differ")
        bad_x, bad_y = np.isnan(x).any(1), np.isnan(y).any(1)
        if (bad_x != bad_y).any():
            row = int(np.flatnonzero(bad_x != bad_y)[0])
            return record("fail", f"{name}: row {row} is NaN in one run only ({first if bad_x[row] else second})")
        both = ~bad_x
        worst[name.split("_")[0]] = float(np.abs(x[both] - y[both]).max()) if both.any() else 0.0
    diff = max(worst.values())
    return record("ok" if diff <= tolerance else "fail",
                  f"largest difference {diff:.2e} (tolerance {tolerance:g})", max_abs_diff=worst, rows=int(x.shape[0]))


# ---- weights ----------------------------------------------------------------------------------------------------

def weights(first: str, second: str, tolerance: float, what: str = "DDP over 2 processes (batch 8 each) against "
            "1 process (batch 16)") -> dict:
    """Two runs' model.pt (mgpu.checkpoint's save_model): the largest difference over every tensor."""
    from mgpu.checkpoint import read_checkpoint

    a, b = (read_checkpoint(Path(p))["model"] for p in (first, second))
    if sorted(a) != sorted(b):
        return record("fail", f"the two models hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    def compared(key: str, t):
        # the key bias gets a zero gradient (softmax ignores a shift), so Adam turns rounding noise into
        # steps: compare the query third only, as tests/py/test_train_clip.py does
        return t[: t.shape[0] // 3] if key.endswith("attn.in_proj_bias") else t

    diff = max(float((compared(k, a[k]).double() - compared(k, b[k]).double()).abs().max())
               for k in a if a[k].is_floating_point())
    return record("ok" if diff <= tolerance else "fail",
                  f"{what}: largest weight difference {diff:.2e} (tolerance {tolerance:g})", max_abs_diff=diff,
                  tensors=len(a))


# ---- report -----------------------------------------------------------------------------------------------------

def _figure_text(figures: dict) -> str:
    parts = []
    for key, value in figures.items():
        if isinstance(value, (list, dict)) and len(json.dumps(value)) > 60:
            continue  # in the JSON, too long for the table
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def report(folder: str) -> int:
    steps = []
    for path in sorted(Path(folder).glob("step_*.json")):
        steps.append(json.loads(path.read_text()))
    import torch

    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": os.uname().nodename,
               "mode": "smoke" if os.environ.get(FAKE) else "gpu", "torch": torch.__version__,
               "torch_cuda": torch.version.cuda, "python": sys.version.split()[0], "steps": steps,
               "ok": all(s["status"] != "fail" for s in steps)}
    (Path(folder) / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    width = max((len(s["step"]) for s in steps), default=4)
    print(f"\n{'step':{width}}  status  seconds  what held / figures")
    for s in steps:
        print(f"{s['step']:{width}}  {s['status']:6}  {s['seconds']:7.1f}  {s['detail']}")
        text = _figure_text(s.get("figures", {}))
        if text:
            print(f"{'':{width}}  {'':6}  {'':7}  {text}")
    failed = [s["step"] for s in steps if s["status"] == "fail"]
    print(f"\n{len(steps)} steps: {len(steps) - len(failed)} held or skipped, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}; figures in {Path(folder) / 'gpu_check.json'}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "report":
        return report(rest[0])
    if command == "sources":
        result = sources()
    elif command == "burn":
        result = burn(float(rest[0]), rest[1] if len(rest) > 1 else None)
    elif command == "weights":
        result = weights(rest[0], rest[1], float(rest[2]), *rest[3:4])
    elif command == "embeddings":
        result = embeddings(rest[0], rest[1], float(rest[2]) if len(rest) > 2 else 1e-3)
    else:
        print(f"gpu_check.py: unknown command {command!r}; known: sources, burn, embeddings, weights, report", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
