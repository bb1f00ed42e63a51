"""Prompt normalisation: one canonical text for every layout of the same caption.

Training captions and inference prompts both pass through :func:`normalise_prompt`
(the GLIDE tokenizer, ``models.text.ByteTokenizer``, applies it; the demo set's
caption parser uses it too), so whitespace, full-width forms, CJK punctuation and
ASCII case never change what a model reads.
"""
import re
import unicodedata

# CJK punctuation that NFKC leaves alone, mapped to its ASCII counterpart.
_CJK_PUNCTUATION = str.maketrans({"。": ".", "、": ",", "“": '"', "”": '"', "‘": "'", "’": "'",
                                  "《": "<", "》": ">", "【": "[", "】": "]", "「": '"', "」": '"',
                                  "『": '"', "』": '"', "〈": "<", "〉": ">", "—": "-", "–": "-"})
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_PUNCT = ",.;:!?()\\[\\]\"'<>"
# a space with CJK on one side and CJK or punctuation on the other ("红色 的 圆", "圆形, 背景")
_SPACE_BY_CJK = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}{_PUNCT}])|(?<=[{_CJK}{_PUNCT}]) (?=[{_CJK}])")
_SPACE_BEFORE_CLOSING = re.compile(r" (?=[,.;:!?)\]])")
_SPACE_AFTER_OPENING = re.compile(r"(?<=[(\[]) ")


def _is_end_punctuation(char):
    """Sentence punctuation (. , ! ? … and the like), which adds nothing at either end of a
    prompt; brackets and quotes pair with something inside, so they stay."""
    return char == " " or (unicodedata.category(char) == "Po" and char not in "\"'")


def normalise_prompt(text):
    """The canonical form of a caption or prompt, so that layout never changes what a model reads.

    Training captions and inference prompts both pass through here (in
    :meth:`ByteTokenizer.encode`), so "  A RED circle!!" and "a red circle" are
    the same tokens:

    1. Unicode NFKC: full-width letters, digits and punctuation become their
       ASCII forms (``，`` → ``,``, ``Ａ`` → ``A``, the ideographic space → space);
       CJK punctuation NFKC keeps (``。、“”《》【】「」``) is mapped to ASCII too.
    2. ASCII letters lower-cased (other scripts are left as written).
    3. Whitespace: every run becomes one space; a space between a CJK character
       and another or punctuation, before closing punctuation and after an
       opening bracket goes.
    4. Sentence punctuation (``. , ! ? …``) and spaces at either end are
       dropped (brackets and quotes stay), unless nothing would be left (a prompt of only punctuation stays a prompt, never the
       empty, unconditional caption).
    """
    text = unicodedata.normalize("NFKC", text).translate(_CJK_PUNCTUATION).translate(_ASCII_LOWER)
    text = " ".join(text.split())
    text = _SPACE_BY_CJK.sub("", text)
    text = _SPACE_AFTER_OPENING.sub("", _SPACE_BEFORE_CLOSING.sub("", text))
    start, end = 0, len(text)
    while start < end and _is_end_punctuation(text[start]):
        start += 1
    while end > start and _is_end_punctuation(text[end - 1]):
        end -= 1
    return text[start:end] if end > start else text
