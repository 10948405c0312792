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


def test_a_sample_without_boxes_next_to_one_with_phrases():
    # the (0, m) box_phrases of a zero-box sample used to crash the reshape
    s = lambda k: {"image": torch.zeros(3, 4, 4), "tokens": torch.tensor([1, 2]),  # noqa: E731
                   "boxes": torch.zeros(k, 4), "box_phrases": torch.ones(k, 3, dtype=torch.long)}
    batch = collate_fn([s(0), s(2)])
    assert batch["box_phrases"].shape == (2, 2, 3) and batch["box_phrases"][0].sum() == 0
    assert batch["box_phrases"][1].tolist() == [[1, 1, 1], [1, 1, 1]] and batch["num_boxes"].tolist() == [0, 2]
    empty = {**s(0), "box_phrases": []}  # from JSON
    assert collate_fn([empty, s(1)])["box_phrases"].shape == (2, 1, 3)
    assert collate_fn([s(0), s(0)])["box_phrases"].shape == (2, 0, 3)


def test_boxes_and_box_phrases_may_be_left_out_of_some_samples():
    with_phrases = sample(2, phrase_len=3)
    without = sample(1)
    batch = collate_fn([without, with_phrases, {k: v for k, v in sample(0).items() if k != "boxes"}])
    assert batch["num_boxes"].tolist() == [1, 2, 0]
    assert batch["box_phrases"].shape == (3, 2, 3) and batch["box_phrases"][0].sum() == 0


def test_a_key_in_only_some_samples_is_an_error_naming_it():
    extra = {**sample(1, index=1), "depth": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"sample 0 of the batch has no 'depth', sample 1 has: every sample needs "
                                         r"the same keys \(only boxes and box_phrases may be left out\)"):
        collate_fn([sample(1), extra])
    lacking = {k: v for k, v in sample(1, index=2).items() if k != "caption"}
    with pytest.raises(ValueError, match=r"sample 2 of the batch has no 'caption', sample 0 has"):
        collate_fn([sample(1), sample(1), lacking])


def test_box_phrases_must_have_a_row_per_box():
    with pytest.raises(ValueError, match=r"sample 1: box_phrases must have shape \(k, m\) with k = 2, its number "
                                         r"of boxes; got \(3, 4\)"):
        collate_fn([sample(1, phrase_len=4), {**sample(2), "box_phrases": torch.ones(3, 4)}])


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
