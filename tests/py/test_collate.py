"""collate_fn pads variable numbers of boxes (and text) and says which entries are real."""

import pytest
import torch

from mgpu.collate import collate_fn


def sample(n_boxes, n_tokens=4, index=0, phrase_len=None):
    s = {"image": torch.full((3, 8, 8), float(index)), "tokens": torch.arange(1, n_tokens + 1),
         "boxes": [[i, i, i + 2, i + 3] for i in range(n_boxes)], "index": torch.tensor(index), "caption": f"c{index}"}
    if phrase_len is not None:
        s["box_phrases"] = torch.full((n_boxes, phrase_len), 7)
    return s


def test_boxes_are_padded_to_the_most_in_the_batch():
    batch = collate_fn([sample(2, index=0), sample(0, index=1), sample(3, index=2)])
    assert batch["boxes"].shape == (3, 3, 4) and batch["boxes"].dtype == torch.float32
    assert batch["num_boxes"].tolist() == [2, 0, 3]
    assert batch["box_mask"].tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert batch["boxes"][0, 1].tolist() == [1, 1, 3, 4] and batch["boxes"][0, 2].tolist() == [0, 0, 0, 0]
    assert batch["boxes"][batch["box_mask"]].shape == (5, 4)  # exactly the real boxes


def test_a_batch_without_any_box():
    batch = collate_fn([sample(0), sample(0)])
    assert batch["boxes"].shape == (2, 0, 4) and batch["box_mask"].shape == (2, 0)
    assert batch["num_boxes"].tolist() == [0, 0]


def test_text_is_padded_and_other_keys_kept():
    batch = collate_fn([sample(1, n_tokens=3, index=0), sample(1, n_tokens=5, index=1)])
    assert batch["tokens"].tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["image"].shape == (2, 3, 8, 8) and batch["index"].tolist() == [0, 1]
    assert batch["caption"] == ["c0", "c1"]


def test_box_phrases_are_padded_in_both_dimensions():
    batch = collate_fn([sample(1, phrase_len=2), sample(2, phrase_len=3)])
    assert batch["box_phrases"].shape == (2, 2, 3)
    assert batch["box_phrases"][0].tolist() == [[7, 7, 0], [0, 0, 0]]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"sample 1: boxes must have shape \(k, 4\)"):
        collate_fn([sample(1), {**sample(1), "boxes": [[1, 2, 3]]}])
    with pytest.raises(ValueError, match="images in one batch must share a shape"):
        collate_fn([sample(1), {**sample(1), "image": torch.zeros(3, 4, 4)}])


def test_works_in_a_dataloader_with_workers():
    data = [sample(i % 3, index=i) for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=collate_fn, num_workers=2)
    counts = [b["num_boxes"].tolist() for b in loader]
    assert counts == [[0, 1, 2], [0, 1, 2]]


def test_real_caption_files_with_boxes_in_jsonl_and_csv(tmp_path):
    from PIL import Image

    from mgpu.data.captions import CaptionFile, DataError

    Image.new("RGB", (100, 50), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text('{"filepath": "a.png", "title": "red"}\n\n{"filepath": "a.png", "title": "again"}\n')
    (tmp_path / "boxes.json").write_text('[{"image": "a.png", "boxes": [[0, 0, 50, 25], {"box": [50, 25, 100, 50], "phrase": "x"}]}]')
    data = CaptionFile(tmp_path / "d.jsonl", 32, box_file=tmp_path / "boxes.json")
    sample = data[1]
    assert sample["caption"] == "again" and sample["image"].shape == (3, 32, 32)
    assert abs(sample["image"][0].mean().item() - 1) < 1e-6 and sample["image"][1].max().item() == 0
    assert sample["boxes"].tolist() == [[0, 0, 16, 16], [16, 16, 32, 32]] and sample["phrases"] == ["again", "x"]
    (tmp_path / "d.csv").write_text("path;text\na.png;red\n")
    try:
        CaptionFile(tmp_path / "d.csv", 32)
    except DataError as exc:
        assert "no column 'filepath', 'title'; the columns are ['path;text'] (separator ','" in str(exc)
    else:
        raise AssertionError("a missing column must be an error")
    assert CaptionFile(tmp_path / "d.csv", 32, img_key="path", caption_key="text", separator=";")[0]["caption"] == "red"
