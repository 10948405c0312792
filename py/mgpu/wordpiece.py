"""BERT's WordPiece tokenizer, written here; ids identical to transformers' Python BertTokenizer
(``BertTokenizerLegacy`` in transformers 5, ``do_lower_case=True``), proven on a golden corpus
(tests/fixtures/golden/wordpiece_*, tools/golden/wordpiece.py).

The steps, in the reference's order: the special tokens written in the text (``[CLS]``, ``[SEP]``,
``[MASK]``, ``[UNK]``, ``[PAD]``, case-sensitive) are cut out and kept whole; in the rest, NUL, U+FFFD
and control characters go, other whitespace becomes a space, every CJK ideograph is made its own word,
the text is NFC-normalised and split on whitespace; each word is lower-cased, its accents stripped
(NFD without combining marks) and split at every punctuation character; then each word becomes its
longest-first vocabulary pieces ("##" marks a piece inside a word), or [UNK] when it has none (or has
more than 100 characters).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(token) for token in BERT_SPECIALS) + ")")
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
MAX_WORD_CHARS = 100


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _is_punct(ch: str) -> bool:
    """ASCII non-letters/digits and every Unicode punctuation (P*) character."""
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(ch).startswith("P")


def _clean(text: str) -> str:
    """NUL, U+FFFD and control characters (C*, except tab, newline, return) out; space, tab, newline,
    return and space separators (Zs) become a space."""
    out = []
    for ch in text:
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif ch != "\0" and ch != "\ufffd" and not unicodedata.category(ch).startswith("C"):
            out.append(ch)
    return "".join(out)


def _split_punct(word: str) -> list[str]:
    out: list[str] = []
    start_new = True
    for ch in word:
        if _is_punct(ch):
            out.append(ch)
            start_new = True
        else:
            if start_new:
                out.append("")
            out[-1] += ch
            start_new = False
    return out


def basic_split(text: str) -> list[str]:
    """BERT's basic tokenizer on text without special tokens: cleaned, CJK ideographs apart, lower case,
    accents off, punctuation apart."""
    text = "".join(f" {ch} " if _is_cjk(ch) else ch for ch in _clean(text))
    out = []
    for word in unicodedata.normalize("NFC", text).split():
        word = unicodedata.normalize("NFD", word.lower())
        out += _split_punct("".join(ch for ch in word if unicodedata.category(ch) != "Mn"))
    return " ".join(out).split()


def _words(text: str) -> Iterator[str]:
    """The basic words of text and its special tokens (whole), in order."""
    for i, piece in enumerate(_SPECIAL_SPLIT.split(text)):
        if i % 2:  # re.split puts each match at the odd positions
            yield piece
        else:
            yield from basic_split(piece)


class WordPiece:
    def __init__(self, vocab: list[str], max_length: int = 64):
        self.vocab = vocab
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.max_length = max_length
        for token, expected in BERT_SPECIALS.items():
            if self.ids.get(token) != expected:
                raise ValueError(f"BERT vocabulary: {token} must have id {expected}, has {self.ids.get(token)}")

    @classmethod
    def load(cls, path: str, max_length: int = 64) -> "WordPiece":
        p = Path(path)
        p = p / "vocab.txt" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"--bert-vocab {path}: no such file (expected vocab.txt or a folder with it)")
        lines = p.read_text(encoding="utf-8").split("\n")  # not splitlines: tokens may be odd characters
        return cls(lines[:-1] if lines[-1] == "" else lines, max_length)

    @classmethod
    def from_texts(cls, texts: list[str], max_length: int = 64) -> "WordPiece":
        """The fallback vocabulary: the specials at BERT's ids, then every character of the texts."""
        log.warning("no BERT vocabulary given (--bert-vocab): using the %d captions' characters instead", len(texts))
        vocab = [f"[unused{i}]" for i in range(104)]
        for token, i in BERT_SPECIALS.items():
            vocab[i] = token
        chars = sorted({ch for text in texts for word in _words(text) if word not in BERT_SPECIALS for ch in word})
        return cls(vocab + chars + [f"##{c}" for c in chars], max_length)

    def _pieces(self, word: str) -> list[str]:
        if word in BERT_SPECIALS:
            return [word]
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for word in _words(text) for p in self._pieces(word)]

    def encode(self, text: str) -> list[int]:
        """The ids of text, without [CLS] and [SEP]."""
        return [self.ids[t] for t in self.tokenize(text)]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, L) ids: [CLS] text [SEP], padded with 0 to the longest, at most max_length."""
        rows = [[101, *self.encode(text)[: self.max_length - 2], 102] for text in texts]
        out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out
