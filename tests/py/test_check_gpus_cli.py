"""check_gpus.py as users run it: a real process, real arguments, real exit codes."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SCENARIOS, run_check_gpus

BUSY = str(SCENARIOS / "4x-rtx4090-gpu2-busy.json")
IDLE = str(SCENARIOS / "4x-rtx4090-idle.json")


def test_the_busy_server_with_gpus_2_and_3_is_explained():
    done = run_check_gpus(env={"MGPU_FAKE_GPUS": BUSY, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert done.returncode == 1, done.stderr
    out = done.stdout
    assert "4 GPU(s) from scenario" in out and "driver 550.54.15, CUDA 12.4" in out
    row2 = next(line for line in out.splitlines() if line.startswith("2 "))
    assert row2.split()[:2] == ["2", "0"] and "95%" in row2 and "4242 python (alice) 19.8 GiB" in row2
    row0 = next(line for line in out.splitlines() if line.startswith("0 "))
    assert row0.split()[:2] == ["0", "-"]
    assert "PyTorch will see 2 GPU(s): cuda:0 = GPU 2, cuda:1 = GPU 3" in out
    assert "[warning] gpu_busy: GPU 2 (cuda:0) is 95% busy" in out
    assert "try CUDA_VISIBLE_DEVICES=0,3" in out
    assert "[info] hidden_gpus: 4 GPUs present, 2 visible" in out


def test_idle_server_exits_0():
    done = run_check_gpus(env={"MGPU_FAKE_GPUS": IDLE})
    assert done.returncode == 0 and "No problems found." in done.stdout
    assert "Training prints 'Using 4 GPUs for training'" in done.stdout


def test_json_has_the_documented_keys():
    done = run_check_gpus("--json", env={"MGPU_FAKE_GPUS": BUSY, "CUDA_VISIBLE_DEVICES": "3,2"})
    data = json.loads(done.stdout)
    assert {"driver_version", "cuda_visible_devices", "gpus", "problems"} <= set(data)
    assert data["cuda_visible_devices"] == "3,2"
    gpu = data["gpus"][2]
    assert set(gpu) == {"index", "cuda_index", "uuid", "name", "memory_used_mib", "memory_total_mib",
                        "utilization_gpu", "processes"}
    assert [g["cuda_index"] for g in data["gpus"]] == [None, None, 1, 0]
    assert gpu["processes"] == [{"pid": 4242, "name": "python", "used_memory_mib": 20270, "user": "alice"}]
    assert all(set(p) == {"code", "severity", "message"} for p in data["problems"])
    assert done.returncode == 1


def test_plan_in_json_and_text():
    done = run_check_gpus("--plan", "15", "--json", env={"MGPU_FAKE_GPUS": IDLE})
    plan = json.loads(done.stdout)["plan"]
    assert plan["replicas"] == 4 and [g["replicas"] for g in plan["gpus"]] == [1, 1, 1, 1]
    text = run_check_gpus("--plan", "7.5", env={"MGPU_FAKE_GPUS": IDLE}).stdout
    assert "GPU 0 (cuda:0): 23.7 GiB free -> 2 replicas" in text


def test_a_plan_that_fits_nowhere_exits_3():
    done = run_check_gpus("--plan", "40", env={"MGPU_FAKE_GPUS": IDLE})
    assert done.returncode == 3 and "no GPU has 40.5 GiB free" in done.stdout


@pytest.mark.parametrize("args,env,message", [
    (["--plan", "-1"], {}, "argument --plan: must be a number of GiB above 0, got '-1'"),
    (["--plan", "lots"], {}, "argument --plan: must be a number of GiB above 0, got 'lots'"),
    (["--max-util", "150"], {}, "MAX_UTIL must be an integer from 0 to 100, got '150'"),
    ([], {"MAX_UTIL": "high"}, "environment variable MAX_UTIL must be an integer from 0 to 100, got 'high'"),
    (["--context-mib", "x"], {}, "must be a whole number of MiB, 0 or more, got 'x'"),
    (["--frobnicate"], {}, "unrecognized arguments: --frobnicate"),
])
def test_usage_errors_exit_2_naming_the_value(args, env, message):
    done = run_check_gpus(*args, env={"MGPU_FAKE_GPUS": IDLE, **env})
    assert done.returncode == 2 and message in done.stderr


def test_a_bad_scenario_exits_2_naming_the_file():
    bad = ROOT / "tests" / "fixtures" / "bad-scenarios" / "used-over-total.json"
    done = run_check_gpus(env={"MGPU_FAKE_GPUS": str(bad)})
    assert done.returncode == 2
    assert f"MGPU_FAKE_GPUS: {bad}: .gpus[1].memory_used_mib: must be an integer from 0 to 100" in done.stderr


def test_everything_hidden_exits_3():
    done = run_check_gpus(env={"MGPU_FAKE_GPUS": IDLE, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 3 and "visible_empty" in done.stdout and "hides every GPU" in done.stdout


def test_no_driver_exits_3_with_what_to_do():
    # This machine has no NVIDIA driver, so this is the real NVML path failing for real.
    done = run_check_gpus("--json")
    data = json.loads(done.stdout)
    assert done.returncode == 3 and data["gpus"] == [] and data["source"] == "none"
    assert data["problems"][0]["code"] == "no_driver"
    assert "MGPU_FAKE_GPUS=" in data["problems"][0]["message"]


def test_torch_is_only_imported_when_asked():
    probe = ("import sys; sys.argv = ['check_gpus.py', '--json']; sys.path.insert(0, {py!r});"
             "from mgpu.check_gpus import main; main(); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    done = subprocess.run([sys.executable, "-c", probe.format(py=str(ROOT / "py"))], capture_output=True,
                          text=True, env={"MGPU_FAKE_GPUS": IDLE, "PATH": "/usr/bin:/bin"}, check=False)
    assert done.stdout.strip().endswith("NO-TORCH"), done.stderr


def test_torch_view_on_this_cpu_build():
    done = run_check_gpus("--torch", "--json", env={"MGPU_FAKE_GPUS": IDLE})
    data = json.loads(done.stdout)
    assert data["torch"]["cuda"] is None and data["torch"]["device_count"] == 0
    assert "torch_no_cuda" in [p["code"] for p in data["problems"]]
    assert done.returncode == 1


def test_without_nvidia_ml_py_the_cli_reads_nvidia_smi(tmp_path):
    shadow = tmp_path / "no-nvml"
    shadow.mkdir()
    (shadow / "pynvml.py").write_text("raise ImportError('nvidia-ml-py is not installed here')\n")
    done = run_check_gpus("--json", python_path=[str(shadow)],
                          env={"NVIDIA_SMI": str(ROOT / "tests" / "fakes" / "nvidia-smi"),
                               "MGPU_FAKE_SMI_SCENARIO": BUSY, "CUDA_VISIBLE_DEVICES": "2"})
    data = json.loads(done.stdout)
    assert data["source"] == "nvidia-smi" and len(data["gpus"]) == 4
    assert [g["cuda_index"] for g in data["gpus"]] == [None, None, 0, None]
    assert {"gpu_busy", "hidden_gpus", "note"} <= {p["code"] for p in data["problems"]}
