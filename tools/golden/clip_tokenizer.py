"""Golden CLIP token ids: open_clip's ``tokenize`` on the corpus of tools/golden/corpus.py.

Run (see tools/golden/README.md for the reference environment):
    /tmp/golden-venv/bin/python tools/golden/clip_tokenizer.py [--compare]
Writes tests/fixtures/golden/clip_tokens.json.gz: {"reference": versions, "context": 77,
"cases": [[text, ids up to the end token], ...]}. --compare also tokenizes with mgpu (needs mgpu's
own dependencies, ftfy and regex, here too) and prints how many strings differ.
"""

from __future__ import annotations

import argparse
import gzip
import json

from _reference import FIXTURES, mgpu_on_path, open_clip_module, versions
from corpus import corpus


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", action="store_true", help="also compare mgpu's ClipTokenizer (default: off)")
    args = p.parse_args()
    tokenizer = open_clip_module("tokenizer")
    texts = corpus()
    rows = tokenizer.tokenize(texts)  # (N, 77), zero-padded; every row ends in the end token 49407
    cases = []
    for text, row in zip(texts, rows.tolist()):
        end = max(i for i, t in enumerate(row) if t == 49407)
        cases.append([text, row[: end + 1]])
    out = FIXTURES / "clip_tokens.json.gz"
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump({"reference": versions(), "context": 77, "cases": cases}, f, ensure_ascii=False)
    print(f"{out}: {len(cases)} strings, {sum(len(ids) > 76 for _, ids in cases)} cut at 77 tokens")
    if args.compare:
        mgpu_on_path()
        from mgpu.tokenizers import ClipTokenizer
        ours = ClipTokenizer.load()(texts)
        differ = [t for t, a, b in zip(texts, ours.tolist(), rows.tolist()) if a != b]
        print(f"mgpu ClipTokenizer vs open_clip tokenize: {len(differ)} of {len(texts)} strings differ")
        for text in differ[:10]:
            print("  differs:", repr(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
