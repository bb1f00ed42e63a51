"""Image–caption pairs from a JSONL or CSV file (e.g. Wukong-style Chinese captions).

JSONL: one object per line, ``{"path": ..., "text": ...}``; the keys
``image`` and ``caption`` are accepted too. CSV: a header row naming the same
columns. Files are read as UTF-8 (a BOM, as Excel writes it, is fine).
Relative image paths are resolved against the caption file's folder.
"""
import csv
import json
import os

PATH_KEYS = ("path", "image")
TEXT_KEYS = ("text", "caption")


def _pick(record, keys, where):
    for key in keys:
        if key in record and record[key] is not None:
            return str(record[key])
    raise ValueError(f"{where}: no {' or '.join(repr(k) for k in keys)} field; each record "
                     "needs an image path and a caption, e.g. {\"path\": \"a.jpg\", \"text\": \"...\"}")


def _read_jsonl(path):
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {line.strip()[:60]!r}")
            yield record, f"{path}:{number}"


def _read_csv(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, record in enumerate(csv.DictReader(f), start=2):
            yield record, f"{path}:{number}"


def read_captions(path):
    """The (absolute image path, caption) pairs of a .jsonl or .csv caption file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path!r} does not exist; set data.path to a "
                                ".jsonl or .csv file of image paths and captions")
    extension = os.path.splitext(path)[1].lower()
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv}
    if extension not in readers:
        raise ValueError(f"caption file {path!r}: unknown format {extension!r}; use .jsonl "
                         "({\"path\": ..., \"text\": ...} per line) or .csv with a header row")
    folder = os.path.dirname(os.path.abspath(path))
    pairs = []
    for record, where in readers[extension](path):
        image = _pick(record, PATH_KEYS, where)
        pairs.append((os.path.join(folder, image), _pick(record, TEXT_KEYS, where)))
    if not pairs:
        raise ValueError(f"caption file {path!r} holds no image-caption pairs; add records "
                         "like {\"path\": \"images/0001.jpg\", \"text\": \"一只猫\"}")
    return pairs
