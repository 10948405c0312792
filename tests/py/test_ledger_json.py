"""The summary's JSON strings, written by bash (lib/ledger.sh), against Python's own UTF-8 decoder."""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "lib"
# Each argument through ledger::_str, the JSON strings NUL-separated on stdout.
SCRIPT = f"""source {LIB}/core.sh; source {LIB}/ledger.sh
for s in "$@"; do ledger::_str "$s"; printf '%s\\0' "$LEDGER_STR"; done"""


def json_strings(texts: list[bytes], env: dict | None = None) -> list[bytes]:
    out = subprocess.run(["bash", "-c", SCRIPT, "ledger", *texts], capture_output=True, check=True, env=env).stdout
    return out.split(b"\0")[:-1]


def test_bytes_that_are_not_utf8_are_replaced_exactly_as_pythons_decoder_replaces_them() -> None:
    # Random byte strings, weighted to the bytes where UTF-8 decoders differ: lead bytes that are never
    # valid (C0 C1 F5), the edges of the ranges allowed after E0 ED F0 F4, cut-off and overlong sequences.
    rng = random.Random(20261130)
    edges = [0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE4, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF]
    texts = [bytes(rng.choice(edges) if rng.random() < 0.6 else rng.randint(0x20, 0xFF)
                   for _ in range(rng.randint(1, 14))) for _ in range(500)]
    texts += ["中文 café ✓ 𝄞".encode(), "中".encode()[:2], b"caf\xe9", b"\xd6\xd0\xce\xc4", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
    # valid UTF-8 (taken as it is, without Python): characters from every range, surrogates aside
    points = [p for p in (rng.randint(0x20, 0x10FFFF) for _ in range(6000)) if not 0xD800 <= p <= 0xDFFF]
    texts += ["".join(map(chr, points[k:k + 12])).encode() for k in range(0, len(points), 12)]
    got = json_strings(texts)
    assert len(got) == len(texts)
    for text, line in zip(texts, got):
        assert json.loads(line.decode("utf-8")) == text.decode("utf-8", errors="replace"), text


def test_bash_tells_valid_utf8_from_invalid_exactly_as_pythons_strict_decoder() -> None:
    # What decides whether Python is called at all: many more random byte strings than the test above
    # sends through Python (a process each), weighted to the same edges.
    rng = random.Random(20261201)
    edges = [0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE4, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF]
    texts = [bytes(rng.choice(edges) if rng.random() < 0.6 else rng.randint(0x20, 0xFF)
                   for _ in range(rng.randint(1, 6))) for _ in range(20000)]
    script = f"""source {LIB}/core.sh; source {LIB}/ledger.sh
for s in "$@"; do if ledger::is_utf8 "$s"; then printf 1; else printf 0; fi; done"""
    got = subprocess.run(["bash", "-c", script, "ledger", *texts], capture_output=True, check=True).stdout.decode()
    assert len(got) == len(texts)
    for text, said in zip(texts, got):
        try:
            text.decode("utf-8")
            valid = "1"
        except UnicodeDecodeError:
            valid = "0"
        assert said == valid, text
    assert 500 < got.count("1") < 19500, got.count("1")  # both kinds are well represented


def test_ascii_and_escapes_are_unchanged() -> None:
    texts = [b'plain', b'a "quoted" \\ back\tslash\nnew', "中文\t\"x\"".encode()]
    got = json_strings(texts)
    assert [json.loads(g.decode()) for g in got] == [t.decode() for t in texts]


def test_without_python_each_byte_that_is_not_ascii_becomes_a_question_mark() -> None:
    got = json_strings([b"caf\xe9 ok", "中文".encode()], env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert [json.loads(g.decode()) for g in got] == ["caf? ok", "中文"]  # valid UTF-8 needs no Python
