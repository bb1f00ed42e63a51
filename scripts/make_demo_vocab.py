"""Write configs/demo_vocab.txt: a BERT-style WordPiece vocabulary (Wukong-Huahua's tokenizer format) of
the built-in demo set's captions, for the demo recipes (configs/demo.yaml, configs/ldm_demo.yaml).

Its pieces: BERT's special tokens, then every word and CJK character of the demo captions' grammar, templates
and attribute names, then a–z, 0–9 and their ``##`` continuations (so an unseen English word still splits
into known pieces). tests/test_ldm_train_recipes.py checks that the demo captions tokenize without [UNK].

    python scripts/make_demo_vocab.py [--out configs/demo_vocab.txt]
"""
import argparse
import os
import re
import string

from mind_diffusion.data import demo
from models.tokenizers import basic_tokenize

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _strings(item)


def demo_vocabulary():
    """The vocabulary's pieces, in file order."""
    pieces = list(SPECIALS)
    texts = _strings((demo.GRAMMAR, demo.TEMPLATES, demo.SHAPES, demo.BACKGROUNDS))
    for text in texts:
        for word in basic_tokenize(re.sub(r"\{[a-z_]+\}", " ", text)):
            if word not in pieces:
                pieces.append(word)
    for char in string.ascii_lowercase + string.digits:
        for piece in (char, "##" + char):
            if piece not in pieces:
                pieces.append(piece)
    return pieces


def main(argv=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(root, "configs", "demo_vocab.txt"))
    args = parser.parse_args(argv)
    pieces = demo_vocabulary()
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(pieces) + "\n")
    print(f"wrote {len(pieces)} pieces to {args.out}")


if __name__ == "__main__":
    main()
