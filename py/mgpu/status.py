"""A sweep seen from another terminal: the live table of a local sweep, and one table across sweeps.

    python -m mgpu.status LOG_DIR [--watch SECONDS] [--json]     # bash run_train_clip.sh --status [--watch]
    python -m mgpu.status --compare LOG_DIR [--json]              # bash run_train_clip.sh --compare

The launcher appends one line per event to ``LOG_DIR/sweep_<YYYYmmdd_HHMMSS>_<pid>.events`` (tab-separated:
sweep, job, start, wait, retry, end, finish); this module replays the newest such file and reads each
running job's log for its progress (the trainer's ``step N/M ... loss X ... ETA T`` lines). Nothing runs in
the background for it. ``--compare`` reads every ``summary_*.json`` in LOG_DIR. No torch import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STEP = re.compile(r"^step (\d+)/(\d+)\b(.*)$")
LOSS = re.compile(r"\bloss ([-+0-9.eE]+|nan|inf)")
ETA = re.compile(r"\bETA (\S+)")


class StatusError(RuntimeError):
    """Nothing to show (no sweep in the folder, an unreadable file); exit 1 with the message."""


@dataclass
class Job:
    name: str
    state: str = "queued"
    gpu: str = ""
    log: str = ""
    started: float | None = None
    seconds: float | None = None
    exit: str = ""
    failure: str = ""
    detail: str = ""
    waiting: str = ""
    retries: int = 0
    params: dict = field(default_factory=dict)
    step: int | None = None
    total: int | None = None
    loss: str = ""
    eta: str = ""


@dataclass
class Sweep:
    path: str
    started: float = 0.0
    pid: int = 0
    host: str = ""
    finished: float | None = None
    exit: str = ""
    jobs: dict[str, Job] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def launcher_alive(self) -> bool | None:
        """Is the launcher still running? None when it runs on another host."""
        if self.host and self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def newest_events(log_dir: str) -> Path:
    files = sorted(Path(log_dir).glob("sweep_*.events"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise StatusError(f"no sweep in {log_dir} (a local sweep writes {log_dir}/sweep_<time>_<pid>.events; "
                          f"a Slurm sweep: --backend slurm --status)")
    return files[-1]


def replay(path: Path) -> Sweep:
    sweep = Sweep(str(path))
    for line in path.read_text(errors="replace").splitlines():
        f = line.split("\t")
        kind = f[0]
        try:
            if kind == "sweep":
                sweep.started, sweep.pid, sweep.host = int(f[1]) / 1000, int(f[2]), f[3]
            elif kind == "job":
                job = Job(f[1], state=f[2], detail=f[5] if len(f) > 5 else "")
                job.params = json.loads(f[3]) if len(f) > 3 and f[3] else {}
                sweep.jobs[job.name] = job
                sweep.order.append(job.name)
            elif kind == "start":
                job = sweep.jobs[f[1]]
                job.state, job.gpu, job.log, job.started, job.waiting = "running", f[2], f[3], int(f[4]) / 1000, ""
            elif kind == "wait":
                job = sweep.jobs[f[1]]
                job.state, job.waiting = "waiting", f[3]
            elif kind == "retry":
                job = sweep.jobs[f[1]]
                job.state, job.retries, job.failure = "queued", int(f[2]), f[3]
            elif kind == "end":
                job = sweep.jobs[f[1]]
                job.state, job.exit, job.failure, job.detail = f[2], f[3], f[4], f[5]
                job.seconds = int(f[6]) / 1000
            elif kind == "finish":
                sweep.finished, sweep.exit = int(f[1]) / 1000, f[2]
        except (IndexError, KeyError, ValueError):
            continue  # a line cut short by a crash, or from a newer mgpu: the rest still tells
    return sweep


def progress(job: Job) -> None:
    """The last progress line of a running job's log: step/total, loss, ETA."""
    try:
        with open(job.log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode(errors="replace")
    except OSError:
        return
    for line in reversed(re.split(r"[\r\n]+", tail)):
        match = STEP.match(line.strip())
        if match:
            job.step, job.total = int(match.group(1)), int(match.group(2))
            loss, eta = LOSS.search(match.group(3)), ETA.search(match.group(3))
            job.loss, job.eta = (loss.group(1) if loss else ""), (eta.group(1) if eta else "")
            return


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def status_rows(sweep: Sweep, now: float) -> list[list[str]]:
    rows = [["config", "state", "gpu", "elapsed", "step", "loss", "eta", "detail"]]
    for name in sweep.order:
        job = sweep.jobs[name]
        elapsed = job.seconds if job.seconds is not None else (now - job.started if job.started else None)
        step = f"{job.step}/{job.total}" if job.step is not None else "-"
        detail = job.waiting if job.state == "waiting" else (job.failure or job.detail)
        if job.retries:
            detail = f"retry {job.retries}" + (f" after {job.failure}" if job.failure else "")
        state = job.state if not job.exit or job.state == "running" else f"{job.state} ({job.exit})"
        rows.append([name, state, job.gpu or "-", duration(elapsed), step, job.loss or "-", job.eta or "-",
                     detail or "-"])
    return rows


def render_status(sweep: Sweep) -> str:
    now = time.time()
    for job in sweep.jobs.values():
        if job.state == "running":
            progress(job)
    counts: dict[str, int] = {}
    for job in sweep.jobs.values():
        counts[job.state] = counts.get(job.state, 0) + 1
    alive = sweep.launcher_alive()
    if sweep.finished is not None:
        where = f"finished after {duration(sweep.finished - sweep.started)} (exit {sweep.exit})"
    elif alive is False:
        where = (f"the launcher (pid {sweep.pid}) is gone without a summary: jobs shown running may still run "
                 f"on their own and mark themselves done; run the sweep again with --resume")
    else:
        where = f"running for {duration(now - sweep.started)}, launcher pid {sweep.pid} on {sweep.host}"
    head = f"{sweep.path}: {len(sweep.jobs)} config(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{head}\n{where}\n{table(status_rows(sweep, now))}"


def compare(log_dir: str, left_out: list[str] | None = None) -> list[dict]:
    """The newest record of every config across LOG_DIR's summaries, best key metric first. A summary that
    cannot be read is left out, and said in LEFT_OUT ("<path>: <why>")."""
    latest: dict[str, dict] = {}
    unreadable = [] if left_out is None else left_out
    for path in sorted(Path(log_dir).glob("summary_*.json")):
        try:  # bytes that are not UTF-8 (a summary from an older mgpu) cost only those characters
            doc = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:  # cut short by a full disk, say
            unreadable.append(f"{path}: {exc}")
            continue
        for config in doc.get("configs", []):
            if config.get("status") == "skipped" and config.get("name") in latest:
                continue  # done earlier: the earlier record has its results
            metrics = config.get("metrics") or {}
            key = metrics.get("key_metric") if isinstance(metrics.get("key_metric"), str) else None
            latest[config.get("name", "?")] = {
                "config": config.get("name"), "image_encoder": config.get("image_encoder"),
                "text_encoder": config.get("text_encoder"), "params": config.get("params") or {},
                "status": config.get("status"), "seconds": config.get("seconds"), "key_metric": key,
                "value": metrics.get(key) if key else None,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                            and k.endswith(("R@1", "R@5", "val_loss", "mean_rank"))},
                "summary": path.name}
    if not latest and unreadable:
        raise StatusError(f"no readable summary_*.json in {log_dir}: {len(unreadable)} left out (see above)")
    if not latest:
        raise StatusError(f"no summary_*.json in {log_dir}: a sweep writes one when it ends")
    return sorted(latest.values(), key=lambda r: (r["value"] is None, -(r["value"] or 0), r["config"]))


def render_compare(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r["params"] if k not in keys]
    metric = next((r["key_metric"] for r in rows if r["key_metric"]), "metric")
    out = [["config", *keys, "status", "seconds", metric]]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        out.append([r["config"], *(str(r["params"].get(k, "-")) for k in keys), r["status"] or "-",
                    str(r["seconds"] if r["seconds"] is not None else "-"), value])
    return table(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgpu.status", description=__doc__.split("\n\n")[0])
    p.add_argument("log_dir", help="the sweep's LOG_DIR")
    p.add_argument("--compare", action="store_true", help="one table across every summary in LOG_DIR")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until the sweep ends")
    p.add_argument("--json", action="store_true", help="the same as JSON on stdout, for scripts")
    args = p.parse_args(argv)
    try:
        if args.compare:
            left_out: list[str] = []
            try:
                rows = compare(args.log_dir, left_out)
            finally:
                for why in left_out:
                    print(f"mgpu.status: left out {why}", file=sys.stderr)
            print(json.dumps(rows, indent=2) if args.json else render_compare(rows))
            return 0
        while True:
            sweep = replay(newest_events(args.log_dir))
            if args.json:
                for job in sweep.jobs.values():
                    if job.state == "running":
                        progress(job)
                print(json.dumps({**{k: v for k, v in asdict(sweep).items() if k not in ("jobs", "order")},
                                  "launcher_alive": sweep.launcher_alive(),
                                  "jobs": [asdict(sweep.jobs[n]) for n in sweep.order]}, indent=2))
                return 0
            text = render_status(sweep)
            if not args.watch:
                print(text)
                return 0
            sys.stdout.write("\033[H\033[2J" + text + "\n" if sys.stdout.isatty() else text + "\n\n")
            sys.stdout.flush()
            if sweep.finished is not None or sweep.launcher_alive() is False:
                return 0
            time.sleep(args.watch)
    except StatusError as exc:
        print(f"mgpu.status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
