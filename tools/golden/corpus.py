"""The text corpus the tokenizer golden fixtures are made from (tools/golden/clip_tokenizer.py,
tools/golden/wordpiece.py). Deterministic: the same strings on every run. Not needed by the tests,
which read the strings back from the fixtures.

It covers what captions hold in practice and what the reference tokenizers treat specially: English
captions, punctuation and contractions, digits, HTML entities, emoji, accented Latin and other scripts,
CJK, full-width and half-width forms, curly quotes, ligatures, decomposed accents, mojibake, number
characters that are not digits (², ₂, ½, ①, Ⅻ), control and zero-width characters, literal special
tokens of CLIP (<|startoftext|>, <start_of_text>, ...) and BERT ([CLS], [MASK], ...), text past CLIP's
77 tokens, and empty and whitespace-only strings; then random mixtures of all of these.
"""

from __future__ import annotations

import random

NOUNS = ["cat", "dog", "car", "person", "bicycle", "tree", "house", "pizza", "laptop", "giraffe", "boat",
         "mountain", "river", "child", "woman", "man", "bird", "horse", "street", "kitchen", "umbrella",
         "skateboard", "elephant", "banana", "clock", "train", "airplane", "bench", "sandwich", "teddy bear"]
ADJECTIVES = ["red", "small", "large", "blue", "happy", "old", "wooden", "shiny", "fluffy", "dark", "bright",
              "two", "three", "tiny", "enormous", "striped", "yellow", "green", "wet", "sleeping"]
TEMPLATES = ["a photo of a {a} {n}", "A {a} {n} sitting on a {n2}.", "There are {d} {n}s next to the {n2}!",
             "{A} {n} and {a2} {n2}, outdoors", "close-up of the {n}'s face", "the {n} isn't {a} -- it's {a2}",
             "{n} #{d} @ {d2}:{d3}pm", "\"{a} {n}\" (photo by {N})", "an image of {d} {a} {n}s; {a2} background",
             "{N}'s {n} was {a}, wasn't it?", "Is this a {n} or a {n2}?", "{a}/{a2} {n} [{d}x{d2}]"]
SPECIAL_TEXT = [
    # HTML entities, once and twice escaped
    "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "rock &amp;amp; roll", "it&#39;s", "&quot;quoted&quot;",
    "caf&eacute;", "a&nbsp;b", "&#x1F600; smile", "&copy; 2024", "&unknown; entity", "5 &lt; 6 &gt; 4",
    # emoji, with modifiers and joiners
    "😀", "a cat 🐱 on a mat", "👍🏽 thumbs up", "family 👨‍👩‍👧", "🇫🇷 flag", "❤️ love", "🎉🎉🎉", "☃ snow",
    # accents and other scripts
    "café", "naïve", "Ångström", "São Paulo", "Zürich", "Łódź", "straße", "İstanbul", "ÉCOLE", "Ελληνικά",
    "русский язык", "עברית", "العربية", "हिन्दी", "ไทย", "한국어 텍스트", "Tiếng Việt", "ǅemal", "ﬀ",
    # CJK
    "中文句子", "一只猫坐在垫子上", "日本語のテキスト", "ひらがな", "カタカナ", "北京欢迎你！", "𠀀𠀁", "㐀",
    # full-width and half-width forms
    "ＡＢＣ１２３！", "ｈｅｌｌｏ　ｗｏｒｌｄ", "ｶﾀｶﾅ", "ﾃｽﾄ ﾃﾞｰﾀ", "ﾊﾟﾝ", "（括弧）", "￥１００",
    # curly quotes and typographic punctuation
    "“quoted”", "‘single’", "it’s", "don’t", "«guillemets»", "„German“", "em—dash", "en–dash", "ellipsis…",
    # ligatures
    "ﬁsh", "ﬂower", "oﬀice", "eﬃcient", "waﬄe", "ﬅ", "ﬆ", "Ĳssel",
    # decomposed accents
    "cafe\u0301", "nin\u0303o", "A\u030angstro\u0308m", "e\u0301\u0301",
    # mojibake (UTF-8 read as Windows-1252 / Latin-1)
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "niÃ±o", "itâ€™s", "Ã\xa0 la mode", "Ã©cole",
    # number characters that are not ASCII digits
    "x²", "H₂O", "½ cup", "①②③", "Chapter Ⅻ", "ⅷ", "m³", "¼", "⑩", "CO₂ emissions", "٣ arabic three",
    "१२३", "x²y³", "2²", "Ⅻth", "a½b",
    # control, zero-width and odd whitespace
    "a\x00b", "\x1b[31mred\x1b[0m", "zero\u200bwidth", "soft\u00adhyphen", "\ufeffbom", "a\u2028b", "a\u0085b",
    "tab\tseparated", "line\nbreak", "a\u3000b", "a\u00a0b", "a\u2009b", "\x7f", "a\ufffdb", "a\u200db",
    # CLIP's special tokens written in text
    "<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<End_Of_Text>",
    "a photo<end_of_text> of a cat", "<start_of_text>a dog", "x<|endoftext|>y", "<start_of_text><end_of_text>",
    "<start of text>", "<start_of_text", "start_of_text>", "<<end_of_text>>",
    # BERT's special tokens written in text
    "[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "[cls]", "[Mask]", "a [MASK] on a mat", "x[CLS]y",
    "[CLS][SEP]", "[[MASK]]", "[ MASK ]", "[MASK", "MASK]", "[MASK][MASK]", "the [UNK] token", "[PAD] [PAD]",
    "[CL[CLS]", "[SEP].", "hello[SEP]world",
    # empty and whitespace-only
    "", " ", "   ", "\t", "\n", "\t\n \r", "\u3000", "\u00a0", "\u2028", "\u200b",
    # contractions and case
    "I'M HERE", "we'll", "they'd", "you've", "she's", "it'S", "'s", "''", "don't stop", "O'Neil's",
]
POOL = "".join(sorted(set("".join(SPECIAL_TEXT)))) + "abcdefghijklmnopqrstuvwxyz      0123456789.,!?'\"-_()&;#"


def _caption(rng: random.Random) -> str:
    fill = {"a": rng.choice(ADJECTIVES), "a2": rng.choice(ADJECTIVES), "n": rng.choice(NOUNS),
            "n2": rng.choice(NOUNS), "d": rng.randint(0, 99), "d2": rng.randint(0, 12), "d3": rng.randint(10, 59),
            "N": rng.choice(["Anna", "Bob", "Zoë", "José", "Mei"])}
    fill["A"] = fill["a"].capitalize()
    text = rng.choice(TEMPLATES).format(**fill)
    return text.upper() if rng.random() < 0.1 else text


def _mixture(rng: random.Random) -> str:
    """A caption with pieces of the special texts, random characters or words from the pool spliced in."""
    parts = [_caption(rng)]
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.5:
            parts.append(rng.choice(SPECIAL_TEXT))
        elif kind < 0.8:
            parts.append("".join(rng.choice(POOL) for _ in range(rng.randint(1, 8))))
        else:
            parts.append(_caption(rng))
    rng.shuffle(parts)
    return rng.choice(["", " ", "  ", "\n"]).join(parts)


def _long(rng: random.Random) -> str:
    """Past CLIP's 77 tokens: many captions in a row."""
    return " ".join(_caption(rng) for _ in range(rng.randint(8, 30)))


def corpus(n: int = 2600, seed: int = 0) -> list[str]:
    """SPECIAL_TEXT, then captions, long texts and mixtures up to n strings, without duplicates."""
    rng = random.Random(seed)
    out, seen = [], set()
    for text in SPECIAL_TEXT:
        if text not in seen:
            seen.add(text)
            out.append(text)
    makers = [_caption] * 3 + [_long] + [_mixture] * 6
    while len(out) < n:
        text = rng.choice(makers)(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
