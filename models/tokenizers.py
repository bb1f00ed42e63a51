"""The tokenizers of the latent text-to-image checkpoints, read from the user's own vocabulary files.

Nothing is downloaded: each tokenizer is built from files the user passes (``--vocab``), and a
missing or malformed file is a :class:`TokenizerFileError` naming the file and the flag.

:class:`CLIPTokenizer` — CLIP's byte-level BPE (Radford et al. 2021; the GPT-2 scheme of Radford et
al. 2019, Sec. 2.2), for SD v1 (transformers' tokenizer: padded with ``<|endoftext|>``) and SD v2
(OpenCLIP's: padded with 0). A prompt is

1. cleaned (:func:`clip_clean`): ftfy's default fixes for typed text (its mojibake repair is left
   out: a typed prompt is valid text), HTML entities unescaped, whitespace runs collapsed to one
   space, ends stripped, lower-cased;
2. cut into pieces (:func:`clip_pieces`): the special tokens, the contractions ``'s 't 're 've 'm 'll
   'd``, runs of letters, single digits, runs of other non-space characters;
3. each piece's UTF-8 bytes written as printable characters (:func:`bytes_to_unicode`), ``</w>``
   appended to its last character, and merged by BPE: repeatedly the adjacent pair with the lowest
   merge rank is joined everywhere (left to right) until no pair has a rank;
4. framed as ``<|startoftext|> ids <|endoftext|>``, cut to the context (75 ids + the two) and padded.

:class:`WordPieceTokenizer` — Wukong-Huahua's BERT-Chinese WordPiece (Devlin et al. 2019; Wu et al.
2016, Sec. 4.1): control characters dropped, whitespace normalised, a space put around every CJK
ideograph, split on whitespace; each word lower-cased and stripped of accents (NFD, marks
dropped) and split at every punctuation character; each word then cut greedily into the longest
vocabulary pieces, continuations spelled ``##piece`` (a word that cannot be cut, or of more than
100 characters, becomes ``[UNK]``). Framed as ``[CLS] ids [SEP]``, cut to 77, padded with 0.

Both return, like :class:`models.text.ByteTokenizer`, ``(tokens int32 [B, L], mask bool [B, L])``
with mask True on the framed tokens; SD and Wukong read every position and ignore the mask.
"""
import gzip
import html
import json
import os
import unicodedata
import warnings

import numpy as np

from mind_diffusion.prompts import normalise_prompt

__all__ = [
    "TokenizerFileError",
    "bytes_to_unicode",
    "clip_clean",
    "clip_pieces",
    "CLIPTokenizer",
    "WordPieceTokenizer",
    "basic_tokenize",
    "tokenizer_for_layout",
]

CONTEXT_LENGTH = 77
# CLIP's merges: its vocabulary is 256 bytes + 256 bytes with </w> + the merges + 2 specials = 49408.
MAX_MERGES = 49152 - 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class TokenizerFileError(FileNotFoundError):
    """A vocabulary file is missing or unusable; the message names it and the flag that passes it."""


def _require_file(path, what, flag):
    if path is None or not os.path.isfile(path):
        shown = "no file was given" if path is None else f"{path!r} does not exist or is not a file"
        raise TokenizerFileError(f"{what} is needed and {shown}; nothing is downloaded: pass it with {flag} PATH")
    return path


# ---------------------------------------------------------------- CLIP byte-level BPE


def bytes_to_unicode():
    """{byte: character}: the bytes of printable Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    stand for themselves, every other byte b (spaces, controls, …) for chr(256 + n), n counting those
    bytes in order, so that every byte string is a string of visible characters and back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return dict(sorted(table.items(), key=lambda item: (item[0] not in printable, item[0])))


# ftfy's default repairs that change ordinary typed text, reproduced here (ftfy is not a dependency;
# its mojibake repair is not: a prompt typed by a user is already valid text).
# ftfy.uncurl_quotes: U+02BC and U+2018..201B → ', U+201C..201F → "
_QUOTES = {**{cp: "'" for cp in (0x02BC, *range(0x2018, 0x201C))}, **{cp: '"' for cp in range(0x201C, 0x2020)}}
_LIGATURES = (0x0132, 0x0133, 0x0149, *range(0x01C4, 0x01CD), 0x01F1, 0x01F2, 0x01F3, *range(0xFB00, 0xFB07))


def _needs_nfkc(char):
    cp = ord(char)
    # ligatures, the ideographic space, full-width ASCII and half-width forms (ftfy's character width fix)
    return cp in _LIGATURES or cp == 0x3000 or 0xFF01 <= cp <= 0xFFEE


def clip_clean(text, html_unescapes=2):
    """CLIP's text cleanup: ftfy's default fixes for typed text, ``html_unescapes`` more passes of
    ``html.unescape``, every whitespace run one space, ends stripped, lower case.

    ftfy's fixes reproduced: HTML entities decoded once unless the text holds a ``<`` (its "auto"
    mode), Latin ligatures and full-/half-width forms to plain letters (NFKC of those characters
    only), curly quotes to ``'``/``"``, control characters other than whitespace and U+FEFF dropped,
    NFC. OpenAI's and OpenCLIP's tokenizers then unescape twice more (``html_unescapes=2``);
    transformers' ``CLIPTokenizer`` (SD v1) does not (0).
    """
    if "<" not in text:
        text = html.unescape(text)
    chars = []
    for char in text:
        if _needs_nfkc(char):
            chars.append(unicodedata.normalize("NFKC", char))
        elif ord(char) in _QUOTES:
            chars.append(_QUOTES[ord(char)])
        elif (unicodedata.category(char) == "Cc" and not char.isspace()) or char == "\ufeff":
            continue
        else:
            chars.append(char)
    text = unicodedata.normalize("NFC", "".join(chars))
    for _ in range(html_unescapes):
        text = html.unescape(text)
    return " ".join(text.split()).lower()


def _is_letter(char):
    return unicodedata.category(char).startswith("L")


def _is_number(char):
    return unicodedata.category(char).startswith("N")


def clip_pieces(text):
    """Cut cleaned text as CLIP's pattern ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
    \\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`` does: at each position the first alternative that matches,
    runs as long as they go; whitespace separates and is dropped."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        char = text[i]
        special = next((s for s in (START, END, *CONTRACTIONS) if text.startswith(s, i)), None)
        if special:
            j = i + len(special)
        elif _is_letter(char):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
        elif _is_number(char):
            j = i + 1
        elif char.isspace():
            i += 1
            continue
        else:
            j = i + 1
            while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def _read_merges(lines, path):
    """Merge pairs from a merges file's lines: its ``#version`` header skipped, at most CLIP's 48894."""
    first = 1 if lines and "#version" in lines[0] else 0
    merges = []
    for number, line in enumerate(lines[first:], first + 1):
        if not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise TokenizerFileError(f"{path}: line {number} is not a merge of two symbols: {line!r}")
        merges.append(tuple(pair))
        if len(merges) == MAX_MERGES:
            break
    return merges


def _merges_beside(vocab):
    """The merges file that goes with ``vocab``: its name with "vocab" → "merges" and .json → .txt
    (``clip_vocab.json`` → ``clip_merges.txt``) if that exists, else ``merges.txt`` in its folder."""
    folder, name = os.path.split(vocab)
    paired = os.path.join(folder, name[: -len(".json")].replace("vocab", "merges") + ".txt")
    return paired if "vocab" in name and os.path.isfile(paired) else os.path.join(folder, "merges.txt")


class FramedTokenizer:
    """What the two vocabulary tokenizers share: ``[start] ids [end]`` framing to a fixed context, the
    batch call and the unconditional (empty) prompt. A subclass sets ``encoder`` (piece → id),
    ``start_id``, ``end_id``, ``pad_id`` and ``context_length`` and defines ``encode(text) -> ids``."""

    @property
    def text_ctx(self):
        """The context length, under the name the programs use for every tokenizer."""
        return self.context_length

    @property
    def n_vocab(self):
        """Token ids the text encoder's embedding must accept: the highest id + 1."""
        return max(self.encoder.values()) + 1

    def frame(self, ids):
        """``[start] ids [end]`` cut to the context (the end token kept) and padded: (tokens, mask)."""
        ids = [self.start_id, *ids[: self.context_length - 2], self.end_id]
        return _padded(ids, self.context_length, self.pad_id)

    def __call__(self, prompts):
        """Encode one prompt or a list: (tokens int32 [B, L], mask bool [B, L])."""
        return _batch(self, prompts)

    def unconditional(self, batch_size=1):
        """The empty prompt's tokens and mask (``[start] [end] pad…``: the unconditional context)."""
        return self([""] * batch_size)


class CLIPTokenizer(FramedTokenizer):
    """CLIP's BPE tokenizer: ``tokenizer(prompts)`` → (tokens int32 [B, 77], mask bool [B, 77]).

    Args:
        encoder: {symbol: id}, with ``<|startoftext|>`` and ``<|endoftext|>``.
        merges: merge pairs in rank order.
        pad_token_id: the padding id: None pads with ``<|endoftext|>`` (SD v1, transformers'
            ``padding="max_length"``), 0 as OpenCLIP (SD v2).
        context_length: L.
        html_unescapes: passes of ``html.unescape`` after ftfy's fixes: 2 as OpenAI's and OpenCLIP's
            code, 0 as transformers' (SD v1); see :func:`clip_clean`.
    Build it from files with :meth:`from_files`.
    """

    def __init__(self, encoder, merges, pad_token_id=None, context_length=CONTEXT_LENGTH, html_unescapes=2,
                 source="vocabulary"):
        missing = [s for s in (START, END) if s not in encoder]
        if missing:
            raise TokenizerFileError(f"{source} has no {' or '.join(missing)}: not a CLIP vocabulary")
        self.encoder = dict(encoder)
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.start_id, self.end_id = self.encoder[START], self.encoder[END]
        self.pad_id = self.end_id if pad_token_id is None else int(pad_token_id)
        self.context_length = context_length
        self.html_unescapes = html_unescapes
        self.source = source
        self._cache = {}

    @classmethod
    def from_files(cls, vocab, merges=None, pad_token_id=None, context_length=CONTEXT_LENGTH, html_unescapes=2):
        """Read transformers' ``vocab.json`` + ``merges.txt`` (``merges`` defaults to the one beside it,
        see :func:`_merges_beside`), OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, or a folder holding either."""
        if vocab is not None and os.path.isdir(vocab):
            for names in (("vocab.json", "merges.txt"), ("bpe_simple_vocab_16e6.txt.gz", None)):
                if os.path.isfile(os.path.join(vocab, names[0])):
                    found = os.path.join(vocab, names[0])
                    merges = merges or (os.path.join(vocab, names[1]) if names[1] else None)
                    return cls.from_files(found, merges, pad_token_id, context_length, html_unescapes)
            raise TokenizerFileError(f"folder {vocab!r} holds neither vocab.json + merges.txt nor "
                                     "bpe_simple_vocab_16e6.txt.gz; pass the CLIP vocabulary with --vocab PATH")
        _require_file(vocab, "the CLIP tokenizer's vocabulary (vocab.json + merges.txt, or "
                             "bpe_simple_vocab_16e6.txt.gz)", "--vocab")
        if vocab.endswith(".gz"):
            with gzip.open(vocab, "rt", encoding="utf-8") as f:
                merge_list = _read_merges(f.read().split("\n"), vocab)
            symbols = list(bytes_to_unicode().values())
            symbols += [s + "</w>" for s in symbols] + ["".join(pair) for pair in merge_list] + [START, END]
            encoder = {s: i for i, s in enumerate(symbols)}
            return cls(encoder, merge_list, pad_token_id, context_length, html_unescapes, source=vocab)
        if not vocab.endswith(".json"):
            raise TokenizerFileError(f"{vocab!r} is neither a vocab.json nor a bpe_simple_vocab .gz; pass the CLIP "
                                     "vocabulary with --vocab PATH")
        merges = merges or _merges_beside(vocab)
        _require_file(merges, f"merges.txt (the BPE merges that go with {vocab})", "--merges")
        try:
            with open(vocab, encoding="utf-8") as f:
                encoder = json.load(f)
        except ValueError as err:
            raise TokenizerFileError(f"{vocab} is not valid JSON ({err}); pass transformers' CLIP vocab.json") from err
        with open(merges, encoding="utf-8") as f:
            merge_list = _read_merges(f.read().split("\n"), merges)
        return cls(encoder, merge_list, pad_token_id, context_length, html_unescapes, source=vocab)

    def bpe(self, piece):
        """The BPE symbols of one piece (already in byte characters), the last ending in ``</w>``."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            ranked = [(self.ranks[p], p) for p in zip(word, word[1:]) if p in self.ranks]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text):
        """Token ids of ``text``, without the start and end tokens."""
        ids = []
        for piece in clip_pieces(clip_clean(text, self.html_unescapes)):
            if piece in (START, END):
                ids.append(self.encoder[piece])
                continue
            for symbol in self.bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))):
                if symbol not in self.encoder:
                    raise TokenizerFileError(f"{self.source} has no id for the BPE symbol {symbol!r}: the vocabulary "
                                             "and the merges are not from the same CLIP tokenizer")
                ids.append(self.encoder[symbol])
        return ids

    def decode(self, tokens):
        """Text of token ids; the special tokens and padding are left out, ``</w>`` becomes a space."""
        specials = {self.start_id, self.end_id, self.pad_id}
        text = "".join(self.decoder[int(t)] for t in np.asarray(tokens).reshape(-1) if int(t) not in specials)
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


# ---------------------------------------------------------------- BERT-Chinese WordPiece


def _is_bert_whitespace(char):
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_bert_control(char):
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_bert_punctuation(char):
    """ASCII non-letters-or-digits (``$``, ``^``, ``` ` ``` too) and every Unicode punctuation class P*."""
    cp = ord(char)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(char).startswith("P")


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(char):
    """The CJK Unified Ideographs blocks (and extensions, compatibility ideographs); not kana or hangul."""
    cp = ord(char)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _split_punctuation(word):
    pieces, current = [], ""
    for char in word:
        if _is_bert_punctuation(char):
            if current:
                pieces.append(current)
            pieces.append(char)
            current = ""
        else:
            current += char
    return pieces + [current] if current else pieces


def basic_tokenize(text, never_split=("[UNK]",)):
    """BERT's basic tokenizer (uncased, Chinese characters split): the words WordPiece then cuts."""
    cleaned = []
    for char in text:
        if ord(char) in (0, 0xFFFD) or _is_bert_control(char):
            continue
        if _is_bert_whitespace(char):
            cleaned.append(" ")
        elif _is_cjk(char):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    words = []
    for word in "".join(cleaned).split():
        if word in never_split:
            words.append(word)
            continue
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        words.extend(_split_punctuation(word))
    return words


class WordPieceTokenizer(FramedTokenizer):
    """Wukong-Huahua's tokenizer: ``tokenizer(prompts)`` → (tokens int32 [B, 77], mask bool [B, 77]).

    ``vocab`` is BERT-Chinese's ``vocab_zh.txt`` (one piece a line, id = line number from 0; Wukong's
    has 21128 lines with ``[PAD]`` = 0, ``[UNK]`` = 100, ``[CLS]`` = 101, ``[SEP]`` = 102). Padding is
    0 whatever the vocabulary, as Wukong's ``tokenize`` fills with zeros.

    ``normalise`` first passes every text through :func:`mind_diffusion.prompts.normalise_prompt`,
    as the GLIDE demo's word-level tokenizer does in training and sampling alike; Wukong-Huahua's
    checkpoints were trained without it, so it is off by default.
    """

    max_word_chars = 100
    pad_id = 0

    def __init__(self, vocab, context_length=CONTEXT_LENGTH, normalise=False):
        _require_file(vocab, "Wukong's tokenizer vocabulary vocab_zh.txt (BERT-Chinese WordPiece)", "--vocab")
        with open(vocab, encoding="utf-8") as f:
            pieces = [line.strip() for line in f.read().split("\n")]
        if pieces and pieces[-1] == "":
            pieces.pop()  # the final newline
        self.encoder = {}
        for index, piece in enumerate(pieces):
            self.encoder.setdefault(piece, index)
        self.decoder = dict(enumerate(pieces))
        missing = [s for s in ("[CLS]", "[SEP]", "[UNK]") if s not in self.encoder]
        if missing:
            raise TokenizerFileError(f"{vocab} has no {', '.join(missing)} line: not a BERT WordPiece vocabulary; "
                                     "pass Wukong's vocab_zh.txt with --vocab PATH")
        self.start_id, self.end_id, self.unk_id = (self.encoder[s] for s in ("[CLS]", "[SEP]", "[UNK]"))
        self.context_length = context_length
        self.normalise = normalise

    def wordpiece(self, word):
        """Greedy longest-match-first pieces of one word (``##`` marks a continuation), or [``[UNK]``]."""
        if len(word) > self.max_word_chars:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.encoder:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        """The WordPiece pieces of ``text`` (normalised first with ``normalise``)."""
        if self.normalise:
            text = normalise_prompt(text)
        return [piece for word in basic_tokenize(text) for piece in
                ([word] if word == "[UNK]" else self.wordpiece(word))]

    def encode(self, text):
        """Token ids of ``text``, without ``[CLS]`` and ``[SEP]``."""
        return [self.encoder.get(piece, self.unk_id) for piece in self.tokenize(text)]

    def decode(self, tokens):
        """Text of token ids (special tokens and padding left out; CJK characters unspaced)."""
        text = ""
        for token in np.asarray(tokens).reshape(-1).tolist():
            if token in (self.start_id, self.end_id, self.pad_id):
                continue
            piece = self.decoder.get(token, "[UNK]")
            if piece.startswith("##"):
                text += piece[2:]
            elif text and not (_is_cjk(piece[0]) or _is_cjk(text[-1])):
                text += " " + piece
            else:
                text += piece
        return text


# ---------------------------------------------------------------- shared


def _padded(ids, length, pad_id):
    tokens = np.full(length, pad_id, np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(length, np.bool_)
    mask[: len(ids)] = True
    return tokens, mask


def _framed(tokenizer, prompt):
    """(tokens, mask) of one prompt, with a UserWarning when the context cuts it (as ByteTokenizer warns)."""
    ids = tokenizer.encode(prompt)
    room = tokenizer.context_length - 2
    if len(ids) > room:
        warnings.warn(f"prompt {prompt!r} is {len(ids)} tokens, more than the {room} that the text context of "
                      f"{tokenizer.context_length} holds besides its start and end tokens; kept the first {room}: "
                      f"{tokenizer.decode(ids[:room])!r}", UserWarning, stacklevel=3)
    return tokenizer.frame(ids)


def _batch(tokenizer, prompts):
    if isinstance(prompts, str):
        prompts = [prompts]
    pairs = [_framed(tokenizer, p) for p in prompts]
    return np.stack([t for t, _ in pairs]), np.stack([m for _, m in pairs])


def tokenizer_for_layout(layout, vocab, merges=None):
    """The tokenizer a checkpoint layout (:data:`mind_diffusion.clip_names.LAYOUTS`) was trained with:
    ``hf_clip`` (SD v1: transformers' CLIP BPE, padded with ``<|endoftext|>``), ``open_clip`` (SD v2:
    OpenCLIP's, padded with 0), ``wukong`` (BERT-Chinese WordPiece)."""
    if layout == "wukong":
        return WordPieceTokenizer(vocab)
    if layout == "hf_clip":
        return CLIPTokenizer.from_files(vocab, merges, pad_token_id=None, html_unescapes=0)
    if layout == "open_clip":
        return CLIPTokenizer.from_files(vocab, merges, pad_token_id=0)
    raise ValueError(f"no tokenizer for text-encoder layout {layout!r}")
