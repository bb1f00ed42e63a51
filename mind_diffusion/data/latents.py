"""Precomputed latents: a latent recipe's images encoded once by its frozen autoencoder.

    python -m mind_diffusion.cli.encode_latents CONFIG OUT_DIR [--set KEY=VALUE ...] [--batch 64] [--overwrite]

then train with ``--set data.kind=latents --set data.path=OUT_DIR``.

Why. Latent diffusion trains its UNet on z_0 = s·z, z ~ q(z | x) = N(μ(x), σ²(x)), the posterior of a
frozen encoder (Rombach et al. 2022, Sec. 3 and 4). μ and log σ² of an image never change during a run,
so they are computed here once per image instead of in every step; the train step then only draws
z = μ + σ·n (:meth:`models.latent_diffusion.LatentDiffusion.latents_of_moments`). The scale factor s is
applied in the step, so a run may change ``model.scale_factor`` without encoding again.

What is written (OUT_DIR):

- ``moments.npy``: float32 [N, 2C, h, w], μ then log σ² (clamped as the encoder clamps it) of every
  readable image of the recipe's ``data`` source, in item order;
- ``moments_flipped.npy`` when the recipe has ``data.random_flip``: the same for the mirrored images, so a
  run flips exactly as it would with pixels (the flip draw picks which array is read);
- ``captions.json`` (the items' captions, when the source has them) and ``labels.npy`` int32 [N];
- ``meta.json``, written last: the count, the latent shape, the source, the images skipped as unreadable,
  the SHA-1 of the autoencoder's weights, which a run checks against its own frozen autoencoder, and
  ``z_rms``, the RMS of the draws z = μ + σ·n of the unmirrored set, √(mean(μ²) + mean(σ²)): a
  ``model.scale_factor`` of 1 / z_rms gives the diffusion model unit-variance latents (SD's 0.18215).

The arrays are read memory-mapped, so a set larger than memory trains from disk. The files are written
into a hidden folder beside OUT_DIR and moved into it only when complete, so an interrupted encoding never
looks finished; an OUT_DIR that exists is refused unless ``--overwrite``.
"""
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from . import transforms

__all__ = ["FORMAT", "META_FILE", "LatentItems", "autoencoder_digest", "check_matches", "encode", "read_meta"]

FORMAT = "mind_diffusion.latents"
VERSION = 1
META_FILE = "meta.json"
REPORTED_SKIPS = 5


def autoencoder_digest(vae):
    """SHA-1 of an autoencoder's weights (names and float32 bytes, in name order): which encoder made a set."""
    digest = hashlib.sha1()
    for name, param in sorted(vae.parameters_and_names(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(param.asnumpy(), dtype=np.float32).tobytes())
    return digest.hexdigest()


class _Posterior:
    """The encoder's (μ, log σ²) of a batch as one compiled graph of a fixed batch size."""

    def __init__(self, vae, batch_size):
        from mindspore import nn, ops

        class Moments(nn.Cell):
            def __init__(self, autoencoder):
                super().__init__(auto_prefix=False)
                self.autoencoder = autoencoder

            def construct(self, x):
                mean, logvar = self.autoencoder.posterior(x)
                return ops.concat((mean, logvar), axis=1)

        self.cell, self.batch_size = Moments(vae), batch_size

    def __call__(self, images):
        """Moments of ``images`` float32 [n ≤ batch, 3, H, W]; a short batch is padded (static shapes)."""
        import mindspore as ms
        n = len(images)
        if n < self.batch_size:
            images = np.concatenate([images, np.repeat(images[-1:], self.batch_size - n, axis=0)])
        return self.cell(ms.Tensor(images)).asnumpy()[:n]


def encode(config, out_dir, vae, batch_size=64, overwrite=False, progress=True):
    """Encode the readable images of ``config.data`` (an ``arch: latent`` recipe) into OUT_DIR.

    :param vae: the recipe's frozen autoencoder (``build_model(config.model)[0].vae``).
    :return: the meta dict written to ``meta.json``.
    :raises FileExistsError: OUT_DIR exists and ``overwrite`` is false.
    :raises ValueError: the source cannot be encoded (no readable image, a streamed source).
    """
    from tqdm import tqdm

    from .pipeline import _items_for

    data = config.data
    if data.kind in ("latents", "mindrecord"):
        raise ValueError(f"data.kind {data.kind!r} cannot be encoded here: encode the images it came from "
                         "(a caption file, an image folder, demo or emoji)")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new folder or pass --overwrite to replace it")
    items = _items_for(data, 3)
    flips = (False, True) if data.random_flip else (False,)
    posterior = _Posterior(vae, batch_size)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        arrays, captions, labels, skipped = None, [], [], []
        square_sum = np.zeros(2)  # Σ (μ² + σ²) over the unmirrored latents' elements, and their count
        batch, count = [], 0
        bar = tqdm(total=len(items), desc="encode latents", unit="image", disable=not progress, dynamic_ncols=True)

        def flush():
            nonlocal arrays, square_sum
            for flip in flips:
                pixels = np.stack([transforms.to_model_input(transforms.horizontal_flip(b) if flip else b)
                                   for b in batch])
                moments = posterior(pixels)
                if arrays is None:  # the shapes are known at the first batch: map the output files
                    arrays = {f: np.lib.format.open_memmap(
                        os.path.join(staging, _array_file(f)), mode="w+", dtype=np.float32,
                        shape=(len(items), *moments.shape[1:])) for f in flips}
                arrays[flip][count:count + len(batch)] = moments
                if not flip:
                    mean, logvar = np.split(moments.astype(np.float64), 2, axis=1)
                    square_sum += (np.square(mean).sum() + np.exp(logvar).sum(), mean.size)
            batch.clear()

        for index in range(len(items)):
            try:
                image, text, label = items.load(index)
            except transforms.UnreadableImage as err:
                skipped.append(f"{items.paths[index]} ({err})")
                bar.update(1)
                continue
            batch.append(image)
            captions.append(text)
            labels.append(int(label))
            if len(batch) == batch_size:
                flush()
                count += batch_size
            bar.update(1)
        if batch:
            n = len(batch)
            flush()
            count += n
        bar.close()
        if count == 0:
            raise ValueError(f"none of the {len(items)} images of data.kind {data.kind!r} could be read; "
                             "check data.path")
        shape = arrays[False].shape
        for array in arrays.values():
            array.flush()
        arrays = None  # unmapped before the files are cut to the readable count
        if count < shape[0]:  # drop the rows reserved for the skipped images
            for flip in flips:
                name = os.path.join(staging, _array_file(flip))
                np.save(name + ".cut.npy", np.load(name, mmap_mode="r")[:count])
                os.replace(name + ".cut.npy", name)
        np.save(os.path.join(staging, "labels.npy"), np.asarray(labels, np.int32))
        has_captions = any(text is not None for text in captions)
        if has_captions:
            with open(os.path.join(staging, "captions.json"), "w", encoding="utf-8") as f:
                json.dump(captions, f, ensure_ascii=False)
        meta = dict(format=FORMAT, version=VERSION, count=count, latent_shape=list(shape[1:]),
                    image_size=data.image_size, flipped=bool(data.random_flip), captions=has_captions,
                    autoencoder=autoencoder_digest(vae), source=dict(kind=data.kind, path=data.path),
                    skipped=len(skipped), skipped_first=skipped[:REPORTED_SKIPS],
                    z_rms=float(np.sqrt(square_sum[0] / square_sum[1])))
        _write_json(os.path.join(staging, META_FILE), meta)
        if os.path.exists(out_dir):  # --overwrite: the old set goes only once the new one is complete
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
        return meta
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def _array_file(flipped):
    return "moments_flipped.npy" if flipped else "moments.npy"


def _write_json(path, value):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


def read_meta(path):
    """The ``meta.json`` of a latent set, or a clear error when it is missing or not one."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"data.path {path!r} holds no {META_FILE}: it is not a finished latent set; "
                                "write one with python -m mind_diffusion.cli.encode_latents CONFIG OUT_DIR")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path} is not a {FORMAT} v{VERSION} set (found {meta.get('format')!r} "
                         f"v{meta.get('version')!r}); encode it again")
    return meta


def check_matches(path, vae, latent_shape, random_flip):
    """Refuse a latent set that the run's model or data settings cannot use, naming what differs.

    :param latent_shape: (2C, h, w) of the run's posterior.
    """
    meta = read_meta(path)
    if tuple(meta["latent_shape"]) != tuple(latent_shape):
        raise ValueError(f"data.path {path!r} holds latents of shape {tuple(meta['latent_shape'])} (μ and log σ²), "
                         f"but this model's are {tuple(latent_shape)}: model.latent_channels, model.image_size or "
                         "the autoencoder's levels differ from the recipe it was encoded with; encode it again")
    if meta["autoencoder"] != autoencoder_digest(vae):
        raise ValueError(f"data.path {path!r} was encoded by another autoencoder than this run's "
                         "(model.autoencoder_from); encode it again with this recipe")
    if random_flip and not meta["flipped"]:
        raise ValueError(f"data.random_flip is set but {path!r} holds no mirrored latents; set "
                         "data.random_flip=false or encode the set with data.random_flip=true")
    return meta


class LatentItems:
    """The items of a latent set for the training pipeline: ``load(i) -> ((i, False), caption, label)``.

    An item's "image" is the pair (index, mirrored); :meth:`flip` mirrors it and :meth:`to_input` reads its
    moments (float32 [2C, h, w]) from the memory-mapped arrays, so the pipeline's flip draw picks the array.
    """

    def __init__(self, path):
        self.meta = read_meta(path)
        self.moments = {False: np.load(os.path.join(path, _array_file(False)), mmap_mode="r")}
        if self.meta["flipped"]:
            self.moments[True] = np.load(os.path.join(path, _array_file(True)), mmap_mode="r")
        self.labels = np.load(os.path.join(path, "labels.npy"))
        self.texts = None
        if self.meta["captions"]:
            with open(os.path.join(path, "captions.json"), encoding="utf-8") as f:
                self.texts = json.load(f)
        self.paths = [f"<latent {i} of {path}>" for i in range(self.meta["count"])]

    def __len__(self):
        return self.meta["count"]

    def load(self, index):
        text = self.texts[index] if self.texts is not None else None
        return (index, False), text, int(self.labels[index])

    @staticmethod
    def flip(image):
        index, mirrored = image
        return index, not mirrored

    def to_input(self, image):
        index, mirrored = image
        if mirrored and True not in self.moments:
            raise ValueError("this latent set holds no mirrored latents (encoded without data.random_flip)")
        return np.array(self.moments[mirrored][index], np.float32)
