"""The tokenizers, on tiny vocabularies the tests write themselves and on CLIP's own merges, which ship
with mgpu (nothing is downloaded). The reference comparisons are in test_golden_tokenizers.py."""

import gzip
import logging

import pytest

from mgpu import tokenizers
from mgpu.tokenizers import CLIP_EOT, CLIP_SOT, ClipTokenizer, WordPiece, basic_split, bytes_to_unicode

MERGES = ["h e", "l l", "he ll", "hell o</w>", "w o", "wo r", "wor ld</w>", "l d</w>"]


@pytest.fixture
def merges_file(tmp_path):
    path = tmp_path / "vocab dir" / "bpe_simple_vocab_16e6.txt.gz"
    path.parent.mkdir()
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return path


@pytest.fixture
def no_merges_anywhere(monkeypatch, tmp_path):
    """Neither mgpu's own copy of CLIP's merges nor an installed package's can be found."""
    monkeypatch.setattr(tokenizers, "BUNDLED_CLIP_MERGES", tmp_path / "absent.txt.gz")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)


def test_byte_table_covers_every_byte_with_printable_characters_in_openai_order():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("a")] == "a" and not table[ord(" ")].isspace() and table[ord(" ")] == "Ġ"
    order = list(table)  # the printable bytes first: they number the single-byte tokens
    assert order[:3] == [ord("!"), ord('"'), ord("#")] and order[188] == 0 and order[-1] == 173


def test_the_shipped_merges_give_clips_ids():
    tok = ClipTokenizer.load()
    assert tokenizers.find_clip_merges() == tokenizers.BUNDLED_CLIP_MERGES
    assert len(tok.merges) == 48894 and tok.encoder["a"] == 64 and tok.encoder["a</w>"] == 320
    assert tok(["a photo of a cat"])[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    # open_clip 3.3: tokenize(["a photo of a cat, 2 dogs!"])
    assert tok(["a photo of a cat, 2 dogs!"])[0, :11].tolist() == [49406, 320, 1125, 539, 320, 2368, 267, 273, 3255,
                                                                   256, 49407]


def test_special_tokens_written_in_a_caption_are_read_as_open_clip_reads_them():
    tok = ClipTokenizer.load()
    assert tok.encode("a <start_of_text> b <END_OF_TEXT>") == [320, CLIP_SOT, 321, CLIP_EOT]
    assert CLIP_SOT not in tok.encode("<|startoftext|>")  # OpenAI's spelling is plain text to open_clip


def test_checkpoint_state_round_trip_and_old_states_keep_their_byte_order():
    tok = ClipTokenizer.from_texts(["a small red circle"] * 3)
    again = ClipTokenizer.from_state(tok.state())
    assert again.byte_order == "openai" and again.merges == tok.merges and again.encode("red a") == tok.encode("red a")
    old = ClipTokenizer.from_state({"kind": "clip", "merges": [list(m) for m in tok.merges]})
    assert old.byte_order == "legacy" and old.encoder["a"] == ord("a") and tok.encoder["a"] == 64
    with pytest.raises(ValueError, match="byte_order 'ascii': must be one of openai, legacy"):
        ClipTokenizer([], byte_order="ascii")


def test_bpe_merges_words_in_rank_order(merges_file):
    tok = ClipTokenizer.load(str(merges_file))
    hello = tok.encoder["hello</w>"]
    assert hello == 512 + MERGES.index("hell o</w>")
    assert tok.encode("Hello  WORLD") == [hello, tok.encoder["world</w>"]]
    assert tok.encode("hello, world!") == [hello, tok.encoder[",</w>"], tok.encoder["world</w>"], tok.encoder["!</w>"]]


def test_a_folder_is_enough_and_html_is_unescaped(merges_file):
    tok = ClipTokenizer.load(str(merges_file.parent))
    assert tok.encode("hello &amp;") == tok.encode("hello &")


def test_batches_start_and_end_with_the_special_tokens_and_keep_the_end_when_cut(merges_file):
    tok = ClipTokenizer.load(str(merges_file), context=8)
    ids = tok(["hello world", "a b c d e f g h i j"])
    assert ids.shape == (2, 8)
    assert ids[0, :4].tolist() == [CLIP_SOT, tok.encoder["hello</w>"], tok.encoder["world</w>"], CLIP_EOT]
    assert ids[0, 4:].tolist() == [0] * 4
    assert ids[1, 0] == CLIP_SOT and ids[1, -1] == CLIP_EOT and ids[1].argmax() == 7  # pooling finds it


def test_without_a_vocabulary_it_falls_back_to_bytes_and_says_so(caplog, no_merges_anywhere):
    with caplog.at_level(logging.WARNING):
        tok = ClipTokenizer.load()
    assert "byte-level tokens" in caplog.text
    assert tok.encode("hi") == [tok.encoder["h"], tok.encoder["i</w>"]] == [71, 328]  # CLIP's byte ids
    assert tok.encode("你") == [tok.encoder[c] for c in tok._bpe("".join(bytes_to_unicode()[b] for b in "你".encode()))]


def test_a_missing_vocabulary_file_is_an_error():
    with pytest.raises(FileNotFoundError, match="--clip-vocab /nope: no such file"):
        ClipTokenizer.load("/nope")


def bert_vocab(tmp_path, tokens):
    vocab = [f"[unused{i}]" for i in range(104)]
    for token, i in {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}.items():
        vocab[i] = token
    folder = tmp_path / "bert model"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab + tokens) + "\n", encoding="utf-8")
    return folder


def test_basic_split_separates_cjk_and_punctuation():
    assert basic_split("我爱北京, Héllo!") == ["我", "爱", "北", "京", ",", "hello", "!"]


def test_wordpiece_longest_match_first(tmp_path):
    tok = WordPiece.load(str(bert_vocab(tmp_path, ["我", "爱", "hello", "hel", "##lo", "##l", ","])))
    assert tok.tokenize("我爱 hello, hellolo 猫") == ["我", "爱", "hello", ",", "hello", "##lo", "[UNK]"]
    ids = tok(["我爱", "hello"])
    assert ids.tolist() == [[101, 104, 105, 102], [101, 106, 102, 0]]


def test_wordpiece_keeps_special_tokens_written_in_a_caption_whole(tmp_path):
    tok = WordPiece.load(str(bert_vocab(tmp_path, ["我", "a", "mask", "[", "]"])))
    assert tok.tokenize("我[MASK]a [CLS] [mask]") == ["我", "[MASK]", "a", "[CLS]", "[", "mask", "]"]
    assert tok.encode("[PAD][SEP][UNK]") == [0, 102, 100]


def test_wordpiece_checks_the_special_ids(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\[UNK\] must have id 100, has 1"):
        WordPiece.load(str(folder))


def test_wordpiece_fallback_from_captions(caplog):
    with caplog.at_level(logging.WARNING):
        tok = WordPiece.from_texts(["红色的圆", "两个蓝色方块"])
    assert "captions' characters" in caplog.text
    assert "[UNK]" not in tok.tokenize("蓝色的圆")
    assert tok.tokenize("绿") == ["[UNK]"]
    assert tok(["红色"]).tolist()[0][0] == 101


def test_merges_learned_from_captions_make_frequent_words_single_tokens(caplog, no_merges_anywhere):
    captions = ["two small red circles and a large blue square", "a small red circle", "three large blue squares"] * 5
    tok = ClipTokenizer.from_texts(captions)
    assert tok.merges == ClipTokenizer.from_texts(captions).merges  # deterministic: every rank learns the same
    for word in ("small", "red", "and", "large", "blue"):
        assert len(tok.encode(word)) == 1, word
    assert tok.encode("circle") != [] and len(tok.encode("purple")) > 1  # unseen words fall back to pieces
    ids = tok(["a small red circle"])[0]
    assert ids[0] == CLIP_SOT and ids[5] == CLIP_EOT and ids.max() == CLIP_EOT
    assert tok.encode("a") == [320] and tok.encoder["s"] == 82  # single bytes keep CLIP's ids
    with caplog.at_level(logging.WARNING):
        assert ClipTokenizer.load(texts=captions).merges == tok.merges
    assert "byte-level BPE merges learned from 15 training captions" in caplog.text
