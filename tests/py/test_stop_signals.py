"""How the trainer takes the signals that stop a run: a first Ctrl-C (or SIGHUP) stops at the next check step
with a checkpoint, a second Ctrl-C stops at once, a signal ignored at start stays ignored (nohup, a
background job), and a worker started by torchrun asks the kernel for SIGTERM when its agent dies. Each
case runs in a Python process of its own, with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from test_train_clip import ROOT, TINY, run

PROBE = """
import os, signal, sys
from mgpu.monitor import Monitor
import torch
m = Monitor(torch.device("cpu"))
m.install_signal_handlers()
print("hup", "ignored" if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else "caught", flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("first", m.check().stop_signal, flush=True)
try:
    os.kill(os.getpid(), signal.SIGINT)
    print("second: went on", flush=True)
except KeyboardInterrupt:
    print("second: KeyboardInterrupt", flush=True)
"""


def test_a_first_ctrl_c_is_a_stop_request_and_a_second_stops_at_once():
    res = run("-c", PROBE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["hup caught", "first 2", "second: KeyboardInterrupt"]


def test_a_signal_ignored_at_start_stays_ignored():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "py"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert res.stdout.splitlines()[0] == "hup ignored", res.stdout + res.stderr


DEATH = """
import os, signal, sys, time
from mgpu import distributed
mode = sys.argv[1]  # early: the agent dies after the worker's request; late: before it
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
result_r, result_w = os.pipe()
ready_r, ready_w = os.pipe()
agent = os.fork()
if agent == 0:
    os.close(result_r)
    worker = os.fork()
    if worker == 0:
        me_agent = os.getppid()
        if mode == "late":
            while os.getppid() == me_agent:  # the agent is gone: this worker was reparented
                time.sleep(0.01)
        distributed.stop_with_agent()
        os.write(ready_w, b"x")
        deadline = time.monotonic() + (60 if "wait" in sys.argv else 2)
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(result_w, b"term" if got else b"none")
        os._exit(0)
    os.close(result_w)
    if mode == "early":
        os.read(ready_r, 1)
    os._exit(0)
os.close(result_w)
os.close(ready_w)
os.waitpid(agent, 0)
print(os.read(result_r, 10).decode())
"""


def death(mode: str, run_id: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update({"PYTHONPATH": str(ROOT / "py"), "OMP_NUM_THREADS": "1"})
    if run_id is not None:
        env["TORCHELASTIC_RUN_ID"] = run_id
    res = subprocess.run([sys.executable, "-c", DEATH, mode, *(["wait"] if run_id is not None else [])],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_a_torchrun_worker_gets_sigterm_when_its_agent_dies_even_before_it_asked():
    assert death("early", "t") == "term"  # the kernel's PR_SET_PDEATHSIG
    assert death("late", "t") == "term"  # reparented before asking: at once
    assert death("early", "") == "term"  # any value: torchrun sets it
    assert death("early", None) == "none"  # not under torchrun: left alone
