"""Every command of the README's ```bash blocks runs as printed, the way a user runs it after `make` and
`source .venv/bin/activate`, so a README example that breaks fails CI.

How the commands run:
- In a copy of the repository (its tracked and untracked-but-not-ignored files) whose `.venv` is a link
  to this checkout's `.venv`, from the copy's top folder, each in a fresh `bash -c` with the venv's bin
  first on PATH (what `source .venv/bin/activate` does) and no PYTHONPATH: `python -m mgpu...` must come
  from the installed package. README order is kept, so later commands see what earlier ones wrote.
- Every command sees the rehearsal server `examples/scenarios/4x-rtx4090-idle.json` (MGPU_FAKE_GPUS; a
  command that sets its own wins), private lock and cache folders, and a fast poll.
- A block that sets a shell variable (`ckpt=...`) or sources a library is one session: its commands run
  in one bash, in order, each checked.
- A command runs as printed unless ADAPTED says what runs instead and why (`--dry-run`, or a few training
  steps where it would train for minutes), or NOT_RUN says why it cannot run here. Both lists name README
  commands exactly: an entry that no longer matches a README command fails (test_the_lists_name_readme_commands).
- A command passes when it exits 0, or with the code EXIT gives it.
- README.zh-CN.md must hold the same commands in the same order (test_the_chinese_readme_has_the_same_commands),
  so each runs once. Its ```console example and config files are checked against the real ones.
The inference examples read a tiny checkpoint that the module's fixture trains once, at the path the
README gives (the demo sweep's first config).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"
READMES = ("README.md", "README.zh-CN.md")
SCENARIO = "examples/scenarios/4x-rtx4090-idle.json"
CKPT = "checkpoints/clip_models/starnet_s050_clip_tiny"
SMALL = "--batch-size 8 --train-size 16 --val-size 8 --workers 0 --no-tb"  # with --max-steps: seconds, not minutes
TIMEOUT_S = 300

# README command -> (what runs instead, why). Keep it short: every entry is a README example not run as printed.
ADAPTED = {
    "make demo": (
        "make -q .venv/.mgpu-deps || { echo '.venv is older than pyproject.toml or requirements: run make deps' >&2; exit 1; }; "
        f"make demo DEMO_TRAIN_ARGS='--max-steps 1 {SMALL}'",
        "its training runs 2 configs for minutes: 1 step each here (and .venv must be up to date, or make "
        "would reinstall it from this copy)"),
    "bash run_train_clip.sh": (
        "bash run_train_clip.sh --dry-run", "6 full-size trainings (starnet_s1-s3 x ViT-B/32, BERT)"),
    'bash run_train_clip.sh --gpus 0,1 --image-encoders starnet_s1,starnet_s2 --text-encoders "clip:ViT-B/32"': (
        'bash run_train_clip.sh --dry-run --gpus 0,1 --image-encoders starnet_s1,starnet_s2 --text-encoders "clip:ViT-B/32"',
        "2 full-size trainings"),
    "bash run_train_clip.sh --config-file examples/sweep_grid.json -- --epochs 5": (
        "bash run_train_clip.sh --dry-run --config-file examples/sweep_grid.json -- --epochs 5",
        "2 trainings of starnet_s1/s2 x ViT-B/32"),
    "bash run_train_clip.sh --preset demo": (
        f"bash run_train_clip.sh --preset demo -- --max-steps 1 {SMALL}", "2 configs of 220 steps: 1 step each"),
    'GPUS="0 1" MAX_UTIL=50 bash run_train_clip.sh --retries 2 --resume': (
        'GPUS="0 1" MAX_UTIL=50 bash run_train_clip.sh --dry-run --retries 2 --resume', "6 full-size trainings"),
    "python -m mgpu.train_clip --preset demo": (
        f"python -m mgpu.train_clip --preset demo --max-steps 1 {SMALL}", "220 steps: 1 here"),
    "python -m mgpu.train_clip --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --image-size 96 --batch-size 16 "
    "--epochs 10 --data examples/data/train.csv --val-data examples/data/test.csv --box-file examples/data/boxes.json "
    "--loss-region 0.5": (
        "python -m mgpu.train_clip --image-encoder starnet_s1 --text-encoder clip:ViT-B/32 --image-size 96 --batch-size 16 "
        "--epochs 10 --data examples/data/train.csv --val-data examples/data/test.csv --box-file examples/data/boxes.json "
        "--loss-region 0.5 --image-encoder starnet_s050 --text-encoder clip:tiny --max-steps 1 --workers 0 --no-tb",
        "the full towers take a minute a step on a CPU and save 1 GB: the small ones (the last flag wins), 1 step, "
        "on the same data, boxes and region loss"),
    "CUDA_VISIBLE_DEVICES=0,1 python -m mgpu.train_clip --preset demo --dp": (
        f"CUDA_VISIBLE_DEVICES=0,1 python -m mgpu.train_clip --preset demo --dp --max-steps 1 {SMALL}",
        "1 step; without a real GPU DataParallel trains on the CPU, so 'Using 2 GPUs' is not checked"),
    "torchrun --standalone --nproc_per_node 4 -m mgpu.train_clip --preset demo": (
        f"torchrun --standalone --nproc_per_node 2 -m mgpu.train_clip --preset demo --max-steps 1 {SMALL}",
        "2 gloo processes for 2 CI cores, 1 step"),
    "python -m mgpu.train_clip --preset demo --output-dir checkpoints/demo_stop --stop-after 100": (
        f"python -m mgpu.train_clip --preset demo --output-dir checkpoints/demo_stop --stop-after 100 --max-steps 2 "
        f"--stop-after 1 {SMALL}", "a run of 2 steps stopped after 1"),
    "python -m mgpu.train_clip --preset demo --output-dir checkpoints/demo_stop --resume auto": (
        f"python -m mgpu.train_clip --preset demo --output-dir checkpoints/demo_stop --resume auto --max-steps 2 {SMALL}",
        "the same 2-step run, resumed at step 1"),
    "CUDA_VISIBLE_DEVICES=0,1 bash train_torchrun.sh --epochs 10 --batch-size 64": (
        "CUDA_VISIBLE_DEVICES=0,1 bash train_torchrun.sh --dry-run --epochs 10 --batch-size 64",
        "a full-size DDP training"),
    "bash train_torchrun.sh --preset demo": (
        f"NVIDIA_SMI=none MGPU_FAKE_GPUS= bash train_torchrun.sh --preset demo --max-steps 1 {SMALL}",
        "the no-GPU case the comment describes (no scenario), 1 step"),
    "CUDA_VISIBLE_DEVICES=0,1 bash train_ddp.sh --epochs 10 --batch-size 64": (
        "CUDA_VISIBLE_DEVICES=0,1 bash train_ddp.sh --dry-run --epochs 10 --batch-size 64", "a full-size DDP training"),
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash train_torchrun.sh --epochs 10": (
        "NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash train_torchrun.sh --dry-run --epochs 10",
        "node 0 of 2 waits for a second machine"),
    "bash gpu_queue.sh --gpus 0,1 examples/jobs.txt": (
        "bash gpu_queue.sh --dry-run --gpus 0,1 examples/jobs.txt", "4 trainings of 220 steps or more"),
    'for lr in 1e-3 3e-3; do echo "python -m mgpu.train_clip --preset demo --lr $lr --output-dir checkpoints/lr$lr"; '
    "done | bash gpu_queue.sh --gpus 0,1 -": (
        'for lr in 1e-3 3e-3; do echo "python -m mgpu.train_clip --preset demo --lr $lr --output-dir checkpoints/lr$lr"; '
        "done | bash gpu_queue.sh --dry-run --gpus 0,1 -", "2 trainings of 220 steps"),
}
# README command -> why it cannot run in this test.
NOT_RUN = {
    "bash bench/gpu_check.sh": "needs an NVIDIA GPU; tests/bats/gpu_check.bats runs it with --smoke (and --dry-run)",
    "make test": "the suite this test is part of (CI runs it: bash .ci/run)",
    "sbatch train_slurm.sbatch --epochs 10": "needs a Slurm cluster; tests/bats/slurm.bats submits it to the "
                                             "one-node Slurm of tests/slurm/cluster.sh",
}
# README command -> (its exit code here, why).
EXIT = {
    "python check_gpus.py --torch": (3, "torch_no_cuda: CI's torch is a CPU build, so it can use none of the "
                                        "scenario's 4 GPUs"),
}


# ---- reading the README ------------------------------------------------------------------------------------

def strip_comment(line: str) -> str:
    """The line without its shell comment (a # at the start of a word, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def blocks(readme: str) -> list[list[str]]:
    """The commands of each ```bash block: comments dropped, continued lines (\\, |, &&, ||) joined."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    out = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        commands, pending = [], ""
        for raw in body.splitlines():
            line = strip_comment(raw).strip()
            if not line:
                continue
            line = pending + line
            if line.endswith("\\"):
                pending = line[:-1].rstrip() + " "
            elif line.endswith(("|", "&&", "||")):
                pending = line + " "
            else:
                commands.append(line)
                pending = ""
        assert not pending, f"{readme}: a ```bash block ends inside a command: {pending!r}"
        out.append(commands)
    return out


def is_session(block: list[str]) -> bool:
    return any(c.startswith("source ") or re.fullmatch(r"[A-Za-z_]\w*=\S*", c) for c in block)


def commands(readme: str) -> list[str]:
    return [c for block in blocks(readme) for c in block]


def units() -> list[tuple[str, list[str]]]:
    """README.md's commands as test units: (id, commands), one command each or one session block."""
    out = []
    for block in blocks("README.md"):
        for unit in [block] if is_session(block) else [[c] for c in block]:
            out.append((f"{len(out):02d} {unit[0][:60]}", unit))
    return out


# ---- running them ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A copy of the repository, with .venv linked to this checkout's, and the tiny checkpoint in place."""
    if not (VENV / "bin" / "python").exists():
        pytest.fail(f"{VENV} is missing: run make deps (the README's commands run in the project's .venv)")
    base = tmp_path_factory.mktemp("readme")
    copy = base / "mgpu copy"  # a space, as a user's folder may have
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    (copy / ".venv").symlink_to(VENV)
    env = environment(base, copy)
    made = run_bash(f"python -m mgpu.train_clip --preset demo --max-steps 1 {SMALL} --output-dir {CKPT}", copy, env)
    assert made.returncode == 0, made.stdout
    return copy, env


def environment(base: Path, copy: Path) -> dict[str, str]:
    ours = ("MGPU_", "CUDA_", "SLURM_", "SBATCH_", "NCCL_", "TORCHELASTIC_")
    theirs = {"PYTHON", "PYTHONPATH", "VIRTUAL_ENV", "GPUS", "MAX_UTIL", "MAX_WAIT", "NVIDIA_SMI", "NPROC_PER_NODE",
              "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours) and k not in theirs}
    env.update(PATH=f"{VENV / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", VIRTUAL_ENV=str(VENV), NO_COLOR="1",
               MGPU_FAKE_GPUS=str(copy / SCENARIO), MGPU_LOCK_DIR=str(base / "locks"),
               MGPU_CACHE_DIR=str(base / "cache"), MGPU_UTIL_WINDOW_MS="0", MGPU_POLL_MS="100", TMPDIR=str(base))
    return env


def run_bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """bash -c SCRIPT in its own process group, stopped whole when it ends or after TIMEOUT_S (a failure)."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"still running after {TIMEOUT_S} s: {script}\n{output[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may outlive it
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(script, proc.returncode, output)


def checked(command: str) -> str:
    """The bash lines that run one README command as this test runs it, and fail naming it."""
    run_as = ADAPTED.get(command, (command,))[0]
    expected = EXIT.get(command, (0,))[0]
    quoted = command.replace("'", "'\\''")
    return (f"{run_as}\nrc=$?; [ $rc -eq {expected} ] || "
            f"{{ echo; echo 'README command failed (exit '$rc', expected {expected}): {quoted}'; exit 1; }}")


@pytest.mark.parametrize("unit", [pytest.param(cmds, id=name) for name, cmds in units()])
def test_readme_command(unit, work):
    copy, env = work
    runnable = [c for c in unit if c not in NOT_RUN]
    if not runnable:
        pytest.skip(f"not run: {NOT_RUN[unit[0]]}")  # listed with the reason; test_not_run_is_short keeps it so
    start = time.perf_counter()
    result = run_bash("\n".join(checked(c) for c in runnable), copy, env)
    print(f"{time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, result.stdout[-6000:]


# ---- the lists, the Chinese README, the files the README shows -----------------------------------------------

def test_the_lists_name_readme_commands():
    readme = set(commands("README.md"))
    for table in (ADAPTED, NOT_RUN, EXIT):
        assert not set(table) - readme, f"no longer a README command: {sorted(set(table) - readme)}"
    assert not set(ADAPTED) & set(NOT_RUN)


def test_not_run_is_short():
    """Skipping is the exception: only what needs a cluster or a GPU, or is this very suite."""
    assert set(NOT_RUN) == {"make test", "sbatch train_slurm.sbatch --epochs 10", "bash bench/gpu_check.sh"}


def test_the_chinese_readme_has_the_same_commands():
    english, chinese = commands("README.md"), commands("README.zh-CN.md")
    assert len(english) > 30
    assert chinese == english


@pytest.mark.parametrize("readme", READMES)
def test_the_config_files_shown_are_the_shipped_ones(readme):
    text = (ROOT / readme).read_text(encoding="utf-8")
    shown = [json.loads(body) for body in re.findall(r"^```json\n(.*?)^```", text, re.M | re.S)]
    for name in ("examples/sweep_grid.json", "examples/sweep_list.json"):
        assert json.loads((ROOT / name).read_text(encoding="utf-8")) in shown, f"{readme} does not show {name} as it is"


@pytest.mark.parametrize("readme", READMES)
def test_the_console_example_is_real_output(readme, work):
    copy, env = work
    text = (ROOT / readme).read_text(encoding="utf-8")
    examples = re.findall(r"^```console\n\$ (.*?)\n(.*?)^```", text, re.M | re.S)
    assert examples
    for command, shown in examples:
        result = run_bash(command + " 2>/dev/null", copy, env)
        assert result.stdout == shown, f"{readme}: the output of {command} changed:\n{result.stdout}"
