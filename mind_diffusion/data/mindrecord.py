"""MindRecord shards of encoded images with captions or labels: the converter and the reader.

    python -m mind_diffusion.data.mindrecord IN.jsonl|IN.csv|FOLDER OUT_DIR --shards N

Writing. The input is a caption file (JSONL/CSV, read by :mod:`.captions`: each
image gets its caption, label 0) or an image folder (each image gets the label
of its first-level sub-folder, as ``data.kind folder`` gives them; every label is
0 when images lie loose in the folder). Each image's file bytes are stored as
they are (no re-encoding), after a full decode has shown they are an image;
files that cannot be read or decoded are skipped and counted by reason, never
fatal. Records are written in an order shuffled by ``--seed`` (so a shard or a
window of the stream is not one class), each carrying ``id``, its position in
the input, and ``source``, the file it came from.

Completeness. ``mindspore.mindrecord.FileWriter`` writes ``N`` shard files
(``data.mindrecord0`` … and their ``.db`` indexes) into a hidden folder next to
OUT_DIR; after its commit the files are moved into OUT_DIR and ``meta.json`` is
written last, atomically. The reader requires ``meta.json`` (it names the shards
and their record count), so an interrupted conversion never leaves shards that
look complete. An OUT_DIR that already holds shards is refused unless
``--overwrite``.

Reading (``data.kind mindrecord``, :class:`RecordStream`). Rank ``r`` of ``w``
reads ``mindspore.dataset.MindDataset(shards, num_shards=w, shard_id=r)``:
records r, r + w, r + 2w, … — disjoint across ranks and covering every record
when w divides the count (otherwise MindSpore pads the last round with records
from the start, so each rank reads ⌈n/w⌉). Each rank's epoch is read in windows
of ``SHUFFLE_WINDOW`` records, each window permuted by a generator keyed by
(seed, epoch, window): a streaming shuffle whose order is a function of the
sample number alone. So rank sample ``s`` lies in epoch ``s // L`` (L records a
rank), and a run resumed at step ``t`` starts reading at the window holding
sample ``t·B`` (``MindDataset.skip`` — reading, not decoding, the records
before it) and drops the window's first samples: exactly the samples an
uninterrupted run reads.
"""
import argparse
import collections
import io
import itertools
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from . import captions, folder, transforms

__all__ = ["FORMAT", "META_FILE", "SHUFFLE_WINDOW", "convert", "read_meta", "shard_files", "RecordStream"]

FORMAT = "mind_diffusion.mindrecord"
VERSION = 1
META_FILE = "meta.json"
SHARD_NAME = "data.mindrecord"       # FileWriter appends the shard number
SHUFFLE_WINDOW = 4096                # records permuted together while streaming
WRITE_BATCH = 256                    # records per FileWriter.write_raw_data call
REPORTED_SKIPS = 5                   # unreadable files named per reason in the summary
SCHEMA = {"image": {"type": "bytes"}, "caption": {"type": "string"}, "label": {"type": "int32"},
          "id": {"type": "int64"}, "source": {"type": "string"}}
COLUMNS = ("image", "caption", "label", "id")


class IncompleteShards(ValueError):
    """A MindRecord folder without the ``meta.json`` written after a conversion completes."""


# ---------------------------------------------------------------------------------------------- writing

def _input_records(source):
    """(records [(path, caption, label)], has_captions, class_names) of a caption file or an image folder."""
    if os.path.isdir(source):
        image_folder = folder.ImageFolder(source)
        try:
            image_folder = folder.ImageFolder(source, class_cond=True)
        except ValueError:
            pass  # images directly in the folder: no classes, every label 0
        records = [(path, "", label) for path, label in zip(image_folder.paths, image_folder.labels)]
        return records, False, image_folder.class_names
    if os.path.isfile(source):
        return [(path, text, 0) for path, text in captions.read_captions(source)], True, []
    raise FileNotFoundError(f"input {source!r} does not exist; give a .jsonl/.csv caption file or an image folder")


def _encoded_image(path):
    """The file bytes of ``path`` once a full decode shows they are an image.

    :raises transforms.UnreadableImage: with the reason (missing, truncated, not an image).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise transforms.UnreadableImage(f"{path}: {err.strerror or err}") from err
    try:
        transforms.load_image(io.BytesIO(data), 3)
    except transforms.UnreadableImage as err:
        raise transforms.UnreadableImage(f"{path}: {err.__cause__}") from err.__cause__
    return data


def _reason(err):
    """A short reason of an UnreadableImage, for counting skips by kind."""
    cause = err.__cause__
    if isinstance(cause, FileNotFoundError) or "No such file" in str(err):
        return "missing file"
    if cause is not None and "truncated" in str(cause):
        return "truncated image"
    if cause is not None and "cannot identify image" in str(cause):
        return "not an image"
    return f"unreadable ({type(cause).__name__ if cause else 'error'})"


def existing_shards(out_dir):
    """Files of a previous conversion in ``out_dir`` (shards, indexes, meta.json)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(name for name in os.listdir(out_dir)
                  if name == META_FILE or name.startswith(SHARD_NAME) or ".mindrecord" in name)


def convert(source, out_dir, shards, overwrite=False, seed=0, progress=True):
    """Write the images of ``source`` with their captions or labels into ``shards`` MindRecord files.

    :return: the summary dict also stored in ``out_dir/meta.json`` (count, skipped by reason, …).
    :raises FileExistsError: ``out_dir`` holds shards already and ``overwrite`` is False.
    :raises ValueError: bad shard count, or no readable image at all.
    """
    from mindspore.mindrecord import FileWriter
    from tqdm import tqdm

    if shards < 1:
        raise ValueError(f"--shards must be at least 1, got {shards}")
    old = existing_shards(out_dir)
    if old and not overwrite:
        raise FileExistsError(f"{out_dir!r} already holds MindRecord files ({', '.join(old[:3])}"
                              f"{', …' if len(old) > 3 else ''}); pass --overwrite to replace them "
                              "or choose another OUT_DIR")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not a folder; choose another OUT_DIR")
    records, has_captions, class_names = _input_records(source)
    if len(records) < shards:
        raise ValueError(f"{len(records)} input records cannot fill {shards} shards; lower --shards")
    order = np.random.default_rng(seed).permutation(len(records))

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.partial-", dir=parent)
    try:
        writer = FileWriter(os.path.join(staging, SHARD_NAME), shard_num=shards, overwrite=True)
        writer.add_schema(SCHEMA, FORMAT)
        skipped = collections.defaultdict(list)
        written, batch = 0, []
        for position in tqdm(order, desc=f"mindrecord {os.path.basename(out_dir)}", unit="img",
                             disable=not progress, dynamic_ncols=True):
            path, text, label = records[int(position)]
            try:
                data = _encoded_image(path)
            except transforms.UnreadableImage as err:
                skipped[_reason(err)].append(path)
                continue
            batch.append({"image": data, "caption": text, "label": int(label), "id": int(position),
                          "source": path})
            if len(batch) == WRITE_BATCH:
                writer.write_raw_data(batch)
                written, batch = written + len(batch), []
        if batch:
            writer.write_raw_data(batch)
            written += len(batch)
        if written < shards:
            total = sum(len(paths) for paths in skipped.values())
            raise ValueError(f"only {written} of {len(records)} images of {source!r} could be read ({total} skipped: "
                             f"{_skip_text(skipped)}); {shards} shard(s) need at least {shards}")
        writer.commit()
        names = [f"{SHARD_NAME}{i}" for i in range(shards)] if shards > 1 else [SHARD_NAME]
        meta = {"format": FORMAT, "version": VERSION, "shards": names, "count": written,
                "captions": has_captions, "class_names": class_names, "seed": seed,
                "source": os.path.abspath(source),
                "skipped": {reason: len(paths) for reason, paths in sorted(skipped.items())},
                "skipped_examples": {reason: paths[:REPORTED_SKIPS] for reason, paths in sorted(skipped.items())}}
        _install(staging, out_dir, names, meta, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def _install(staging, out_dir, names, meta, old):
    """Move the committed shards into ``out_dir`` (old files first removed) and write meta.json last."""
    os.makedirs(out_dir, exist_ok=True)
    if META_FILE in old:  # from here on the folder no longer looks complete
        os.remove(os.path.join(out_dir, META_FILE))
    for name in old:
        if name != META_FILE:
            os.remove(os.path.join(out_dir, name))
    for name in names:
        for suffix in ("", ".db"):
            os.replace(os.path.join(staging, name + suffix), os.path.join(out_dir, name + suffix))
    temporary = os.path.join(staging, META_FILE)
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    os.replace(temporary, os.path.join(out_dir, META_FILE))


def _skip_text(skipped):
    return "; ".join(f"{reason}: {len(paths)} (e.g. {paths[0]})" for reason, paths in sorted(skipped.items())) \
        or "none"


# ---------------------------------------------------------------------------------------------- reading

def read_meta(path):
    """(folder, meta dict) of a converted set, given its folder or any of its shard files.

    :raises FileNotFoundError: nothing there. :raises IncompleteShards: shards without meta.json.
    """
    folder_path = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"MindRecord path {path!r} does not exist; set data.path to a folder written by "
                                "`python -m mind_diffusion.data.mindrecord` (or its first shard file)")
    meta_path = os.path.join(folder_path, META_FILE)
    if not os.path.isfile(meta_path):
        raise IncompleteShards(f"{folder_path!r} has no {META_FILE}: it is not a complete conversion by "
                               "`python -m mind_diffusion.data.mindrecord` (interrupted?); convert again "
                               "with --overwrite")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: not a {FORMAT} description")
    missing = [name for name in meta["shards"] if not os.path.isfile(os.path.join(folder_path, name))]
    if missing:
        raise IncompleteShards(f"{folder_path!r} lacks shard file(s) {', '.join(missing)} named in {META_FILE}; "
                               "convert again with --overwrite")
    return folder_path, meta


def shard_files(folder_path, meta):
    return [os.path.join(folder_path, name) for name in meta["shards"]]


def rank_dataset(files, rank, world_size, skip=0):
    """This rank's MindDataset (records rank, rank + w, …, in file order), its first ``skip`` records dropped."""
    import mindspore.dataset as ds
    sharding = {"num_shards": world_size, "shard_id": rank} if world_size > 1 else {}
    dataset = ds.MindDataset(files, columns_list=list(COLUMNS), shuffle=False, **sharding)
    return dataset.skip(skip) if skip else dataset


def decode(data, image_size, channels):
    """Encoded image bytes → uint8 [S, S, C] (centre-cropped and resized as for image folders)."""
    return transforms.center_crop_arr(transforms.load_image(io.BytesIO(bytes(data)), channels), image_size)


class RecordStream:
    """One rank's stream of decoded records in the shuffled order of the module docstring.

    ``records(first)`` yields (epoch, (image, caption, label, id)) for rank samples first, first + 1, …
    """

    def __init__(self, path, image_size, channels, rank=0, world_size=1, seed=0, window=None):
        self.folder, self.meta = read_meta(path)
        self.files = shard_files(self.folder, self.meta)
        self.image_size, self.channels = image_size, channels
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.window = window or SHUFFLE_WINDOW
        self.per_rank = -(-self.meta["count"] // world_size)  # MindSpore pads the last round: ⌈n/w⌉

    @property
    def has_captions(self):
        return bool(self.meta["captions"])

    def _window_order(self, epoch, window, size):
        return np.random.default_rng([self.seed, epoch, window, 0x6D726563]).permutation(size)  # "mrec"

    def _epoch(self, epoch, position):
        """Raw records of ``epoch`` from rank position ``position`` on: (columns) tuples."""
        window = position // self.window
        dataset = rank_dataset(self.files, self.rank, self.world_size, skip=window * self.window)
        rows = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
        drop = position - window * self.window
        while True:
            buffer = list(itertools.islice(rows, self.window))
            if not buffer:
                return
            for order in self._window_order(epoch, window, len(buffer)):
                if drop:
                    drop -= 1
                    continue
                yield buffer[order]
            if len(buffer) < self.window:
                return  # the iterator is spent: MindSpore raises on a further next()
            window += 1

    def records(self, first):
        """(epoch, (image uint8 HWC, caption str, label int, id int)) of rank samples first, first + 1, … (endless)."""
        epoch, position = divmod(first, self.per_rank)
        while True:
            for data, caption, label, record_id in self._epoch(epoch, position):
                caption = caption.item() if isinstance(caption, np.ndarray) else caption
                if isinstance(caption, bytes):
                    caption = caption.decode("utf-8")
                yield epoch, (decode(data, self.image_size, self.channels), str(caption), int(label), int(record_id))
            epoch, position = epoch + 1, 0

    def head(self, count):
        """The first ``count`` records in file order (previews, reference images), decoded."""
        rows = rank_dataset(self.files, 0, 1).take(count).create_tuple_iterator(num_epochs=1, output_numpy=True)
        for data, caption, label, record_id in rows:
            caption = caption.item() if isinstance(caption, np.ndarray) else caption
            yield decode(data, self.image_size, self.channels), str(caption), int(label), int(record_id)


# ---------------------------------------------------------------------------------------------- command line

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mind_diffusion.data.mindrecord",
        description="Convert images with captions (a .jsonl/.csv caption file) or class labels (an image folder, "
                    "labels from its sub-folders) into MindRecord shards for data.kind=mindrecord. Image bytes are "
                    "stored unchanged; unreadable images are skipped and counted.")
    parser.add_argument("input", help="a .jsonl or .csv caption file ({\"path\": ..., \"text\": ...}) or an image folder")
    parser.add_argument("out_dir", help="folder for the shards (data.mindrecord0 … and meta.json)")
    parser.add_argument("--shards", type=int, default=1, help="number of shard files (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the record order written (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT_DIR")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        meta = convert(args.input, args.out_dir, args.shards, overwrite=args.overwrite, seed=args.seed)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = sum(meta["skipped"].values())
    print(f"wrote {meta['count']} images with {'captions' if meta['captions'] else 'labels'} into "
          f"{len(meta['shards'])} shard(s) in {args.out_dir}; skipped {skipped}"
          + "".join(f"\n  {reason}: {count} (e.g. {', '.join(meta['skipped_examples'][reason])})"
                    for reason, count in meta["skipped"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
