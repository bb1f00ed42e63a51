"""CLIP byte-level BPE and BERT-Chinese WordPiece (models/tokenizers.py) on small vocabularies made
for these tests (tests/fixtures/tokenizers/, by make_tokenizer_fixtures.py there).

Checked three ways: hand-worked examples (derived in the comments), the token ids that the original
code (openai/CLIP's simple_tokenizer, google-research/bert's FullTokenizer) gives on the same
vocabularies (reference_tokens.json, made by that script), and the framing conventions of SD v1
(padding with <|endoftext|>), SD v2 (padding with 0) and Wukong ([CLS] ids [SEP], zero-padded to 77).
"""
import gzip
import json
import os

import numpy as np
import pytest

from models.tokenizers import (CLIPTokenizer, TokenizerFileError, WordPieceTokenizer, basic_tokenize,
                               bytes_to_unicode, clip_clean, clip_pieces, tokenizer_for_layout)

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tokenizers")
GZ = os.path.join(HERE, "clip_bpe_vocab.txt.gz")
VOCAB_JSON, MERGES = os.path.join(HERE, "clip_vocab.json"), os.path.join(HERE, "clip_merges.txt")
VOCAB_ZH = os.path.join(HERE, "vocab_zh.txt")
N_MERGES = 26  # make_tokenizer_fixtures.CLIP_MERGES
START, END = 512 + N_MERGES, 513 + N_MERGES  # OpenAI's order: 512 byte symbols, the merges, the two specials


@pytest.fixture(scope="module")
def references():
    with open(os.path.join(HERE, "reference_tokens.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=["gz", "json"])
def clip(request):
    """The same tokenizer from either file format."""
    if request.param == "gz":
        return CLIPTokenizer.from_files(GZ)
    return CLIPTokenizer.from_files(VOCAB_JSON, MERGES)


@pytest.fixture(scope="module")
def wordpiece():
    return WordPieceTokenizer(VOCAB_ZH)


# ---------------------------------------------------------------- CLIP BPE


def test_byte_table_is_a_bijection_onto_visible_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[ord("a")] == "a" and table[0xE9] == "é"
    # bytes 0..32 are the first 33 that are not printable Latin-1, so the space (32) is chr(256 + 32);
    # 127..160 are the next 34, so 0xAD (173, the soft hyphen) is chr(256 + 33 + 34)
    assert table[32] == chr(288) and table[0] == chr(256) and table[0xAD] == chr(256 + 67)
    assert not any(c.isspace() for c in table.values())


def test_cleaning_and_pieces_by_hand():
    assert clip_clean("  A&amp;amp;B\t\n“Hi”  ＦＵＬＬ ﬁ\x07 ") == 'a&b "hi" full fi'
    # HTML entities: ftfy decodes once unless the text holds "<"; OpenAI/OpenCLIP then twice more,
    # transformers (SD v1) not at all
    assert clip_clean("&amp;amp;amp;") == "&" and clip_clean("&amp;amp;amp;", html_unescapes=0) == "&amp;amp;"
    assert clip_clean("< &amp;amp;") == "< &" and clip_clean("< &amp;amp;", html_unescapes=0) == "< &amp;amp;"
    assert tokenizer_for_layout("hf_clip", GZ).html_unescapes == 0
    assert tokenizer_for_layout("open_clip", GZ).html_unescapes == 2
    assert clip_pieces("it's a dog's 12 ...!! 一只猫 <|endoftext|>x") == [
        "it", "'s", "a", "dog", "'s", "1", "2", "...!!", "一只猫", "<|endoftext|>", "x"]


def test_bpe_by_hand(clip):
    # "photo": p h o t o</w> → (p,h) rank 3 → ph o t o</w> → (o,t) rank 4 → ph ot o</w> → (ph,ot) rank 5
    # → phot o</w> → (phot,o</w>) rank 6 → one symbol, id 512 + 6.  "a": a single character → "a</w>",
    # id 256 + 64 (the 65th byte symbol, "a" = 97 − 33).  "cat": (c,a) then (ca,t</w>): id 512 + 1.
    assert clip.bpe("photo") == ["photo</w>"] and clip.bpe("a") == ["a</w>"]
    assert clip.encode("a photo of a cat") == [320, 518, 514, 320, 513]
    # "aaaa": the pair (a,a) is merged left to right without overlap: aa a a</w>; nothing else applies
    assert clip.bpe("aaaa") == ["aa", "a", "a</w>"]
    # an unmerged byte of a multi-byte character: "é" = C3 A9, written "Ã©"; ("é", "</w>") never matches
    assert clip.bpe("caf" + "Ã©") == ["ca", "f", "Ã", "©</w>"]


def test_clip_matches_openai_simple_tokenizer(clip, references):
    for prompt, ids in references["clip"].items():
        assert clip.encode(prompt) == ids, prompt


def test_sd1_framing_pads_with_end_token():
    tokenizer = CLIPTokenizer.from_files(GZ)
    tokens, mask = tokenizer(["a cat", ""])
    assert tokens.shape == mask.shape == (2, 77) and tokens.dtype == np.int32 and mask.dtype == np.bool_
    assert tokens[0, :4].tolist() == [START, 320, 513, END] and (tokens[0, 4:] == END).all()
    assert tokens[1, :2].tolist() == [START, END] and (tokens[1, 2:] == END).all()
    assert mask.sum(axis=1).tolist() == [4, 2]
    np.testing.assert_array_equal(tokenizer.unconditional(3)[0], np.repeat(tokens[1:], 3, axis=0))


def test_sd2_framing_pads_with_zero_and_long_prompts_keep_the_end_token():
    tokenizer = CLIPTokenizer.from_files(VOCAB_JSON, pad_token_id=0)  # merges.txt found beside vocab.json
    tokens, mask = tokenizer("a cat")
    assert tokens[0, :4].tolist() == [START, 320, 513, END] and (tokens[0, 4:] == 0).all()
    with pytest.warns(UserWarning, match="is 100 tokens, more than the 75 .* kept the first 75: 'cat cat"):
        tokens, mask = tokenizer("cat " * 100)
    assert tokens[0].tolist() == [START] + [513] * 75 + [END] and mask.all()
    assert tokenizer.text_ctx == 77


def test_clip_decode_round_trip(clip):
    assert clip.decode(clip("A Photo of the RED toys!!")[0][0]) == "a photo of the red toys !!"
    assert clip.decode(clip("一只猫 café")[0][0]) == "一只猫 café"


def test_clip_folder_and_layout_lookup(tmp_path):
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes(open(GZ, "rb").read())
    assert CLIPTokenizer.from_files(str(tmp_path)).encode("a cat") == [320, 513]
    assert CLIPTokenizer.from_files(HERE + "/clip_vocab.json").encode("a cat") == [320, 513]
    assert tokenizer_for_layout("hf_clip", GZ).pad_id == END
    assert tokenizer_for_layout("open_clip", GZ).pad_id == 0
    assert isinstance(tokenizer_for_layout("wukong", VOCAB_ZH), WordPieceTokenizer)


def test_clip_missing_and_bad_files_are_named(tmp_path):
    with pytest.raises(TokenizerFileError, match=r"vocab.json \+ merges.txt.*nope.json.*--vocab PATH"):
        CLIPTokenizer.from_files(str(tmp_path / "nope.json"))
    with pytest.raises(TokenizerFileError, match=r"--vocab PATH"):
        CLIPTokenizer.from_files(None)
    lonely = tmp_path / "vocab.json"
    lonely.write_text(open(VOCAB_JSON, encoding="utf-8").read(), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"merges.txt.*--merges PATH"):
        CLIPTokenizer.from_files(str(lonely))
    with pytest.raises(TokenizerFileError, match="neither a vocab.json nor a bpe_simple_vocab"):
        CLIPTokenizer.from_files(VOCAB_ZH)
    with pytest.raises(TokenizerFileError, match="holds neither vocab.json"):
        CLIPTokenizer.from_files(str(tmp_path / ".."))
    no_specials = tmp_path / "v.json"
    no_specials.write_text(json.dumps({"a</w>": 0}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"no <\|startoftext\|> or <\|endoftext\|>"):
        CLIPTokenizer.from_files(str(no_specials), MERGES)
    bad_merges = tmp_path / "m.txt"
    bad_merges.write_text("#version: 0.2\na b\nc d e\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="line 3 is not a merge of two symbols"):
        CLIPTokenizer.from_files(VOCAB_JSON, str(bad_merges))
    partial = {k: v for k, v in json.load(open(VOCAB_JSON, encoding="utf-8")).items() if k != "cat</w>"}
    (tmp_path / "p.json").write_text(json.dumps(partial), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="no id for the BPE symbol 'cat</w>'"):
        CLIPTokenizer.from_files(str(tmp_path / "p.json"), MERGES).encode("a cat")


def test_gz_reader_takes_at_most_clips_merge_count(tmp_path):
    """OpenAI's file holds 262144 merges of which CLIP uses the first 48894 (vocabulary 49408)."""
    path = tmp_path / "big.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"m{i} x" for i in range(48894 + 5)))
    tokenizer = CLIPTokenizer.from_files(str(path))
    assert len(tokenizer.encoder) == 49408 and tokenizer.end_id == 49407 and len(tokenizer.ranks) == 48894


# ---------------------------------------------------------------- WordPiece


def test_basic_tokenize_by_hand():
    # CJK characters become words, punctuation (ASCII and full-width) splits, lower case, accents go,
    # control characters go, kana are not CJK ideographs and stay together, "[UNK]" is never split
    assert basic_tokenize("Café一只,猫。\x00ねこ [UNK] x[y") == [
        "cafe", "一", "只", ",", "猫", "。", "ねこ", "[UNK]", "x", "[", "y"]


def test_wordpiece_by_hand(wordpiece):
    # greedy longest match: "unaffable" → un, ##aff, ##able; "dogs" → do, ##g, ##s; "xyz" has no piece
    assert wordpiece.wordpiece("unaffable") == ["un", "##aff", "##able"]
    assert wordpiece.wordpiece("dogs") == ["do", "##g", "##s"]
    assert wordpiece.wordpiece("xyz") == ["[UNK]"] and wordpiece.wordpiece("a" * 101) == ["[UNK]"]
    assert wordpiece.encode("unaffable dogs [UNK]") == [29, 30, 31, 27, 28, 26, 1]


def test_wordpiece_matches_bert(wordpiece, references):
    for prompt, ids in references["wordpiece"].items():
        assert wordpiece.encode(prompt) == ids, prompt


def test_wukong_framing(wordpiece):
    tokens, mask = wordpiece(["一只猫", ""])
    assert tokens.shape == (2, 77) and tokens.dtype == np.int32
    assert tokens[0, :5].tolist() == [2, 5, 6, 7, 3] and (tokens[0, 5:] == 0).all()
    assert tokens[1, :2].tolist() == [2, 3] and (tokens[1, 2:] == 0).all()
    assert mask.sum(axis=1).tolist() == [5, 2]
    with pytest.warns(UserWarning, match="is 100 tokens, more than the 75 .* kept the first 75: '猫猫猫"):
        long_tokens, long_mask = wordpiece("猫" * 100)
    assert long_tokens[0].tolist() == [2] + [7] * 75 + [3] and long_mask.all()
    assert wordpiece.decode(tokens[0]) == "一只猫"
    assert wordpiece.decode(wordpiece("A photo of the cat, 一只狗")[0][0]) == "a photo of the cat ,一只狗"  # no space next to a CJK character


def test_wordpiece_normalises_prompts_only_when_asked():
    """The GLIDE demo's word-level tokenizer reads normalised prompts, so layout never changes its tokens;
    Wukong-Huahua's (the default) reads them as written, as its checkpoints were trained."""
    words = WordPieceTokenizer(VOCAB_ZH, context_length=16, normalise=True)
    plain = WordPieceTokenizer(VOCAB_ZH, context_length=16)
    for variant in ("  A PHOTO of the CAT!!", "a photo of the cat", "Ａ photo\tof the cat。"):
        np.testing.assert_array_equal(words(variant)[0], words("a photo of the cat")[0], err_msg=variant)
    assert plain.encode("a photo of the cat!!") == plain.encode("a photo of the cat") + [plain.encoder["!"]] * 2
    assert words.n_vocab == plain.n_vocab == len(open(VOCAB_ZH, encoding="utf-8").read().splitlines())


def test_wordpiece_missing_and_bad_files_are_named(tmp_path):
    with pytest.raises(TokenizerFileError, match=r"vocab_zh.txt.*missing.txt.*--vocab PATH"):
        WordPieceTokenizer(str(tmp_path / "missing.txt"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\n[UNK]\na\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"no \[CLS\], \[SEP\] line"):
        WordPieceTokenizer(str(bad))


def test_vocab_json_ids_are_read_not_recomputed(tmp_path):
    """transformers' vocab.json decides the ids: a vocabulary with every id moved gives the moved ids."""
    encoder = json.load(open(VOCAB_JSON, encoding="utf-8"))
    top = max(encoder.values())
    moved = {symbol: top - i for symbol, i in encoder.items()}  # the ids in reverse order
    (tmp_path / "vocab.json").write_text(json.dumps(moved), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(open(MERGES, encoding="utf-8").read(), encoding="utf-8")
    tokenizer = CLIPTokenizer.from_files(str(tmp_path))
    assert tokenizer.encode("a photo of a cat") == [moved[s] for s in ("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")]
    assert tokenizer("")[0][0, :3].tolist() == [moved["<|startoftext|>"], moved["<|endoftext|>"], moved["<|endoftext|>"]]
