"""mgpu.infer: shards cover every sample once and merge to the single-process result; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mgpu import infer, train_clip

TINY = ["--image-encoder", "starnet_s050", "--text-encoder", "clip:tiny", "--embed-dim", "32", "--image-size", "32",
        "--train-size", "32", "--val-size", "13", "--batch-size", "8", "--workers", "0", "--max-steps", "2", "--no-tb"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert train_clip.main([*TINY, "--output-dir", str(out)]) == 0
    return out


def run_shards(checkpoint, out, n, batch="4"):
    for i in range(n):
        assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--out", str(out), "--shard", f"{i}/{n}",
                           "--batch-size", batch, "--workers", "0"]) == 0
    assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--out", str(out), "--merge", str(n)]) == 0
    return (np.load(out / "image_embeddings.npy"), np.load(out / "text_embeddings.npy"),
            json.loads((out / "metrics.json").read_text()))


def test_one_two_and_three_uneven_shards_give_the_single_process_result(checkpoint, tmp_path):
    image1, text1, metrics1 = run_shards(checkpoint, tmp_path / "n1", 1)
    assert image1.shape == (13, 32) and image1.dtype == np.float32
    for n in (2, 3):
        image, text, metrics = run_shards(checkpoint, tmp_path / f"n{n}", n)
        # float rounding may differ with batch composition; the rows are the same samples, in order
        assert np.allclose(image, image1, atol=1e-6) and np.allclose(text, text1, atol=1e-6)
        assert [s["samples"] for s in metrics["shards"]] == ([6, 7] if n == 2 else [4, 4, 5])
        for key in ("image_to_text_R@1", "text_to_image_R@5", "image_to_text_mean_rank"):
            assert metrics[key] == metrics1[key]
    trained = json.loads((checkpoint / "metrics.json").read_text())  # the trainer's own evaluation
    assert metrics1["image_to_text_R@1"] == trained["image_to_text_R@1"] and metrics1["samples"] == 13


def test_merge_refuses_missing_or_mismatched_shards(checkpoint, tmp_path, capsys):
    run_shards(checkpoint, tmp_path, 2)
    (tmp_path / "shards" / "shard_1_of_2.npz").unlink()
    assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--out", str(tmp_path), "--merge", "2"]) == 2
    assert "shard(s) 1 of 2 missing" in capsys.readouterr().err
    np.savez(tmp_path / "shards" / "shard_1_of_2.npz", image=np.zeros((6, 32), np.float32),
             text=np.zeros((6, 32), np.float32), index=np.arange(0, 6))  # rows 0-5 twice, 6-12 never
    assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--out", str(tmp_path), "--merge", "2"]) == 2
    assert "do not hold samples 0-12 exactly once (12 rows, 6 distinct)" in capsys.readouterr().err


def test_the_memory_plan_counts_the_weights(checkpoint, capsys):
    assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--plan", "--batch-size", "64"]) == 0
    parts = dict(p.split("=") for p in capsys.readouterr().out.split())
    weights = sum(t.numel() * 4 for t in torch.load(checkpoint / "model.pt", weights_only=True)["model"].values())
    assert int(parts["weights"]) == -(-weights // 2**20) and int(parts["context"]) == 500
    assert int(parts["total"]) == sum(int(parts[k]) for k in ("weights", "activations", "context"))


def test_bad_checkpoints_and_flags_are_clear_errors(checkpoint, tmp_path, capsys):
    def error(*args):
        assert infer.main(["--out", str(tmp_path), "--shard", "0/1", *args]) == 2
        return capsys.readouterr().err

    assert "--checkpoint /nope.pt: no such checkpoint file" in error("--checkpoint", "/nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert "bad.pt: not a readable checkpoint" in error("--checkpoint", str(tmp_path / "bad.pt"))
    torch.save({"model": {}}, tmp_path / "bare.pt")
    assert "holds no mgpu.train_clip config" in error("--checkpoint", str(tmp_path / "bare.pt"))
    assert ("--image-encoder starnet_s1: the checkpoint" in error("--checkpoint", str(checkpoint / "model.pt"),
                                                                  "--image-encoder", "starnet_s1"))
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", "x", "--shard", "3/3"])
    assert "'3/3': I must be from 0 to N-1" in capsys.readouterr().err
