"""mgpu.infer: shards cover every sample once and merge to the single-process result; clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mgpu import infer, train_clip
from mgpu.metrics import retrieval_metrics

# Training and encoding run on the CPU on every machine: the shards' embeddings are compared to 1e-6 and their
# metrics to the trainer's own; where there is a GPU the default (--device auto) would take it
# (test_device_cuda_n_becomes_the_current_device checks that choice)
TINY = ["--image-encoder", "starnet_s050", "--text-encoder", "clip:tiny", "--embed-dim", "32", "--image-size", "32",
        "--train-size", "32", "--val-size", "13", "--batch-size", "8", "--workers", "0", "--max-steps", "2", "--no-tb",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    assert train_clip.main([*TINY, "--output-dir", str(out)]) == 0
    return out


def run_shards(checkpoint, out, n, batch="4", merge=()):
    for i in range(n):
        assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--out", str(out), "--shard", f"{i}/{n}",
                           "--batch-size", batch, "--workers", "0", "--device", "cpu"]) == 0
    assert infer.main(["--checkpoint", str(checkpoint / "model.pt"), "--out", str(out), "--merge", str(n), *merge]) == 0
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


def test_small_sets_are_warned_about_and_one_valid_row_gets_no_metrics(checkpoint, tmp_path, capsys):
    run_shards(checkpoint, tmp_path, 1)
    assert "[WARNING] 13 valid rows: retrieval metrics over so few are coarse (R@1 moves in steps of 0.077" \
        in capsys.readouterr().err
    data = tmp_path / "one"
    data.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(data / "a.jpg")
    (data / "d.csv").write_text("filepath,title\na.jpg,red\nnope.jpg,none\n")
    common = ["--checkpoint", str(checkpoint / "model.pt"), "--out", str(tmp_path / "o")]
    assert infer.main([*common, "--shard", "0/1", "--data", str(data / "d.csv"), "--workers", "0",
                       "--device", "cpu"]) == 0
    assert infer.main([*common, "--merge", "1", "--max-bad-images", "0.5"]) == 0
    assert "1 valid rows: too few for retrieval metrics; none computed" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "image_to_text_R@1" not in metrics and (metrics["samples"], metrics["valid_samples"]) == (2, 1)


def caption_csv(folder, n, bad):
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for i in range(n):
        path = folder / "images" / f"{i:02d}.jpg"
        if bad.get(i) == "text":
            path.write_text("not an image\n")
        elif bad.get(i) != "missing":
            Image.new("RGB", (48, 40), (i * 9 % 256, 255 - i * 5 % 256, 90)).save(path, quality=95)
            if bad.get(i) == "truncated":
                path.write_bytes(path.read_bytes()[:400])
        rows.append(f'images/{i:02d}.jpg,"picture number {i}"')
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def test_an_unreadable_row_is_never_another_images_result_and_is_left_out_of_the_metrics(checkpoint, tmp_path,
                                                                                          capsys):
    data = caption_csv(tmp_path / "d", 27, {5: "text", 9: "missing"})
    common = ["--checkpoint", str(checkpoint / "model.pt"), "--out", str(tmp_path / "o")]
    for i in range(2):
        assert infer.main([*common, "--shard", f"{i}/2", "--data", str(data), "--workers", "0", "--batch-size", "4",
                           "--device", "cpu"]) == 0
    assert "[WARNING] shard 0/2: 2 of 13 rows have an image that cannot be read" in capsys.readouterr().err
    assert infer.main([*common, "--merge", "2"]) == 2  # 2 of 27 is more than the default 0.01
    err = capsys.readouterr().err
    assert "2 of 27 rows have an image that cannot be read (7.4%), more than --max-bad-images 0.01: row 5 " \
           "images/05.jpg (unreadable: UnidentifiedImageError), row 9 images/09.jpg (missing)" in err
    assert not (tmp_path / "o" / "metrics.json").exists() and (tmp_path / "o" / "rows.csv").exists()
    assert infer.main([*common, "--merge", "2", "--max-bad-images", "0.1"]) == 0
    image, text = np.load(tmp_path / "o" / "image_embeddings.npy"), np.load(tmp_path / "o" / "text_embeddings.npy")
    valid = np.load(tmp_path / "o" / "valid.npy")
    assert valid.dtype == bool and np.flatnonzero(~valid).tolist() == [5, 9]
    assert np.isnan(image[[5, 9]]).all() and np.isfinite(image[valid]).all() and np.isfinite(text).all()
    assert not np.allclose(image[4], image[6])  # neighbours are their own images
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    expected = retrieval_metrics(torch.from_numpy(image[valid]), torch.from_numpy(text[valid]))
    assert metrics["image_to_text_R@1"] == expected["image_to_text_R@1"]
    assert metrics["text_to_image_mean_rank"] == expected["text_to_image_mean_rank"]
    assert (metrics["samples"], metrics["valid_samples"], metrics["bad_samples"]) == (27, 25, 2)
    lines = (tmp_path / "o" / "rows.csv").read_text().splitlines()
    assert lines[0] == "position,row,image,valid,problem" and lines[10] == "9,9,images/09.jpg,0,missing"


def test_the_checkpoints_own_split_with_a_bad_row_scores_as_the_trainer_did(tmp_path):
    from mgpu.data.captions import CaptionFile

    probe = caption_csv(tmp_path / "probe", 40, {})
    victim = CaptionFile(probe, 32).split(0.25, 0)[1].row_ids[3]  # a validation row
    data = caption_csv(tmp_path / "d", 40, {victim: "truncated"})
    out = tmp_path / "trained"
    assert train_clip.main([*TINY, "--data", str(data), "--val-fraction", "0.25", "--max-bad-images", "0.05",
                            "--output-dir", str(out)]) == 0
    trained = json.loads((out / "metrics.json").read_text())
    assert trained["val_samples"] == 9  # the trainer left the row out before training
    image, text, metrics = run_shards(out, tmp_path / "res", 2, merge=("--max-bad-images", "0.2"))
    assert metrics["samples"] == 10 and metrics["valid_samples"] == 9 and np.isnan(image[3]).all()
    for key in ("image_to_text_R@1", "text_to_image_R@1", "image_to_text_mean_rank"):
        assert metrics[key] == trained[key], key


def test_device_cuda_n_becomes_the_current_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(d))
    assert infer.pick_device("cuda:1") == torch.device("cuda:1") and calls == [torch.device("cuda:1")]
    assert infer.pick_device("cuda") == torch.device("cuda:0") and calls[-1] == torch.device("cuda:0")
    assert infer.pick_device("cpu") == torch.device("cpu") and len(calls) == 2
    with pytest.raises(infer.InferError, match=r"--device cuda:2: this process sees 2 CUDA device\(s\)"):
        infer.pick_device("cuda:2")
    with pytest.raises(infer.InferError, match="--device gpu0: allowed are auto, cpu, cuda, cuda:N"):
        infer.pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert infer.pick_device("auto") == torch.device("cpu")
    with pytest.raises(infer.InferError, match="--device cuda:0: this PyTorch sees no CUDA device"):
        infer.pick_device("cuda:0")
