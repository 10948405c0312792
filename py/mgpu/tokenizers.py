"""Tokenizers for the text towers, written here: CLIP's byte-level BPE and BERT's WordPiece.

Both give the ids of the reference tokenizers, proven by golden fixtures those generated
(tests/fixtures/golden, tools/golden): ``ClipTokenizer`` those of open_clip's ``tokenize`` (ftfy
cleaning, the ``regex`` word split, OpenAI's byte table, ``<start_of_text>``/``<end_of_text>`` written
in a caption read as the special tokens); ``WordPiece`` those of transformers' Python BertTokenizer
(``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]``, ``[PAD]`` written in a caption kept whole).

Vocabularies load from a file or a local model folder; CLIP's merges (``bpe_simple_vocab_16e6.txt.gz``,
OpenAI's, MIT) ship with mgpu in ``mgpu/assets``. Nothing is downloaded. Without one:
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
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

from .wordpiece import BERT_SPECIALS, WordPiece, basic_split  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CLIP_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
BUNDLED_CLIP_MERGES = Path(__file__).resolve().parent / "assets" / CLIP_MERGES_FILE
CLIP_VOCAB_SIZE = 49408  # 512 byte tokens + 48894 merges + <start_of_text> + <end_of_text>
CLIP_SOT, CLIP_EOT = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1
CLIP_SPECIALS = {"<start_of_text>": CLIP_SOT, "<end_of_text>": CLIP_EOT}  # open_clip's names for them
_CLIP_MERGE_LINES = CLIP_SOT - 512  # merges read from the file: lines 1 to 48894 (line 0 is a header)
# open_clip's split: its special tokens, English contractions, letter runs, single digits, and runs of
# everything else that is not a space (\p{L}, \p{N}: Unicode letters and numbers, so ², ₂, ½, ①, Ⅻ
# are numbers, each its own word)
_CLIP_PATTERN = regex.compile(r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                              r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
BYTE_ORDERS = ("openai", "legacy")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Each byte as a printable character, in OpenAI's order: first the printable Latin-1 bytes, which
    stand for themselves, then the rest (whitespace, control characters) mapped to code points from
    256 on, so BPE never works on them. The order matters: it numbers the 256 single-byte tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_symbols(byte_order: str) -> list[str]:
    """The 256 single-byte tokens in id order. "legacy" is the byte order 0-255 that mgpu used before
    it matched OpenAI's ids; only checkpoints trained then need it (their tokenizer state has no
    byte_order)."""
    if byte_order not in BYTE_ORDERS:
        raise ValueError(f"CLIP tokenizer byte_order {byte_order!r}: must be one of {', '.join(BYTE_ORDERS)}")
    table = bytes_to_unicode()
    return list(table.values()) if byte_order == "openai" else [table[b] for b in range(256)]


def clean_text(text: str) -> str:
    """open_clip's default cleaning ("lower"): ftfy's repairs, HTML entities unescaped twice,
    whitespace runs to one space, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def find_clip_merges(path: str | None = None) -> Path | None:
    """The merges file: PATH (a file, or a folder holding it), else the one shipped with mgpu, else one
    shipped in an installed package (open_clip, OpenAI's clip)."""
    if path:
        p = Path(path)
        p = p / CLIP_MERGES_FILE if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"--clip-vocab {path}: no such file (expected {CLIP_MERGES_FILE} or a folder with it)")
        return p
    if BUNDLED_CLIP_MERGES.is_file():
        return BUNDLED_CLIP_MERGES
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / CLIP_MERGES_FILE
            if candidate.is_file():
                return candidate
    return None


class ClipTokenizer:
    """CLIP's byte-level BPE. Ids: the 256 bytes (OpenAI's order), the same with "</w>" (end of word),
    one per merge, then <start_of_text> 49406 and <end_of_text> 49407 at fixed ids."""

    def __init__(self, merges: list[tuple[str, str]], context: int = 77, byte_order: str = "openai"):
        self.context = context
        self.byte_order = byte_order
        self.byte_encoder = bytes_to_unicode()
        symbols = _byte_symbols(byte_order)
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        if len(vocab) > CLIP_SOT:
            raise ValueError(f"{len(merges)} merges do not fit a vocabulary of {CLIP_VOCAB_SIZE}")
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.encoder.update(CLIP_SPECIALS)
        self.merges = list(merges)
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache: dict[str, list[str]] = {token: [token] for token in CLIP_SPECIALS}

    @classmethod
    def load(cls, path: str | None = None, context: int = 77, texts: list[str] | None = None) -> "ClipTokenizer":
        """The merges of PATH, else mgpu's own copy of CLIP's, else an installed package's; without one,
        merges learned from texts (the training captions) when given, else bare byte-level tokens. Both
        fallbacks warn."""
        found = find_clip_merges(path)
        if found is None:
            advice = "Pass --clip-vocab PATH for the real one"
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
        # open_clip reads lines 1..48894 (line 0 is a header); blank or malformed lines are skipped here
        merges = [tuple(line.split()) for line in lines[1: _CLIP_MERGE_LINES + 1] if len(line.split()) == 2]
        return cls(merges, context)

    def state(self) -> dict:
        """What a checkpoint keeps to rebuild this tokenizer exactly (``from_state``)."""
        return {"kind": "clip", "merges": [list(m) for m in self.merges], "byte_order": self.byte_order}

    @classmethod
    def from_state(cls, state: dict, context: int = 77) -> "ClipTokenizer":
        """The tokenizer a checkpoint was trained with. A state without "byte_order" comes from a
        checkpoint written before mgpu used OpenAI's byte order: it keeps the order it was trained with."""
        return cls([tuple(m) for m in state["merges"]], context, state.get("byte_order", "legacy"))

    @classmethod
    def from_texts(cls, texts: list[str], max_merges: int = 2000, context: int = 77) -> "ClipTokenizer":
        """Byte-level BPE trained on texts the way CLIP's merges were: split words as CLIP does, then
        repeatedly merge the most frequent adjacent pair (ties: the first seen) until no pair occurs
        twice or max_merges is reached. Deterministic: every rank and run learns the same merges."""
        byte_encoder, freq = bytes_to_unicode(), {}
        for text in texts:
            for word in _CLIP_PATTERN.findall(clean_text(text)):
                if word in CLIP_SPECIALS:
                    continue
                symbols = [byte_encoder[b] for b in word.encode("utf-8")]
                key = tuple(symbols[:-1] + [symbols[-1] + "</w>"])
                freq[key] = freq.get(key, 0) + 1
        words, merges = list(freq.items()), []
        while len(merges) < min(max_merges, _CLIP_MERGE_LINES):
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
            words = [(_merge(parts, best), n) for parts, n in words]
        return cls(merges, context)

    def _bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            parts = _merge(parts, best)
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """The ids of text, without the start and end tokens."""
        ids = []
        for word in _CLIP_PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self._bpe(word)]
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B, context) ids: <start_of_text> text <end_of_text>, cut so the end token always stays."""
        out = torch.zeros(len(texts), self.context, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [CLIP_SOT, *self.encode(text)[: self.context - 2], CLIP_EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def _merge(parts, pair: tuple[str, str]) -> list[str]:
    """parts with every occurrence of pair, left to right, joined into one symbol."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out
