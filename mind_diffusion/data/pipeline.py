"""The training data pipeline: an endless, sharded, resumable stream of fixed-size batches.

Sample order. Rank ``r`` of ``w`` workers reads its own stream of samples
``s = 0, 1, 2, ...``. Epoch ``e`` shuffles all ``n`` items with a permutation
drawn from ``(seed, e)`` — the same on every rank — and gives rank ``r`` the
slice ``[r·k, (r+1)·k)`` with ``k = n // w``; so within an epoch the shards are
disjoint and equally long (the ``n mod w`` items left over rotate with the
permutation, so every item is seen over the epochs). Batch ``b`` of a rank is
samples ``[b·B, (b+1)·B)``: batches never straddle a gap, every batch is full,
and a run resumed at step ``t`` starts at sample ``t·B`` with no need to replay.
Random flips and caption dropout are drawn from ``(seed, epoch, item)``, so
they too are the same whichever worker decodes the item and whenever.

Training randomness. With ``noise_shape`` the stream also carries the
diffusion's draws for each sample: ``u`` (the uniform draw that picks t) and
``noise`` (ε), from a generator keyed by ``(seed, rank, sample)`` alone
(:func:`sample_randomness`). They are columns like the images, so the train
step needs no host arrays of its own, a resumed run draws exactly what the
uninterrupted run drew, and the whole input can sink to the device.

MindSpore. A run reads ONE ``mindspore.dataset.GeneratorDataset`` over a
random-access source, fed by a sampler that lists this run's sample numbers,
decoded by ``data.num_workers`` threads (or processes with
``data.python_multiprocessing``), and batched with ``drop_remainder``; the
same dataset feeds the host loop (CPU) or ``ms.data_sink`` (Ascend). MindSpore
holds the list of sample ids in memory (8 bytes each: 64 MB for a million
steps of 8 images); a stream without an end step (benches, previews) chains
datasets of ``CHUNK_BATCHES`` batches instead.
MindSpore's own ``num_shards``/``shard_id`` sharding reshuffles from an
internal seed each epoch and can only resume by replaying; the arithmetic
above gives the same disjoint per-rank shards and resumes exactly.

MindRecord shards (``data.kind mindrecord``) are streamed instead:
:class:`mind_diffusion.data.mindrecord.RecordStream` reads this rank's share
with ``MindDataset(num_shards, shard_id)`` in a window shuffle keyed by
(seed, epoch, window), and the rows are built by the same code (flips and
caption dropout keyed by the record's id, ``u``/``noise`` by the sample
number), so a resumed run again reads exactly what an uninterrupted one reads.

Unreadable images (missing, truncated, not an image) never stop a run: the
item is skipped and the next item (``i+1``, ``i+2``, ...) takes its place so
the batch stays full. Skips are counted and logged with the first few paths.
"""
import functools
import itertools
import logging

import mindspore.dataset as ds
import numpy as np

from mind_diffusion.data import captions, demo, emoji, fashion_mnist, folder, grayscale28, latents, mnist, transforms

logger = logging.getLogger("mind_diffusion.data")

REPORTED_PATHS = 5         # unreadable paths named in the log line
CHUNK_BATCHES = 64         # batches per dataset of an endless stream (MindSpore materialises the sample ids)


class _ImageItems:
    """Items decoded from files: ``load(i)`` → (uint8 HWC image with ``channels``, caption or None, label)."""

    def __init__(self, paths, texts, labels, image_size, channels=3):
        self.paths, self.texts, self.labels, self.image_size = paths, texts, labels, image_size
        self.channels = channels

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        image = transforms.center_crop_arr(transforms.load_image(self.paths[index], self.channels), self.image_size)
        text = self.texts[index] if self.texts is not None else None
        return image, text, self.labels[index]


class _DemoItems:
    """Items of the procedural demo set; they never fail to load."""

    def __init__(self, size, image_size, seed, background_share):
        self.demo = demo.DemoSet(size, image_size, seed, background_share)
        self.paths = [f"<demo item {i}>" for i in range(size)]

    def __len__(self):
        return len(self.demo)

    def load(self, index):
        image, caption, attributes = self.demo[index]
        return image, caption, demo.class_label(attributes["shape"], attributes["color"])


def _items_for(data_cfg, channels=3):
    """The item list of a data config (images with ``channels``), with early, explicit failures for bad sources."""
    if data_cfg.kind == "demo":
        if channels != 3:
            raise ValueError(f"data.kind 'demo' draws RGB images; it cannot feed model.in_channels={channels}")
        return _DemoItems(data_cfg.demo_size, data_cfg.image_size, data_cfg.demo_seed, data_cfg.demo_background_share)
    if data_cfg.kind == "mnist":
        grayscale28.check_model_shape(data_cfg.kind, channels, data_cfg.image_size)
        return grayscale28.ArrayItems(*mnist.load_mnist("train", data_cfg.path), "mnist train")
    if data_cfg.kind == "fashion_mnist":
        grayscale28.check_model_shape(data_cfg.kind, channels, data_cfg.image_size)
        return fashion_mnist.items("train", data_cfg.path)
    if data_cfg.kind == "emoji":
        return emoji.EmojiItems(data_cfg.image_size, data_cfg.path, channels=channels)
    if data_cfg.kind == "latents":  # an arch latent recipe's posteriors, precomputed (mind_diffusion.data.latents)
        return latents.LatentItems(data_cfg.path)
    if data_cfg.kind == "folder":
        image_folder = folder.ImageFolder(data_cfg.path, class_cond=data_cfg.class_cond)
        return _ImageItems(image_folder.paths, None, image_folder.labels, data_cfg.image_size, channels)
    pairs = captions.read_captions(data_cfg.path)
    paths, texts = [p for p, _ in pairs], [t for _, t in pairs]
    return _ImageItems(paths, texts, [0] * len(paths), data_cfg.image_size, channels)


def sample_randomness(seed, rank, sample, shape):
    """The diffusion's draws for one training sample: (u ∈ [0, 1) picking t, ε ~ N(0, I) of ``shape``).

    Counter-based: a function of (seed, rank, sample number) alone, whichever
    worker computes it and whenever, so resumed and uninterrupted runs agree and
    ranks draw independently.
    """
    rng = np.random.default_rng([seed, rank, sample, 0x6E6F6973])  # "nois"
    u = np.array(rng.random(dtype=np.float32), np.float32)
    return u, rng.standard_normal(tuple(shape), dtype=np.float32)


class _RowBuilder:
    """Turns a decoded item into the row of columns of one rank sample (flips, caption dropout, u, ε, …).

    ``flip`` and ``to_input`` mirror an item's image and make it the model's input: a uint8 HWC image's
    by default; a source whose items are not pixels (precomputed latents) brings its own.
    """

    flip = staticmethod(transforms.horizontal_flip)
    to_input = staticmethod(transforms.to_model_input)

    def __init__(self, seed, rank, world_size, random_flip, caption_dropout,
                 tokenizer, with_labels, noise_shape=None, low_res_size=None):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.random_flip, self.caption_dropout = random_flip, caption_dropout
        self.tokenizer, self.with_labels = tokenizer, with_labels
        self.noise_shape, self.low_res_size = noise_shape, low_res_size

    def row(self, sample, epoch, image, text, label, index, skipped=0, draw_key=None):
        """The columns of rank sample ``sample``: item ``index`` (of ``epoch``) decoded to ``image`` (uint8 HWC).

        The flip and caption-dropout draws are keyed by (seed, epoch, ``draw_key``), the item the sample
        asked for (default ``index``; an unreadable item's replacement keeps the draws of the item it replaces).
        """
        key = index if draw_key is None else draw_key
        flip_draw, drop_draw = np.random.default_rng([self.seed, epoch, key]).random(2)
        if self.random_flip and flip_draw < 0.5:
            image = self.flip(image)
        # 0-d arrays, not NumPy scalars: MindSpore wraps rows with np.array(copy=False),
        # which NumPy 2 refuses for scalars.
        row = [self.to_input(image), np.array(index, np.int32),
               np.array(skipped, np.int32)]
        if self.noise_shape is not None:
            row += sample_randomness(self.seed, self.rank, sample, self.noise_shape)
        if self.low_res_size:
            row.append(transforms.box_downsample(row[0], self.low_res_size))
        if self.with_labels:
            row.append(np.array(label, np.int32))
        if self.tokenizer is not None:
            tokens, mask = self.tokenizer("" if drop_draw < self.caption_dropout else text)
            # reshape: tokenizers that batch (e.g. models.text.ByteTokenizer) return [1, L]
            row += [np.asarray(tokens, dtype=np.int32).reshape(-1),
                    np.asarray(mask, dtype=np.bool_).reshape(-1)]
        return tuple(row)


class _SampleSource(_RowBuilder):
    """Random-access source for GeneratorDataset: sample number → one row of columns."""

    def __init__(self, items, **kwargs):
        super().__init__(**kwargs)
        self.items = items
        self.per_shard = len(items) // self.world_size
        if isinstance(items, latents.LatentItems):
            self.flip, self.to_input = items.flip, items.to_input

    def __len__(self):
        return len(self.items)

    @functools.lru_cache(maxsize=4)
    def _permutation(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def item_of(self, sample):
        """(epoch, item index) of this rank's sample number ``sample``."""
        epoch, position = divmod(sample, self.per_shard)
        return epoch, int(self._permutation(epoch)[self.rank * self.per_shard + position])

    def _load_readable(self, index):
        """Load item ``index`` or, if unreadable, the next readable one.

        :return: ((image, text, label), index loaded, number of items skipped).
        """
        for skipped in range(len(self.items)):
            loaded = (index + skipped) % len(self.items)
            try:
                return self.items.load(loaded), loaded, skipped
            except transforms.UnreadableImage as err:
                logger.debug("unreadable image: %s", err)
        raise RuntimeError(f"none of the {len(self.items)} images could be read "
                           f"(e.g. {self.items.paths[index]!r}); check data.path")

    def __getitem__(self, sample):
        epoch, index = self.item_of(int(sample))
        (image, text, label), loaded, skipped = self._load_readable(index)
        return self.row(int(sample), epoch, image, text, label, loaded, skipped, draw_key=index)

    def dataset(self, columns, first, count, num_workers, python_multiprocessing):
        """The GeneratorDataset of rank samples [first, first + count)."""
        return ds.GeneratorDataset(self, column_names=columns, sampler=_SpanSampler(first, count),
                                   num_parallel_workers=num_workers,
                                   python_multiprocessing=python_multiprocessing)

    def path_of(self, index):
        return self.items.paths[index % len(self.items)]


class _RecordSource(_RowBuilder):
    """A streamed source for GeneratorDataset: MindRecord shards read by :class:`mindrecord.RecordStream`.

    Rows are built exactly as for random-access items (flips and caption dropout keyed by the record's
    ``id``); MindRecord conversions hold only readable images, so nothing is skipped.
    """

    def __init__(self, stream, **kwargs):
        super().__init__(rank=stream.rank, world_size=stream.world_size, **kwargs)
        self.stream = stream
        self.per_shard = stream.per_rank

    def __len__(self):
        return self.stream.meta["count"]

    def path_of(self, index):
        return f"<mindrecord id {index}>"

    def rows(self, first, count):
        records = self.stream.records(first)
        for sample, (epoch, (image, text, label, record_id)) in zip(range(first, first + count), records):
            yield self.row(sample, epoch, image, text, label, record_id)

    def dataset(self, columns, first, count, num_workers, python_multiprocessing):
        # One worker: a stream has one reading position (decoding is far faster than a train step).
        return ds.GeneratorDataset(_Rows(self, first, count), column_names=columns, num_parallel_workers=1)


class _Rows:
    """Iterable of ``source.rows(first, count)``, restartable, for GeneratorDataset."""

    def __init__(self, source, first, count):
        self.source, self.first, self.count = source, first, count

    def __iter__(self):
        return self.source.rows(self.first, self.count)


class _SpanSampler:
    """Sample numbers [first, first + count) for GeneratorDataset.

    A plain Python sampler rather than a list: MindSpore checks list indices
    against ``len(source)``, while sample numbers run past it (they count
    across epochs and ``_SampleSource`` maps them back to items).
    """

    def __init__(self, first, count):
        self.first, self.count = first, count

    def __len__(self):
        return self.count

    def __iter__(self):
        return iter(range(self.first, self.first + self.count))


class BatchStream:
    """The iterator of batch dicts of one rank for one run (see the module docstring).

    Each batch holds ``images`` float32 [B, C, H, W] in [-1, 1], ``index``
    int32 [B] (ids of the items loaded, for checks), ``u`` float32 [B] and
    ``noise`` float32 [B, C, H, W] with a ``noise_shape``, ``low_res`` (the
    images box-downsampled) with a ``low_res_size``, ``labels`` int32 [B] when
    ``data.class_cond``, and ``tokens`` int32 [B, L] / ``mask`` bool [B, L] when
    a tokenizer was given. It ends after batch ``end_step`` (never without one).
    """

    def __init__(self, source, batch_size, start_step, num_workers, python_multiprocessing, end_step=None):
        self.source, self.batch_size = source, batch_size
        self.start_step, self.end_step = start_step, end_step
        self.num_workers, self.python_multiprocessing = num_workers, python_multiprocessing
        self.columns = ["images", "index", "skipped"]
        if source.noise_shape is not None:
            self.columns += ["u", "noise"]
        if source.low_res_size:
            self.columns.append("low_res")
        if source.with_labels:
            self.columns.append("labels")
        if source.tokenizer is not None:
            self.columns += ["tokens", "mask"]
        self.skipped_paths = []
        self._next_report = 1

    def dataset(self, first_step=None, num_steps=None):
        """The batched GeneratorDataset of batches [first_step, first_step + num_steps) of this rank
        (default: this run's, from start_step to end_step)."""
        first_step = self.start_step if first_step is None else first_step
        if num_steps is None:
            if self.end_step is None:
                raise ValueError("a stream without end_step has no single dataset; iterate it instead")
            num_steps = self.end_step - first_step
        dataset = self.source.dataset(self.columns, first_step * self.batch_size, num_steps * self.batch_size,
                                      self.num_workers, self.python_multiprocessing)
        return dataset.batch(self.batch_size, drop_remainder=True)

    def __iter__(self):
        if self.end_step is not None:
            datasets = [self.dataset()]
        else:
            datasets = (self.dataset(first, CHUNK_BATCHES) for first in
                        itertools.count(self.start_step, CHUNK_BATCHES))
        for dataset in datasets:
            for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
                self._note_skips(batch.pop("skipped"), batch["index"])
                yield batch

    def _note_skips(self, skipped, indices):
        """Record the unreadable items passed over for this batch and log as counts grow."""
        for index, passed_over in zip(indices, skipped):
            for step in range(int(passed_over)):
                path = self.source.path_of(int(index) - int(passed_over) + step)
                if path not in self.skipped_paths:
                    self.skipped_paths.append(path)
        if len(self.skipped_paths) >= self._next_report:
            logger.warning("skipped %d unreadable image(s) so far, each replaced by the next "
                           "readable one; first: %s", len(self.skipped_paths),
                           ", ".join(self.skipped_paths[:REPORTED_PATHS]))
            self._next_report = len(self.skipped_paths) * 10


def create_dataset(data_cfg, batch_size, rank=0, world_size=1, tokenizer=None, seed=0,
                   start_step=0, end_step=None, noise_shape=None, low_res_size=None, channels=3):
    """Build the endless batch stream of one rank.

    :param data_cfg: the ``data`` section of a :class:`mind_diffusion.config.Config`.
    :param batch_size: images per batch on this rank.
    :param rank, world_size: this worker and the number of workers (data parallel).
    :param tokenizer: callable text → (ids int32 [L], mask bool [L]) (or [1, L]); with it the
        batches carry ``tokens``/``mask`` and ``data.caption_dropout`` applies.
    :param seed: seeds the order, flips and caption dropout (same on all ranks).
    :param start_step: batches already consumed (resume): the stream starts at
        batch ``start_step``, exactly where an uninterrupted run would be.
    :param end_step: the stream ends before this batch (None: endless).
    :param noise_shape: (C, H, W): add the diffusion's ``u`` and ``noise`` columns.
    :param low_res_size: add ``low_res``, the images box-downsampled to this size (upsamplers).
    :param channels: the model's image channels: 1 loads grayscale, 3 RGB (transparency over white).
    :raises FileNotFoundError, ValueError: missing/empty folder or caption file,
        a tokenizer for a source without captions, fewer items than one batch per rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    row_settings = dict(seed=seed, random_flip=data_cfg.random_flip, caption_dropout=data_cfg.caption_dropout,
                        tokenizer=tokenizer, with_labels=data_cfg.class_cond, noise_shape=noise_shape,
                        low_res_size=low_res_size)
    if data_cfg.kind == "mindrecord":
        from mind_diffusion.data import mindrecord  # here: `python -m mind_diffusion.data.mindrecord` runs it as main
        records = mindrecord.RecordStream(data_cfg.path, data_cfg.image_size, channels, rank, world_size, seed)
        if tokenizer is not None and not records.has_captions:
            raise ValueError(f"the MindRecord set {data_cfg.path!r} holds labels, no captions to tokenize; convert "
                             "a caption file for a text-conditioned model")
        source, count = _RecordSource(records, **row_settings), records.meta["count"]
        per_shard = records.per_rank
    else:
        items = _items_for(data_cfg, channels)
        uncaptioned = data_cfg.kind in ("folder", "mnist", "fashion_mnist") or (
            data_cfg.kind == "latents" and items.texts is None)  # a set encoded from images without captions
        if tokenizer is not None and uncaptioned:
            raise ValueError(f"data.kind {data_cfg.kind!r} has no captions to tokenize; "
                             "use data.kind 'captions' or 'demo' for a text-conditioned model")
        source = _SampleSource(items, rank=rank, world_size=world_size, **row_settings)
        count, per_shard = len(items), source.per_shard
    if per_shard < batch_size:
        raise ValueError(f"{count} items give each of {world_size} workers {per_shard}, "
                         f"fewer than one batch of {batch_size}; add data or lower "
                         "train.batch_size")
    return BatchStream(source, batch_size, start_step, data_cfg.num_workers,
                       data_cfg.python_multiprocessing, end_step=end_step)


def preview_items(data_cfg, count, channels=3):
    """The first ``count`` readable items of a data source, unshuffled, for sample grids.

    :return: (images float32 [n, 3, S, S] in [-1, 1], captions (list of str or None), labels [n]);
        n < ``count`` only when the source has fewer readable items.
    """
    if data_cfg.kind == "latents":
        raise ValueError("data.kind 'latents' holds encoded latents, no images to preview")
    if data_cfg.kind == "mindrecord":
        from mind_diffusion.data import mindrecord
        loaded = mindrecord.RecordStream(data_cfg.path, data_cfg.image_size, channels).head(count)
    else:
        loaded = _readable(_items_for(data_cfg, channels))
    images, texts, labels = [], [], []
    for image, text, label, *_ in itertools.islice(loaded, count):
        images.append(transforms.to_model_input(image))
        texts.append(text)
        labels.append(label)
    if not images:
        raise RuntimeError(f"no image of data.kind {data_cfg.kind!r} could be read; check data.path")
    return np.stack(images), texts, np.asarray(labels, np.int32)


def _readable(items):
    """(image, text, label) of the readable items, in order."""
    for index in range(len(items)):
        try:
            yield items.load(index)
        except transforms.UnreadableImage:
            continue
