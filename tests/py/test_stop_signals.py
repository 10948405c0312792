"""How the trainer takes the signals that stop a run: a first Ctrl-C (or SIGHUP) stops at the next check step
with a checkpoint, a second Ctrl-C stops at once, a signal ignored at start stays ignored (nohup, a
background job), and a worker started by torchrun asks the kernel for SIGTERM when its agent dies. Each
case runs in a Python process of its own, with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from test_train_clip import ROOT

PROBE = """
import os, signal, sys
from mgpu.monitor import Monitor
import torch
m = Monitor(torch.device("cpu"))
m.install_signal_handlers()
print("hup", "ignored" if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else "caught", flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("first", m.check().stop_signal, flush=True)
try:  # a second Ctrl-C: INT again, or, under torchrun, the TERM its agent sends after it
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    print("second: went on", flush=True)
except KeyboardInterrupt:
    print("second: KeyboardInterrupt", flush=True)
"""


def probe(second: str, hup=signal.SIG_DFL) -> subprocess.CompletedProcess:
    """PROBE with SIGINT at its default and SIGHUP as given, whatever this test runner was started with
    (under nohup, or as a background job, they arrive ignored, and ignored they would stay)."""
    def dispositions():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, hup)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "py"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", PROBE, second], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=dispositions)


def test_a_first_ctrl_c_is_a_stop_request_and_a_second_stops_at_once():
    for second in ("SIGINT", "SIGTERM"):
        res = probe(second)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["hup caught", "first 2", "second: KeyboardInterrupt"]


def test_a_signal_ignored_at_start_stays_ignored():
    res = probe("SIGINT", hup=signal.SIG_IGN)
    assert res.stdout.splitlines() == ["hup ignored", "first 2", "second: KeyboardInterrupt"], res.stdout + res.stderr


DEATH = """
import os, signal, sys, time
from mgpu import distributed
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
result_r, result_w = os.pipe()
ready_r, ready_w = os.pipe()
agent = os.fork()
if agent == 0:  # the agent, a Python process: starts the worker, waits for its word, then dies
    os.close(result_r)
    worker = os.fork()
    if worker == 0:
        os.setsid()  # as torchrun starts its workers (start_new_session)
        distributed.stop_with_agent()
        os.write(ready_w, b"x")
        deadline = time.monotonic() + (60 if "wait" in sys.argv else 2)
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(result_w, b"term" if got else b"none")
        os._exit(0)
    os.close(result_w)
    os.read(ready_r, 1)
    os._exit(0)
os.close(result_w)
os.close(ready_w)
os.waitpid(agent, 0)
print(os.read(result_r, 10).decode())
"""

# a worker whose parent is no Python process (as when a reaper took it: init, tini); "lead" makes it lead a
# session, as torchrun's own children do
UNDER_SH = """
import os, signal, sys, time
from mgpu import distributed
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
if sys.argv[1] == "lead":
    os.setsid()
distributed.stop_with_agent()
deadline = time.monotonic() + 2
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
print("term" if got else "none")
"""


def env_with(run_id: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update({"PYTHONPATH": str(ROOT / "py"), "OMP_NUM_THREADS": "1"})
    if run_id is not None:
        env["TORCHELASTIC_RUN_ID"] = run_id
    return env


def death(run_id: str | None) -> str:
    res = subprocess.run([sys.executable, "-c", DEATH, *(["wait"] if run_id is not None else [])],
                         capture_output=True, text=True, env=env_with(run_id), timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def under_sh(mode: str) -> subprocess.CompletedProcess:
    # the shell stays the parent: a second command follows the Python one
    return subprocess.run(["sh", "-c", 'python="$1"; shift; "$python" "$@"; true', "sh", sys.executable, "-c",
                           UNDER_SH, mode], capture_output=True, text=True, env=env_with("t"), timeout=120)


def test_a_torchrun_worker_gets_sigterm_when_its_agent_dies():
    assert death("t") == "term"  # the kernel's PR_SET_PDEATHSIG
    assert death("") == "term"  # any value: torchrun sets it
    assert death(None) == "none"  # not under torchrun: left alone


def test_a_worker_whose_agent_died_before_it_asked_stops_at_once_and_says_why():
    res = under_sh("lead")
    assert res.stdout.strip() == "term", res.stdout + res.stderr
    assert "mgpu.train_clip: torchrun's agent is gone (this process's parent is now pid " in res.stderr
    res = under_sh("follow")  # not torchrun's own child (torchrun --no-python nsys ... python): left alone
    assert res.stdout.strip() == "none", res.stdout + res.stderr
