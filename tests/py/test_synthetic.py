"""The embedded synthetic dataset: deterministic, bilingual, boxes that fit what is drawn."""

import re

import pytest
import torch

from mgpu.collate import collate_fn
from mgpu.data.synthetic import COLOURS, SyntheticCaptions

COUNT = {"a": 1, "two": 2, "three": 3}


def test_the_same_seed_and_index_give_the_same_sample_anywhere():
    a, b = SyntheticCaptions(seed=3)[7], SyntheticCaptions(seed=3)[7]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["image"], SyntheticCaptions(seed=4)[7]["image"])


def test_train_and_val_are_one_stream_without_overlap():
    train, val = SyntheticCaptions("train", train_size=10, val_size=5), SyntheticCaptions("val", train_size=10, val_size=5)
    assert (len(train), len(val)) == (10, 5)
    assert val[0]["index"].item() == 10 and torch.equal(val[0]["image"], SyntheticCaptions("train", train_size=11)[10]["image"])
    with pytest.raises(IndexError):
        val[5]


def test_captions_count_what_is_drawn_in_both_languages():
    data = SyntheticCaptions(train_size=200)
    for i in range(200):
        s = data[i]
        groups = s["caption_en"].split(" and ")
        counts = [COUNT[g.split()[0]] for g in groups]
        assert sum(counts) == len(s["boxes"]) == len(s["phrases"])
        assert s["caption_zh"].count("和") == len(groups) - 1
        assert [c for c in re.findall("[一两三]个", s["caption_zh"])] == [["一个", "两个", "三个"][n - 1] for n in counts]


def test_each_box_holds_its_colour_and_no_two_boxes_overlap():
    data = SyntheticCaptions(train_size=50, image_size=64)
    for i in range(50):
        s = data[i]
        boxes = s["boxes"]
        for box, phrase in zip(boxes.tolist(), s["phrases"]):
            x1, y1, x2, y2 = (round(v) for v in box)
            assert 0 <= x1 < x2 <= 63 and 0 <= y1 < y2 <= 63
            colour = torch.tensor(COLOURS[phrase.split()[1]][1])
            patch = s["image"][:, y1:y2 + 1, x1:x2 + 1]
            assert ((patch - colour[:, None, None]).abs().sum(0) < 1e-4).any(), (i, phrase)
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = boxes[a].tolist(), boxes[b].tolist()
                assert ax2 < bx1 or bx2 < ax1 or ay2 < by1 or by2 < ay1


def test_captions_are_varied_enough_for_retrieval():
    data = SyntheticCaptions(train_size=500)
    assert len({data[i]["caption"] for i in range(500)}) > 350


def test_chinese_captions_and_phrases_for_a_chinese_text_tower():
    s = SyntheticCaptions(language="zh")[0]
    assert s["caption"] == s["caption_zh"] and all("的" in p for p in s["phrases"])


def test_with_a_tokenizer_it_feeds_collate_fn():
    def tokenizer(texts):  # one id per word, padded with 0, like the real tokenizers' output
        rows = [[len(w) for w in t.split()] for t in texts]
        out = torch.zeros(len(rows), 32, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    data = SyntheticCaptions(train_size=8, tokenizer=tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate_fn, num_workers=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64)
    assert batch["box_phrases"].shape[:2] == batch["boxes"].shape[:2]
    assert (batch["tokens"][:, 0] > 0).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be train or val, got 'test'"):
        SyntheticCaptions("test")
    with pytest.raises(ValueError, match="language must be en or zh, got 'fr'"):
        SyntheticCaptions(language="fr")
