"""Checks before training: unreadable images against --max-bad-images on any size of data, unreadable
validation rows left out (never scored as another image), and validation sets too small to mean anything."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgpu.data import checks, loading
from mgpu.data.captions import CaptionFile, DataError
from mgpu.data.checks import too_many_bad
from mgpu.train_params import parse_args

TINY = ["--text-encoder", "clip:tiny", "--image-size", "32", "--workers", "0", "--batch-size", "4"]


def caption_csv(folder: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    """n JPEG rows; bad[i]: "missing", "text" (a text file named .jpg) or "truncated" (a valid header)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = ["filepath,title"]
    for i in range(n):
        path, kind = folder / "images" / f"{i:02d}.jpg", (bad or {}).get(i)
        if kind == "text":
            path.write_text("not an image\n")
        elif kind != "missing":
            Image.new("RGB", (64, 48), (i * 9 % 256, 100, 200 - i)).save(path, quality=95)
            if kind == "truncated":
                path.write_bytes(path.read_bytes()[:400])
        rows.append(f'images/{i:02d}.jpg,"picture {i}"')
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def build(*flags: str):
    return loading.build_data(parse_args([*TINY, *flags]), None)


def test_a_20_image_file_with_a_1_sample_validation_split_is_refused(tmp_path):
    data = caption_csv(tmp_path, 20)
    with pytest.raises(DataError, match="the validation set has 1 readable sample; with one, every retrieval metric "
                                        "is 1.0 and val_loss 0 whatever the model. Give --val-data, or a larger "
                                        "--val-fraction"):
        build("--data", str(data))
    train, val, _ = build("--data", str(data), "--val-fraction", "0.25")
    assert (len(train), len(val)) == (15, 5)


def test_a_small_validation_set_is_used_with_a_warning_that_says_how_coarse_it_is(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        build("--val-size", "8", "--train-size", "16")
    assert "the validation set has only 8 samples: R@1 moves in steps of 0.125, chance is 0.125 and R@K is 1.0 " \
           "for K >= 8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        build("--val-size", "100", "--train-size", "16")
    assert "validation set" not in caplog.text
    with pytest.raises(DataError, match="the validation set has 1 readable sample"):
        build("--val-size", "1", "--train-size", "16")


def test_max_bad_images_applies_to_small_data_before_training(tmp_path, caplog):
    data = caption_csv(tmp_path, 24, {3: "missing", 11: "text"})
    with pytest.raises(DataError) as error:
        build("--data", str(data), "--val-fraction", "0.25")
    assert "2 of the 24 images are missing or unreadable (8.3%), more than --max-bad-images 0.01 allows: " in str(error.value)
    assert "03.jpg (missing)" in str(error.value) and "11.jpg (unreadable: UnidentifiedImageError)" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        build("--data", str(data), "--val-fraction", "0.25", "--max-bad-images", "0.1")
    assert "cannot be read" in caplog.text


def test_an_unreadable_validation_row_is_left_out_and_never_scored_as_another_image(tmp_path, caplog):
    data = caption_csv(tmp_path, 40)
    _, val_rows = CaptionFile(data, 32).split(0.25, 0)
    victim = val_rows.row_ids[4]
    caption_csv(tmp_path, 40, {victim: "truncated"})  # its header reads: only decoding finds it
    with caplog.at_level(logging.WARNING, logger="mgpu"):
        train, val, _ = build("--data", str(data), "--val-fraction", "0.25", "--max-bad-images", "0.05")
    assert len(val) == 9 and victim not in val.row_ids and len(train) == 30
    assert f"validation: left out 1 of 10 rows whose image cannot be read, so metrics count the 9 others: " \
           f"{tmp_path}/images/{victim:02d}.jpg (unreadable: OSError)" in caplog.text
    (tmp_path / "images" / f"{val.row_ids[0]:02d}.jpg").unlink()  # gone after the check: an error, no substitute
    with pytest.raises(DataError, match=f"row {val.row_ids[0]}: image .* is missing \\(it could be read when the run "
                                        f"started\\)"):
        val[0]


def test_a_large_training_split_is_judged_on_a_sample_only_beyond_doubt(tmp_path, monkeypatch):
    monkeypatch.setattr(checks, "FULL_CHECK_ROWS", 30)
    monkeypatch.setattr(checks, "SAMPLE_ROWS", 20)
    half = caption_csv(tmp_path / "half", 80, {i: "missing" for i in range(0, 80, 2)})
    with pytest.raises(DataError, match=r"of the 24 images checked are missing or unreadable .* \(judged on a sample "
                                        r"of the training rows\)"):
        build("--data", str(half), "--val-fraction", "0.05")
    one = caption_csv(tmp_path / "one", 80, {5: "missing", 6: "missing"})  # 2.5 %: not beyond doubt on 20
    build("--data", str(one), "--val-fraction", "0.05", "--max-bad-images", "0.01")


@pytest.mark.parametrize("bad, seen, total, expected", [
    (1, 10, 24, True),      # one bad image in a set of 24 is over 1 % of the whole set: stop at once
    (0, 10, 24, False),
    (1, 10, 1000, False),   # one early bad image in a large set: wait for 100 reads
    (2, 100, 1000, True),   # 2 % of 100 reads
    (1, 100, 1000, False),
    (30, 2000, 1000, True),  # epochs repeat the same bad images: the running fraction still decides
    (15, 2000, 1000, False),
])
def test_the_running_bad_image_rule_is_meaningful_on_small_sets(bad, seen, total, expected):
    assert too_many_bad(bad, seen, 0.01, total) is expected


def test_the_checks_agree_across_two_gloo_ranks(tmp_path):
    data = caption_csv(tmp_path, 40, {2: "missing"})
    _, val_rows = CaptionFile(data, 32).split(0.25, 0)
    caption_csv(tmp_path, 40, {2: "missing", val_rows.row_ids[1]: "truncated", val_rows.row_ids[6]: "text"})
    results = torch.multiprocessing.start_processes(_rank_checks, args=(str(tmp_path), str(data)), nprocs=2,
                                                    start_method="fork", join=True)
    assert results is None
    kept = [(tmp_path / f"val_rank{r}.txt").read_text() for r in range(2)]
    assert kept[0] == kept[1] and len(kept[0].split()) == 8


def _rank_checks(rank: int, folder: str, data: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        train = CaptionFile(data, 32)
        train, val = train.split(0.25, 0)
        kept = checks.check_images(train, val, limit=0.1, where="test")
        Path(folder, f"val_rank{rank}.txt").write_text(" ".join(map(str, kept.row_ids)))
        with pytest.raises(DataError, match="3 of the 40 images"):
            checks.check_images(train, val, limit=0.05, where="test")
    finally:
        torch.distributed.destroy_process_group()
