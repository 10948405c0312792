"""Tokenizers for the text towers, written here: CLIP's byte-level BPE and BERT's WordPiece.

Vocabularies load from a file, a local model folder, or (CLIP) an installed package that ships
``bpe_simple_vocab_16e6.txt.gz`` (open_clip, OpenAI's clip). Nothing is downloaded. Without one:
- CLIP falls back to byte-level BPE merges learned from the training captions
  (``ClipTokenizer.from_texts``; bare bytes when no captions are given): the same byte alphabet and id
  layout as CLIP's vocabulary, so training works, with no pretrained-vocabulary match; the merges are
  saved with the checkpoint;
- BERT falls back to the characters seen in the training captions (``WordPiece.from_texts``); the
  vocabulary is saved with the checkpoint so inference reads text the same way.
Both warn when they fall back.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408  # 512 byte tokens + 48894 merges + <|startoftext|> + <|endoftext|>
CLIP_SOT, CLIP_EOT = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
# Python's re has no \p{L}: letters are word characters that are neither digits nor "_".
_CLIP_PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                           re.IGNORECASE)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Each byte as a printable character: printable Latin-1 bytes stand for themselves, the rest map
    to code points from 256 on (so BPE never works on whitespace or control characters)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


def find_clip_merges(path: str | None = None) -> Path | None:
    """The merges file: PATH (a file, or a folder holding it), else one shipped in an installed package."""
    if path:
        p = Path(path)
        p = p / CLIP_MERGES_FILE if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"--clip-vocab {path}: no such file (expected {CLIP_MERGES_FILE} or a folder with it)")
        return p
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / CLIP_MERGES_FILE
            if candidate.is_file():
                return candidate
    return None


class ClipTokenizer:
    def __init__(self, merges: list[tuple[str, str]], context: int = 77):
        self.context = context
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        if len(vocab) > CLIP_SOT:
            raise ValueError(f"{len(merges)} merges do not fit a vocabulary of {CLIP_VOCAB_SIZE}")
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.merges = list(merges)
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache: dict[str, list[str]] = {}

    @classmethod
    def load(cls, path: str | None = None, context: int = 77, texts: list[str] | None = None) -> "ClipTokenizer":
        """The merges of PATH or of an installed package; without one, merges learned from texts (the
        training captions) when given, else bare byte-level tokens. Both fallbacks warn."""
        found = find_clip_merges(path)
        if found is None:
            advice = "Pass --clip-vocab PATH, or pip install open-clip-torch, for the real one"
            if texts:
                log.warning("no CLIP BPE vocabulary (%s) given or installed: using byte-level BPE merges learned "
                            "from %d training captions. %s", CLIP_MERGES_FILE, len(texts), advice)
                return cls.from_texts(texts, context=context)
            log.warning("no CLIP BPE vocabulary (%s) given or installed: using byte-level tokens. %s",
                        CLIP_MERGES_FILE, advice)
            return cls([], context)
        opener = gzip.open if found.suffix == ".gz" else open
        with opener(found, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if len(line.split()) == 2]  # line 0: a header
        return cls(merges[: CLIP_SOT - 512], context)

    @classmethod
    def from_texts(cls, texts: list[str], max_merges: int = 2000, context: int = 77) -> "ClipTokenizer":
        """Byte-level BPE trained on texts the way CLIP's merges were: split words as CLIP does, then
        repeatedly merge the most frequent adjacent pair (ties: the first seen) until no pair occurs
        twice or max_merges is reached. Deterministic: every rank and run learns the same merges."""
        byte_encoder, freq = bytes_to_unicode(), {}
        for text in texts:
            for word in _CLIP_PATTERN.findall(clean_text(text)):
                symbols = [byte_encoder[b] for b in word.encode("utf-8")]
                key = tuple(symbols[:-1] + [symbols[-1] + "</w>"])
                freq[key] = freq.get(key, 0) + 1
        words, merges = list(freq.items()), []
        while len(merges) < max_merges:
            pairs: dict[tuple[str, str], int] = {}
            for parts, n in words:
                for pair in zip(parts, parts[1:]):
                    pairs[pair] = pairs.get(pair, 0) + n
            if not pairs:
                break
            best = max(pairs, key=pairs.__getitem__)  # max keeps the first of equal counts
            if pairs[best] < 2:
                break
            merges.append(best)
            merged = best[0] + best[1]
            for i, (parts, n) in enumerate(words):
                out, j = [], 0
                while j < len(parts):
                    if j + 1 < len(parts) and (parts[j], parts[j + 1]) == best:
                        out.append(merged)
                        j += 2
                    else:
                        out.append(parts[j])
                        j += 1
                words[i] = (tuple(out), n)
        return cls(merges[: CLIP_SOT - 512], context)

    def _bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in _CLIP_PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self._bpe(word)]
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, context) ids: <|startoftext|> text <|endoftext|>, cut so the end token always stays."""
        out = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [CLIP_SOT, *self.encode(text)[: self.context - 2], CLIP_EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                             (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                             (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(ch).startswith("P")


def basic_split(text: str) -> list[str]:
    """BERT's basic tokenizer: lower case, accents off, control characters out, and every CJK
    character and punctuation mark its own word."""
    text = unicodedata.normalize("NFD", text.lower())
    out, word = [], []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Mn" or ch == "\ufffd" or (cat.startswith("C") and ch not in "\t\n\r"):
            continue
        if ch.isspace() or _is_cjk(ch) or _is_punct(ch):
            if word:
                out.append("".join(word))
                word = []
            if not ch.isspace():
                out.append(ch)
        else:
            word.append(ch)
    if word:
        out.append("".join(word))
    return out


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
        chars = sorted({ch for text in texts for word in basic_split(text) for ch in word})
        return cls(vocab + chars + [f"##{c}" for c in chars], max_length)

    def _pieces(self, word: str) -> list[str]:
        if len(word) > 100:
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
        return [p for word in basic_split(text) for p in self._pieces(word)]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, L) ids: [CLS] text [SEP], padded with 0 to the longest, at most max_length."""
        rows = [[101, *[self.ids[t] for t in self.tokenize(text)][: self.max_length - 2], 102] for text in texts]
        out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out
