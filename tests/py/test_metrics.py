"""Retrieval metrics against open_clip's get_clip_metrics, on the golden cases it computed
(tests/fixtures/golden/retrieval_metrics.json.gz, made by tools/golden/retrieval_metrics.py)."""

import gzip
import json

import pytest
import torch

from conftest import ROOT
from mgpu.metrics import retrieval_metrics

with gzip.open(ROOT / "tests" / "fixtures" / "golden" / "retrieval_metrics.json.gz", "rt", encoding="utf-8") as _f:
    GOLDEN = json.load(_f)["cases"]


def features(case):
    return (torch.tensor(case["image"]).float() / case["divisor"],
            torch.tensor(case["text"]).float() / case["divisor"])


def test_every_value_is_open_clips():
    assert len(GOLDEN) > 300
    differ = []
    for case in GOLDEN:
        ours = retrieval_metrics(*features(case), logit_scale=case["logit_scale"])
        differ += [(case["name"], key, ours[key], value) for key, value in case["metrics"].items() if ours[key] != value]
    assert not differ, f"{len(differ)} values differ from open_clip's; the first: {differ[:5]}"


def test_the_golden_cases_cover_even_sizes_and_ties():
    names = " ".join(case["name"] for case in GOLDEN)
    assert "duplicated texts" in names and "duplicated images" in names and "every text the same" in names
    same = next(c for c in GOLDEN if c["name"].startswith("every text the same"))
    assert same["metrics"]["image_to_text_R@1"] < 0.5  # ties are not counted in the true match's favour


def test_median_rank_of_an_even_count_is_numpys_floor_plus_one():
    m = torch.tensor([[16.0, 15, 14, 13], [11, 12, 10, 9], [8, 7, 5, 6], [4, 3, 2, 1]])
    metrics = retrieval_metrics(torch.eye(4), m.T)
    assert metrics["image_to_text_median_rank"] == 2.0  # 0-based ranks 0, 0, 3, 3: median 1.5 -> 1 + 1
    assert metrics["image_to_text_mean_rank"] == 2.5 and metrics["image_to_text_R@1"] == 0.5


def test_bad_features_are_named():
    with pytest.raises(ValueError, match=r"differ in shape or are not \(N, D\) with N >= 1: \(3, 4\) vs \(2, 4\)"):
        retrieval_metrics(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(0, 4\) vs \(0, 4\)"):
        retrieval_metrics(torch.zeros(0, 4), torch.zeros(0, 4))
    nan = torch.ones(3, 4)
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="3 of the 9 image-text similarities are NaN or infinite"):
        retrieval_metrics(nan, torch.ones(3, 4))
