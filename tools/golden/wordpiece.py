"""Golden WordPiece ids: transformers' Python BertTokenizer (``BertTokenizerLegacy`` in transformers 5;
``do_lower_case=True``, as bert-base-chinese) with a vocabulary made here, on the corpus of
tools/golden/corpus.py plus Chinese captions and over-long words.

Run (see tools/golden/README.md for the reference environment):
    /tmp/golden-venv/bin/python tools/golden/wordpiece.py [--compare]
Writes tests/fixtures/golden/wordpiece_vocab.txt (BERT's special ids, [unusedN] fillers, most
characters of the corpus alone and as "##" pieces, English words and suffixes; about a tenth of the
characters left out so [UNK] occurs) and wordpiece_tokens.json.gz: {"reference": versions, "cases":
[[text, ids with [CLS] and [SEP]], ...]}. --compare also runs mgpu's WordPiece, and the Rust-backed
BertTokenizer of transformers 5 for information, and prints how many strings differ.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random

from _reference import FIXTURES, mgpu_on_path, versions
from corpus import ADJECTIVES, NOUNS, corpus

CHINESE = ["一只{a}的{n}在{p}", "{p}有{d}个{a}{n}", "两个{a}{n}和一个{n}", "这是{n}吗？", "{n}，{a}，{p}！"]
ZH_NOUNS = ["猫", "狗", "汽车", "圆", "方块", "三角形", "房子", "树", "鸟", "孩子"]
ZH_ADJ = ["红色", "蓝色", "小", "大", "绿色", "黄色", "可爱"]
ZH_PLACE = ["桌子上", "草地上", "街道旁边", "天空中", "水里"]
ENGLISH_PIECES = ["a", "an", "the", "of", "on", "in", "and", "is", "photo", "image", "there", "are", "next", "to",
                  "un", "##s", "##es", "##ing", "##ed", "##er", "##ly", "##able", "##aff", "it", "'", "##'", "close",
                  "up", "face", "by", "background", "outdoors", "this", "or", "was", "wasn", "isn", "t", "##t"]


def texts() -> list[str]:
    rng = random.Random(1)
    out = corpus()
    for _ in range(300):
        out.append(rng.choice(CHINESE).format(a=rng.choice(ZH_ADJ), n=rng.choice(ZH_NOUNS),
                                              p=rng.choice(ZH_PLACE), d=rng.randint(1, 9)))
    out += ["a" * 100, "a" * 101, "x" * 150 + " cat", "猫" * 120, "é" * 101]
    return out


def vocabulary(strings: list[str], basic) -> list[str]:
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({ch for text in strings for word in basic.tokenize(text) for ch in word})
    rng = random.Random(2)
    chars = [c for c in chars if rng.random() > 0.1]
    words = sorted({w for n in NOUNS + ADJECTIVES for w in n.split()} | set(ENGLISH_PIECES))
    seen = set(vocab)
    for token in words + chars + [f"##{c}" for c in chars]:
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", action="store_true", help="also compare mgpu's WordPiece (default: off)")
    args = p.parse_args()
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer, BertTokenizerLegacy

    strings = texts()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    vocab_file = FIXTURES / "wordpiece_vocab.txt"
    vocab_file.write_text("\n".join(vocabulary(strings, BasicTokenizer())) + "\n", encoding="utf-8")
    reference = BertTokenizerLegacy(str(vocab_file))
    cases = [[text, reference.encode(text)] for text in strings]
    out = FIXTURES / "wordpiece_tokens.json.gz"
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump({"reference": versions(), "tokenizer": "BertTokenizerLegacy(do_lower_case=True)",
                   "cases": cases}, f, ensure_ascii=False)
    specials = sum(any(t in (100, 101, 102, 103, 0) for t in ids[1:-1]) for _, ids in cases)
    print(f"{out}: {len(cases)} strings ({specials} with a special id inside), vocabulary of "
          f"{len(reference.vocab)} in {vocab_file}")
    if args.compare:
        fast = BertTokenizer(vocab=str(vocab_file))
        differ = [text for text, ids in cases if fast.encode(text) != ids]
        print(f"transformers' Rust-backed BertTokenizer vs the Python one: {len(differ)} of {len(cases)} differ")
        for text in differ[:5]:
            print("  differs:", repr(text))
        mgpu_on_path()
        from mgpu.tokenizers import WordPiece
        ours = WordPiece.load(str(vocab_file))
        differ = [text for text, ids in cases if [101, *ours.encode(text), 102] != ids]
        print(f"mgpu WordPiece vs the Python BertTokenizer: {len(differ)} of {len(cases)} strings differ")
        for text in differ[:10]:
            print("  differs:", repr(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
