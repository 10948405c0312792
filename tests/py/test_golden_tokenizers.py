"""mgpu's tokenizers against the reference ones, on the golden fixtures those generated
(tests/fixtures/golden, made by tools/golden/clip_tokenizer.py and tools/golden/wordpiece.py):
every string must give exactly the reference's ids."""

import gzip
import json

import pytest

from conftest import ROOT
from mgpu.tokenizers import ClipTokenizer, WordPiece

GOLDEN = ROOT / "tests" / "fixtures" / "golden"


def cases(name: str) -> list[tuple[str, list[int]]]:
    with gzip.open(GOLDEN / name, "rt", encoding="utf-8") as f:
        return [tuple(case) for case in json.load(f)["cases"]]


def report(differ: list[tuple[str, list[int], list[int]]], total: int) -> str:
    lines = [f"{len(differ)} of {total} strings differ from the reference; the first ones:"]
    lines += [f"  {text!r}: mgpu {ours} reference {theirs}" for text, ours, theirs in differ[:5]]
    return "\n".join(lines)


def test_clip_ids_are_open_clips_on_every_golden_string():
    golden = cases("clip_tokens.json.gz")
    assert len(golden) >= 2400
    rows = ClipTokenizer.load()([text for text, _ in golden]).tolist()
    differ = [(text, row, ids) for (text, ids), row in zip(golden, rows) if row != ids + [0] * (77 - len(ids))]
    assert not differ, report(differ, len(golden))


@pytest.mark.parametrize("kind", ["html entities", "cut at 77", "empty", "special token", "number"])
def test_the_clip_corpus_covers(kind):
    texts = {text: ids for text, ids in cases("clip_tokens.json.gz")}
    found = {"html entities": "fish &amp; chips" in texts, "cut at 77": sum(len(i) == 77 for i in texts.values()) > 100,
             "empty": texts.get("") == [49406, 49407] and texts.get("\t\n \r") == [49406, 49407],
             "special token": texts.get("<end_of_text>") == [49406, 49407, 49407],
             "number": "①②③" in texts and "Chapter Ⅻ" in texts}
    assert found[kind]


def test_wordpiece_ids_are_bert_tokenizers_on_every_golden_string():
    golden = cases("wordpiece_tokens.json.gz")
    assert len(golden) >= 2400
    tok = WordPiece.load(str(GOLDEN / "wordpiece_vocab.txt"))
    differ = [(text, ours, ids) for text, ids in golden if (ours := [101, *tok.encode(text), 102]) != ids]
    assert not differ, report(differ, len(golden))
    assert sum("[MASK]" in text for text, _ in golden) > 20  # the literal special tokens are covered
