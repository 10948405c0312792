"""The trainer and mgpu.infer on tar shards: a resumed run equals a straight one, two gloo ranks make the same
number of steps on uneven shards, and inference reads every sample of the shards in order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mgpu import infer
from mgpu.checkpoint import read_checkpoint
from test_data_shards import make_shards

ROOT = Path(__file__).resolve().parents[2]
# --device cpu: bit-equal weights, gloo ranks and CPU inference on every machine; where there is a GPU the
# default (auto) would take it
TINY = ["--image-encoder", "starnet_s050", "--text-encoder", "clip:tiny", "--embed-dim", "32", "--image-size", "32",
        "--batch-size", "4", "--warmup", "2", "--lr", "1e-3", "--lr-scale", "none", "--no-tb", "--device", "cpu"]


def trainer(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "py"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_resumed_mid_epoch_on_tar_shards_reaches_the_weights_of_a_straight_run(tmp_path):
    make_shards(tmp_path / "shards", [9, 13, 6, 11, 8])  # the last shard is held out for validation
    data = ["--data", str(tmp_path / "shards" / "{000000..000004}.tar"), "--val-fraction", "0.2", "--workers", "2",
            "--max-steps", "11"]
    straight = trainer("-m", "mgpu.train_clip", *TINY, *data, "--output-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    # 39 training samples, 2 streams (1 process x 2 workers): 19 each, 4 batches of 4 each; 8 steps an epoch
    assert "11 steps (8 per epoch of 32 samples)" in straight.stdout
    first = trainer("-m", "mgpu.train_clip", *TINY, *data, "--stop-after", "5", "--output-dir", str(tmp_path / "split"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = trainer("-m", "mgpu.train_clip", *TINY, *data, "--resume", "auto", "--output-dir", str(tmp_path / "split"))
    assert second.returncode == 0, second.stdout + second.stderr
    a = read_checkpoint(tmp_path / "straight" / "checkpoint_11.pt")["model"]
    b = read_checkpoint(tmp_path / "split" / "checkpoint_11.pt")["model"]
    for key in a:  # the resume starts mid-epoch, with worker 1's turn, and crosses into the next epoch
        assert torch.equal(a[key], b[key]), key
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert metrics["val_samples"] == 8 and metrics["completed"]


def test_two_gloo_ranks_on_uneven_shards_make_the_same_steps_and_finish(tmp_path):
    make_shards(tmp_path / "shards", [5, 17, 3, 12, 9])
    run = trainer("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                  "-m", "mgpu.train_clip", *TINY, "--data", str(tmp_path / "shards" / "{000000..000003}.tar"), "--val-data",
                  str(tmp_path / "shards" / "000004.tar"), "--workers", "1", "--epochs", "2",
                  "--output-dir", str(tmp_path / "o"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Using 2 CPU processes for training (DDP, one process each, backend gloo)" in run.stdout
    # 37 training samples, 2 streams (2 processes x 1 worker): 18 each, 4 batches of 4 on each rank
    assert "8 steps (4 per epoch of 16 samples), global batch 8 (4 x 2 processes)" in run.stdout
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["completed"] and metrics["world_size"] == 2 and metrics["val_samples"] == 9


def test_inference_on_tar_shards_encodes_every_sample_in_order_and_marks_a_bad_one(tmp_path, capsys):
    make_shards(tmp_path / "shards", [6, 7, 6], bad={8: "image"})
    spec = str(tmp_path / "shards" / "{000000..000002}.tar")
    ckpt = tmp_path / "ckpt"
    run = trainer("-m", "mgpu.train_clip", *TINY, "--data", spec, "--workers", "0", "--max-steps", "1",
                  "--val-fraction", "0.34", "--max-bad-images", "0.2", "--output-dir", str(ckpt))
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "res"
    for i in range(2):
        assert infer.main(["--checkpoint", str(ckpt / "model.pt"), "--out", str(out), "--shard", f"{i}/2",
                           "--data", spec, "--workers", "0", "--batch-size", "4", "--device", "cpu"]) == 0
    assert infer.main(["--checkpoint", str(ckpt / "model.pt"), "--out", str(out), "--merge", "2",
                       "--max-bad-images", "0.1"]) == 0
    valid = np.load(out / "valid.npy")
    assert valid.shape == (19,) and np.flatnonzero(~valid).tolist() == [8]
    rows = (out / "rows.csv").read_text().splitlines()
    assert rows[1] == "0,000000.tar:000000,000000.jpg,1," and rows[9] == \
        "8,000001.tar:000008,000008.jpg,0,unreadable: UnidentifiedImageError"
    assert json.loads((out / "metrics.json").read_text())["valid_samples"] == 18
