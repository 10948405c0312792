"""check_gpus.py as users run it: a real process, real arguments, real exit codes."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SCENARIOS, real_gpus, run_check_gpus, scenario_data
from mgpu import check_gpus, diagnose, visible

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
    assert set(gpu) == {"index", "cuda_index", "uuid", "pci_bus_id", "name", "memory_used_mib", "memory_total_mib",
                        "utilization_gpu", "compute_capability", "processes", "processes_known", "mig_devices",
                        "lost", "faults"}
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
    for same in ("7.5G", "7.5GiB", "7680M"):  # a unit, as nvidia-smi and users write memory
        assert run_check_gpus("--plan", same, env={"MGPU_FAKE_GPUS": IDLE}).stdout == text


def test_a_plan_that_fits_nowhere_exits_3():
    done = run_check_gpus("--plan", "40", env={"MGPU_FAKE_GPUS": IDLE})
    assert done.returncode == 3 and "no GPU has 40.5 GiB free" in done.stdout


@pytest.mark.parametrize("args,env,message", [
    (["--plan", "-1"], {}, "argument --plan: must be GiB above 0, as 15, 15G or 15360M; got '-1'"),
    (["--plan", "lots"], {}, "argument --plan: must be GiB above 0, as 15, 15G or 15360M; got 'lots'"),
    (["--plan", "inf"], {}, "argument --plan: must be GiB above 0, as 15, 15G or 15360M; got 'inf'"),
    (["--plan", "15T"], {}, "argument --plan: must be GiB above 0, as 15, 15G or 15360M; got '15T'"),
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
    # Without an NVIDIA driver this is the real NVML path failing for real.
    if real_gpus():
        pytest.skip(f"this machine has {real_gpus()} GPU(s): the test pins what a machine without a driver shows")
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
    import torch

    if torch.version.cuda is not None:
        pytest.skip(f"torch here is a CUDA build ({torch.version.cuda}): the test pins a CPU-only build's view")
    done = run_check_gpus("--torch", "--json", env={"MGPU_FAKE_GPUS": IDLE})
    data = json.loads(done.stdout)
    assert data["torch"]["cuda"] is None and data["torch"]["device_count"] == 0
    assert "torch_no_cuda" in [p["code"] for p in data["problems"]]
    assert done.returncode == 3  # torch can use none of the 4 GPUs: training would run on the CPU
    without = run_check_gpus("--json", env={"MGPU_FAKE_GPUS": IDLE})
    assert without.returncode == 0  # the same GPUs, torch not asked: usable


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


def test_uuid_pci_bus_id_nvml_and_cuda_index_side_by_side():
    done = run_check_gpus(env={"MGPU_FAKE_GPUS": str(SCENARIOS / "2x-rtx3090-2x-rtx4090.json")})
    lines = done.stdout.splitlines()
    assert lines[3].split()[:5] == ["GPU", "CUDA", "UUID", "PCI", "BUS"]
    row0 = next(line for line in lines if line.startswith("0 "))
    assert row0.split()[:4] == ["0", "2", "GPU-30900a7e-3b1d-4f6a-9c2e-0d8b7a6f0000", "00000000:01:00.0"]
    assert "PyTorch will see 4 GPU(s): cuda:0 = GPU 2, cuda:1 = GPU 3, cuda:2 = GPU 0, cuda:3 = GPU 1" in done.stdout
    assert "[warning] device_order:" in done.stdout and done.returncode == 1
    pci = run_check_gpus(env={"MGPU_FAKE_GPUS": str(SCENARIOS / "2x-rtx3090-2x-rtx4090.json"),
                              "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert "cuda:0 = GPU 0, cuda:1 = GPU 1" in pci.stdout and pci.returncode == 0


def test_mig_instances_are_devices_in_the_table_and_json():
    mig = str(SCENARIOS / "2x-a100-40gb-mig.json")
    uuid = "MIG-5c1e0a7e-9b1d-5f6a-8c2e-0d8b7a6f2002"
    done = run_check_gpus(env={"MGPU_FAKE_GPUS": mig, "CUDA_VISIBLE_DEVICES": uuid})
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line[:1].isdigit()}
    assert rows["0/mig1"][:3] == ["0/mig1", "0", uuid] and rows["0/mig0"][1] == "-" and rows["0"][1] == "-"
    assert "MIG 2g.10gb" in " ".join(rows["0/mig1"])
    assert f"PyTorch will see 1 GPU(s): cuda:0 = {uuid} (a MIG instance of GPU 0)" in done.stdout
    data = json.loads(run_check_gpus("--json", env={"MGPU_FAKE_GPUS": mig, "CUDA_VISIBLE_DEVICES": uuid}).stdout)
    assert [(m["parent_index"], m["name"], m["cuda_index"]) for m in data["mig_devices"]] == \
        [(0, "3g.20gb", None), (0, "2g.10gb", 0), (0, "1g.5gb", None)]
    assert data["mig_devices"][1]["memory_total_mib"] == 9856 and data["links"] == [{"gpus": [0, 1], "level": "NV12"}]


def test_unified_memory_and_lost_gpus_are_reported_without_a_traceback(fake_nvml, capsys):
    data = scenario_data("4x-rtx4090-gpu2-busy")
    data["gpus"][0].update(memory_total_mib=None, memory_used_mib=None)
    nvml = fake_nvml(data)
    nvml.lost.add(3)
    assert check_gpus.main(["--plan", "10"]) == 1
    out = capsys.readouterr().out
    assert "GPU 0 (cuda:0): memory unknown -> 0 replicas" in out
    row3 = next(line for line in out.splitlines() if line.startswith("3 "))
    assert "(cannot be read: GPU is lost)" in row3
    assert "[error] gpu_lost: GPU 3 cannot be read" in out and "[info] memory_unknown: GPU 0: memory is not" in out
    assert check_gpus.main(["--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"][3]["lost"] and data["gpus"][0]["memory_total_mib"] is None


@pytest.mark.parametrize("view, code", [
    (None, 0),  # torch not asked
    (diagnose.TorchView("2.13.0+cu124", "12.4", device_count=4), 0),
    (diagnose.TorchView("2.13.0+cu124", "12.4", device_count=2), 0),  # fewer: a warning of its own, still usable
    (diagnose.TorchView("2.13.0+cpu", None), 3),
    (diagnose.TorchView("2.13.0+cu124", "12.4", error="CUDA driver version is insufficient"), 3),  # no device
    (diagnose.TorchView("2.13.0+cu124", "12.4", device_count=4, error="NCCL is not available"), 0),  # usable
    (diagnose.TorchView("2.13.0+cu124", "12.4", device_count=0), 3),
])
def test_with_torch_a_torch_that_can_use_no_visible_gpu_exits_3(view, code):
    vis = visible.Visibility(None, [0, 1, 2, 3])
    assert check_gpus.exit_code(vis, [], None, view) == code
