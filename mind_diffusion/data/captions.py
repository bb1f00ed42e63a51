"""Image–caption pairs from a JSONL or CSV file (e.g. Wukong-style Chinese captions).

JSONL: one object per line, ``{"path": ..., "text": ...}``; the keys
``image`` and ``caption`` are accepted too. CSV: a header row naming the same
columns. Files are read as UTF-8 (a BOM, as Excel writes it, is fine).
Relative image paths are resolved against the caption file's folder.
Malformed lines (not JSON, no path or caption) are skipped, counted and
named with their line numbers in one warning; only a file with no usable
line is an error.
"""
import csv
import json
import logging
import os

logger = logging.getLogger("mind_diffusion.data")

PATH_KEYS = ("path", "image")
TEXT_KEYS = ("text", "caption")


class MalformedRecord(ValueError):
    """One line of a caption file that cannot be used; the reader skips it and counts it."""


def _pick(record, keys, where):
    for key in keys:
        if key in record and record[key] is not None:
            return str(record[key])
    raise MalformedRecord(f"{where}: no {' or '.join(repr(k) for k in keys)} field; each record "
                          "needs an image path and a caption, e.g. {\"path\": \"a.jpg\", \"text\": \"...\"}")


def _read_jsonl(path):
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield MalformedRecord(f"{path}:{number}: not valid JSON ({err})"), f"{path}:{number}"
                continue
            if not isinstance(record, dict):
                yield MalformedRecord(f"{path}:{number}: expected a JSON object, got {line.strip()[:60]!r}"), \
                    f"{path}:{number}"
                continue
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
    pairs, malformed = [], []
    for record, where in readers[extension](path):
        try:
            if isinstance(record, MalformedRecord):
                raise record
            image = _pick(record, PATH_KEYS, where)
            pairs.append((os.path.join(folder, image), _pick(record, TEXT_KEYS, where)))
        except MalformedRecord as err:
            malformed.append(str(err))
    if malformed:
        logger.warning("skipped %d malformed line(s) of %s; first: %s", len(malformed), path,
                       "; ".join(malformed[:3]))
    if not pairs:
        raise ValueError(f"caption file {path!r} holds no image-caption pairs"
                         + (f" ({len(malformed)} malformed line(s), first: {malformed[0]})" if malformed else "")
                         + "; add records like {\"path\": \"images/0001.jpg\", \"text\": \"一只猫\"}")
    return pairs
