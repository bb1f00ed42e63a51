"""The training loop around the compiled step: data, logs, checkpoints, samples, and agreement between ranks.

Everything that varies between steps enters the compiled :class:`TrainStep`
through the data set (images, conditions, and the diffusion's u and ε, which
are a function of (seed, rank, sample) alone). On CPU the loop feeds batches
from one dataset iterator; on Ascend ``ms.data_sink`` runs ``train.log_every``
steps per call on the device. Either way the step's metrics are summed on the
device and read back once per log interval, the only sync of the loop.

With several workers, rank 0 decides where the run starts (its checkpoint),
broadcasts the whole training state to the other ranks, and every rank
compares a checksum of its state with the others' before the first step.
Only rank 0 writes; its checkpoints are written by a background thread from a
host snapshot, renamed into place when complete, and pruned to
``train.keep_checkpoints``.
"""
import hashlib
import json
import logging
import math
import os
import shutil
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoints import (checkpoint_config, checkpoint_step, latest_checkpoint, list_checkpoints, read_checkpoint,
                           restore_state)
from ..config import autoencoder_factor, config_to_dict, save_config, uses_loss_scale
from ..data import create_dataset
from ..device import graph_target
from ..kernels.dropout import seed_step
from ..resample import create_named_schedule_sampler
from .checkpoint import (CheckpointWriter, load_initial_weights, own_state, process_differences,
                         read_initial_checkpoint, training_state)
from ..data.latents import check_matches as check_latents
from .latent import AutoencoderLoss, LatentDiffusionLoss, export_config, export_path, write_export
from .step import EMA, AdamW, ClassifierLoss, DiffusionLoss, OverflowCheck, StepMetrics, TrainStep, WarmupLR, overflow_mode

logger = logging.getLogger("mind_diffusion.train")

# Batch columns → the model's keyword inputs, in the step's call order after (images, u, noise).
CONDITION_COLUMNS = {"tokens": "tokens", "mask": "mask", "y": "labels", "low_res": "low_res"}
# Stop when this many steps in a row had a non-finite loss (each such step is skipped).
MAX_NONFINITE_STREAK = 20
# An interval whose worst step loss exceeds this multiple of the reference (the median of the earlier
# intervals' mean losses, or the interval's own best step) has diverged: no checkpoint is written then.
DIVERGENCE_FACTOR = 100.0
# Files of a run folder, which a new run must not silently mix with its own.
RUN_FILES = ("ckpt_*.ckpt", "ldm_*.ckpt", "partial_*", "metrics.jsonl", "samples", "config.yaml")


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf: training cannot continue from here."""


class RunFolderInUse(RuntimeError):
    """A fresh run was pointed at a folder that holds another run."""


class MetricLog:
    """Reads the device's interval metrics (one sync), writes one JSON line, and judges the run's health.

    A run is *healthy* at a read when the interval had no non-finite step and its
    worst step loss is within :data:`DIVERGENCE_FACTOR` of the reference loss.
    """

    def __init__(self, metrics, path=None):
        self.metrics = metrics
        self.path = path
        self.interval_losses = []
        self.healthy = True

    def reset(self, streak=0.0):
        self.metrics.totals.set_data(ms.Tensor(self.metrics.initial(streak)))

    def read(self, step, extra=None):
        """The summary dict of the steps since the last read (None if there were none)."""
        totals = self.metrics.totals.asnumpy()  # the loop's one device → host sync
        self.reset(streak=totals[StepMetrics.STREAK])
        record = self.metrics.summary(totals)
        if record["steps"] == 0:
            return None
        record = {"step": int(step), **record, **(extra or {})}
        reference = (statistics.median(self.interval_losses) if self.interval_losses
                     else record.get("loss_min", math.inf))
        diverged = record["skipped_steps"] > 0 or not math.isfinite(record["loss_max"]) or (
            record["loss_max"] > DIVERGENCE_FACTOR * reference)
        self.healthy = not diverged
        if self.healthy:
            self.interval_losses.append(record["loss"])
        if self.path:  # the run folder appears with the first interval that ran (not on a failed start)
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record


class Trainer:
    """Trains ``model`` on ``diffusion`` as the config says.

    :param config: a validated :class:`mind_diffusion.config.Config`.
    :param model: the network, ``model(x_t, t, **cond)``.
    :param diffusion: the :class:`GaussianDiffusion` to train on.
    :param run_dir: folder of this run's checkpoints, logs, samples and resolved config.
    :param tokenizer: prompts → (tokens, mask), for text-conditioned models.
    :param sample_fn: ``sample_fn(ema_model_state, step, write) -> path or None``, called every
        ``train.sample_every`` steps and at the end on EVERY rank (so that no rank waits in a
        collective while rank 0 samples); only the rank with ``write`` true saves the grid.
    :param rank, world_size: data-parallel position (world_size > 1 after ``init()``).
    :param discriminator: arch autoencoder with ``train.disc_weight`` > 0: the patch discriminator of its
        adversarial term (trained by the same step, saved under ``loss.discriminator.*``).
    """

    def __init__(self, config, model, diffusion, run_dir, tokenizer=None, sample_fn=None, rank=0, world_size=1,
                 discriminator=None):
        self.config = config
        self.discriminator = discriminator
        self.model = model
        self.diffusion = diffusion
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.sample_fn = sample_fn
        self.rank, self.world_size = rank, world_size
        self.target = graph_target()
        train = config.train
        self.cond_names = self._condition_names()
        self.schedule_sampler = create_named_schedule_sampler(
            config.diffusion.schedule_sampler, diffusion.num_timesteps,
            config.diffusion.high_noise_share, config.diffusion.high_noise_steps, config.diffusion.high_noise_end)
        if train.init_from:
            # before the EMA copies are made, so that they start from these weights too
            initial = read_initial_checkpoint(train.init_from)
            fresh = load_initial_weights(model, train.init_from, train.init_exclude, checkpoint=initial)
            logger.info("weights initialised from %s (the step, the optimizer and the EMA start fresh)",
                        train.init_from)
            if fresh and rank == 0:
                print(f"train.init_from: {len(fresh)} parameters kept at their fresh initialisation "
                      f"(train.init_exclude): {', '.join(fresh)}", flush=True)
            differences = process_differences(initial, config.diffusion)
            if differences and rank == 0:
                print(f"train.init_from: {train.init_from} was trained under another diffusion process "
                      f"({'; '.join(differences)}); this run trains under the recipe's. To continue that "
                      f"model as it was trained, set these as there", flush=True)
        loss_net = self._loss(model, diffusion)
        named = [(name, p) for name, p in model.parameters_and_names() if p.requires_grad]
        # a loss's own networks (the autoencoder's discriminator) train with the same AdamW, without EMA
        critic = [(f"loss.{name}", p) for name, p in own_state(loss_net).items() if p.requires_grad]
        optimizer = AdamW(named + critic, WarmupLR(train.lr, train.warmup_steps), betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=train.weight_decay)
        ema = EMA(named, train.ema_rate) if train.ema_rate else None
        self.train_step = TrainStep(loss_net, optimizer, ema, grad_clip=train.grad_clip,
                                    loss_scale=train.loss_scale if uses_loss_scale(config) else 0.0,
                                    world_size=world_size,
                                    overflow=OverflowCheck(overflow_mode(self.target), world_size))
        self.state = training_state(model, self.train_step)
        self.noise_shape = self._noise_shape(loss_net)
        self.writer = CheckpointWriter(run_dir, train.keep_checkpoints) if self.is_writer else None

    def _loss(self, model, diffusion):
        """The objective of ``model.arch`` (see :mod:`mind_diffusion.train.step`, :mod:`.latent`)."""
        config = self.config
        arch = config.model.arch
        if arch == "classifier":  # p_φ(y | x_t, t) for classifier guidance: labels are targets
            return ClassifierLoss(model, diffusion, self.schedule_sampler, top_k=min(5, config.model.num_classes))
        if arch == "latent":  # the frozen parts are not trainable parameters: no gradient, moment or EMA
            precomputed = config.data.kind == "latents"
            if precomputed:  # the set must come from this run's frozen encoder, at this run's latent shape
                side = config.model.image_size // autoencoder_factor(config.model)
                check_latents(config.data.path, model.vae, (2 * config.model.latent_channels, side, side),
                              config.data.random_flip)
            return LatentDiffusionLoss(model, diffusion, self.schedule_sampler, config.model.latent_channels,
                                       config.train.sample_posterior, precomputed)
        if arch == "autoencoder":
            train = config.train
            if (train.disc_weight > 0) != (self.discriminator is not None):
                raise ValueError("train.disc_weight > 0 needs a discriminator (cli.factory.build_discriminator), "
                                 "and a discriminator needs train.disc_weight > 0")
            return AutoencoderLoss(model, train.kl_weight, self.discriminator, train.disc_weight, train.disc_start)
        return DiffusionLoss(model, diffusion, self.schedule_sampler, self.cond_names)

    def _noise_shape(self, loss_net):
        """(C, H, W) of the step's Gaussian input: the image's, or for latent models the latent's (for
        arch latent with a posterior draw, 2C: ε and the draw; for arch autoencoder the draw alone)."""
        model = self.config.model
        if model.arch not in ("latent", "autoencoder"):
            return (model.in_channels, model.image_size, model.image_size)
        side = model.image_size // autoencoder_factor(model)
        channels = loss_net.noise_channels() if model.arch == "latent" else model.latent_channels
        return (channels, side, side)

    def _condition_names(self):
        names = []
        if self.tokenizer is not None:
            names += ["tokens", "mask"]
        if self.config.data.class_cond:  # the model's condition, or a classifier's target
            names.append("y")
        if self.config.model.arch == "glide_upsample":
            names.append("low_res")
        return tuple(names)

    @property
    def step_columns(self):
        """The dataset columns the train step takes, in its call order."""
        return ["images", "u", "noise"] + [CONDITION_COLUMNS[name] for name in self.cond_names]

    @property
    def is_writer(self):
        return self.rank == 0

    @property
    def sinks(self):
        """Whether the steps run through ``ms.data_sink`` (Ascend and GPU; MindSpore's CPU has no sink)."""
        return self.target != "CPU"

    def ema_model_state(self, rate=None):
        """name → Parameter of the EMA copy at ``rate`` (default: the first), under the model's names."""
        ema = self.train_step.ema
        if ema is None:
            return dict(self.model.parameters_and_names())
        index = 0 if rate is None else ema.rates.index(rate)
        state = dict(self.model.parameters_and_names())
        state.update(zip(ema.names, ema.shadows[index]))
        return state

    # ---- where the run starts -------------------------------------------------------------------

    def resume(self, resume):
        """Restore from ``resume`` ("auto": this run's newest checkpoint, or a path); return the start step."""
        path = latest_checkpoint(self.run_dir) if resume == "auto" else resume
        if not path:
            return 0
        checkpoint = read_checkpoint(path)
        self._check_same_process(checkpoint_config(checkpoint), path)
        restore_state(self.state, checkpoint, path)
        step = checkpoint_step(checkpoint)
        self.resumed_from = path
        logger.info("resumed from %s at step %d%s", path, step,
                    " (its weights, optimizer and EMA replace train.init_from's)" if self.config.train.init_from else "")
        return step

    def _check_same_process(self, saved, path):
        """Refuse to resume a checkpoint whose network or diffusion settings differ from this config:
        the weights would load (same shapes) but train towards another target."""
        if saved is None:
            return
        current = json.loads(json.dumps(config_to_dict(self.config)))
        changed = [f"{section}.{key}: {saved[section].get(key)!r} in the checkpoint, {value!r} here"
                   for section in ("model", "diffusion") if section in saved
                   for key, value in current[section].items() if saved[section].get(key, value) != value]
        if changed:
            raise ValueError(f"cannot resume {path}: it was trained with other settings ("
                             + "; ".join(changed) + "). Resume with the config it was trained with (its "
                             "run folder's config.yaml) or start a new run with --run-dir")

    def claim_run_dir(self, resume, overwrite):
        """Make sure a fresh run does not mix with an old one in the same folder.

        :raises RunFolderInUse: the folder holds another run's files and neither ``resume``
            nor ``overwrite`` was asked for.
        """
        found = _run_files(self.run_dir)
        if not found or resume:
            return
        if not overwrite:
            steps = [step for step, _ in list_checkpoints(self.run_dir)]
            held = f"checkpoints up to step {steps[-1]}" if steps else "files of an earlier run"
            raise RunFolderInUse(
                f"{self.run_dir} already holds a run ({held}: {', '.join(sorted(map(os.path.basename, found))[:6])}). "
                "Continue it with --resume, choose another folder with --run-dir, or pass --overwrite to "
                "delete those files and start again.")
        for path in found:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        logger.warning("--overwrite: deleted %d file(s) of the earlier run in %s", len(found), self.run_dir)

    def start(self, resume=None, overwrite=False):
        """The step this run starts at, the same on every rank, with the same state on every rank.

        Rank 0 claims its run folder and reads its checkpoint; the step (or a failure, as −1) and then
        every parameter of the training state are broadcast from it; a checksum of the state is
        compared across ranks. Other ranks read no checkpoint: they need no copy of rank 0's files.
        """
        step, failure = 0, None
        if self.is_writer:
            try:
                self.claim_run_dir(resume, overwrite)
                step = self.resume(resume) if resume else 0
            except Exception as err:  # reported on every rank below, raised here
                failure, step = err, -1
        if self.world_size > 1:
            sync = StateBroadcast(self.state, self.rank)
            step = sync.broadcast_step(step)
            if step < 0:
                if failure is not None:
                    raise failure
                raise RuntimeError("rank 0 could not start the run (see its log, worker_0.log); stopping")
            sync.broadcast_state()
            sync.check_same(self.state_digest())
        elif failure is not None:
            raise failure
        return step

    def state_digest(self):
        """SHA-1 of the whole training state, in name order."""
        return _digest(self.state)

    def parameter_digest(self):
        """SHA-1 of the model's parameters, in name order."""
        return _digest(dict(self.model.parameters_and_names()))

    # ---- the loop -------------------------------------------------------------------------------

    def save(self, step):
        """Hand a checkpoint of ``step`` to the background writer (rank 0); returns its final path."""
        if not self.is_writer:
            return None
        save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
        path = self.writer.save(self.state, step, config_to_dict(self.config))
        if self.config.model.arch == "latent":
            self.export(export_path(self.run_dir, step))
            self.writer.prune("ldm")  # train.keep_checkpoints applies to the exports too
        return path

    def export(self, path, ema_rate=None):
        """Write the latent model as a converted checkpoint (the EMA copy of what it trains, the frozen parts'
        own weights), which ``run_infer.sh PROMPT --ckpt PATH --vocab model.vocab`` samples from."""
        parts = export_config(self.model.parts, self.config)
        return write_export(path, dict(self.model.parameters_and_names()), self.train_step.ema, parts, ema_rate)

    def fit(self, resume=None, progress=True, overwrite=False):
        """Train up to ``train.total_steps``; returns the path of the final checkpoint (rank 0) or None."""
        train = self.config.train
        self.resumed_from = None
        start = self.start(resume, overwrite)
        if start >= train.total_steps:
            logger.info("nothing to do: the run is at step %d of %d", start, train.total_steps)
            return latest_checkpoint(self.run_dir) if self.is_writer else None
        stream = create_dataset(self.config.data, train.batch_size, self.rank, self.world_size,
                                tokenizer=self.tokenizer, seed=self.config.seed, start_step=start,
                                end_step=train.total_steps, noise_shape=self.noise_shape,
                                low_res_size=self.config.model.low_res_size if "low_res" in self.cond_names else None,
                                channels=self.config.model.in_channels)
        log = MetricLog(self.train_step.metrics,
                        os.path.join(self.run_dir, "metrics.jsonl") if self.is_writer else None)
        log.reset()
        bar = tqdm(total=train.total_steps, initial=start, desc=f"train {self.config.name}",
                   disable=not (progress and self.is_writer), dynamic_ncols=True)
        self.last_good = self.resumed_from
        last_saved, started = None, time.perf_counter()
        chunks = self._sink_chunks(stream) if self.sinks else self._host_chunks(stream)
        step = start
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("mind_diffusion")])
        redirect.__enter__()  # log lines (skipped images, warnings) print above the bar, not glued onto it
        try:
            while step < train.total_steps:
                step = chunks(step)
                bar.update(step - bar.n)
                done = step == train.total_steps
                events = _crossed(step, train, done)
                if not events:
                    continue
                images_per_s = (step - start) * train.batch_size * self.world_size / (time.perf_counter() - started)
                record = log.read(step, {"images_per_s": round(images_per_s, 2)})
                if record and "log" in events:
                    self._report(bar, record)
                if record and record["nonfinite_streak"] >= MAX_NONFINITE_STREAK:
                    raise TrainingDiverged(
                        f"the loss was NaN/inf for the last {record['nonfinite_streak']} steps (each was skipped); "
                        f"stopping at step {step}. Last good checkpoint: {self.last_good or 'none written yet'}. "
                        "Lower train.lr or enable train.grad_clip, then resume from it with --resume PATH.")
                if "save" in events:
                    if log.healthy:
                        last_saved = self.save(step) or last_saved
                        self.last_good = last_saved
                    elif self.is_writer:
                        logger.warning("step %d: no checkpoint written, the loss is non-finite or diverging "
                                       "(last good checkpoint: %s)", step, self.last_good or "none")
                if "sample" in events and self.sample_fn:
                    path = self.sample_fn(self.ema_model_state(), step, self.is_writer)
                    if path:
                        logger.info("samples at step %d: %s", step, path)
        finally:
            bar.close()
            redirect.__exit__(None, None, None)
            if self.writer:
                self.writer.wait()
        if stream.skipped_paths:
            logger.warning("%d unreadable image(s) were skipped in this session (each replaced by the next "
                           "readable one); first: %s", len(stream.skipped_paths), ", ".join(stream.skipped_paths[:5]))
        # One line per worker, so data-parallel runs can be checked: equal parameters, different data.
        print(f"[rank {self.rank}] finished at step {step}: parameters sha1 {self.parameter_digest()}, "
              f"{self.items_seen} items this session, data sha1 {self.data_digest.hexdigest()}", flush=True)
        return last_saved

    def _report(self, bar, record):
        shown = ("loss",) + self.train_step.metrics.names
        bar.set_postfix({name: f"{record[name]:.4f}" for name in shown})
        if self.is_writer:
            values = "  ".join(f"{name} {record[name]:.4f}" for name in shown)
            logger.info("step %d  %s  %.1f img/s%s", record["step"], values, record["images_per_s"],
                        f"  ({record['skipped_steps']} skipped)" if record["skipped_steps"] else "")

    def _host_chunks(self, stream):
        """CPU: one step per call, its batch fed from the host (no device → host sync)."""
        batches = iter(stream)
        self.data_digest, self.items_seen = hashlib.sha1(), 0
        columns = self.step_columns

        def run(step):
            batch = next(batches)
            self.data_digest.update(np.ascontiguousarray(batch["index"]).tobytes())
            self.items_seen += len(batch["index"])
            seed_step(self.config.seed, self.rank, step)  # the step's dropout masks (CPU kernel)
            self.train_step(*(ms.Tensor(batch[name]) for name in columns))
            return step + 1
        return run

    def _sink_chunks(self, stream):
        """Ascend/GPU: ``train.log_every`` steps per call inside the device (``ms.data_sink``)."""
        dataset = stream.dataset().project(self.step_columns)
        self.data_digest, self.items_seen = hashlib.sha1(), 0
        size = self.sink_size(stream.start_step)
        sink = ms.data_sink(self.train_step, dataset, sink_size=size)

        def run(step):
            sink()
            self.items_seen += size * self.config.train.batch_size
            return step + size
        return run

    def sink_size(self, start):
        """Steps per device call: ``train.log_every`` when every event (save, sample, the end, the
        resume point) falls on a multiple of it; else the largest step count that keeps them aligned."""
        train = self.config.train
        periods = [p for p in (train.log_every, train.save_every, train.sample_every) if 0 < p < train.total_steps]
        size = math.gcd(train.total_steps, start, *periods)
        if size < train.log_every and self.is_writer:
            logger.warning("device sink runs %d step(s) per call, not train.log_every=%d: make save_every, "
                           "sample_every and total_steps multiples of log_every for fewer host round trips",
                           size, train.log_every)
        return size


def _crossed(step, train, done):
    """The periodic events due at ``step``: log, save, sample."""
    events = set()
    if done or step % train.log_every == 0:
        events.add("log")
    if done or step % train.save_every == 0:
        events.add("save")
    if done or (train.sample_every and step % train.sample_every == 0):
        events.add("sample")
    return events


def _run_files(run_dir):
    import glob
    return [path for pattern in RUN_FILES for path in glob.glob(os.path.join(run_dir, pattern))]


def _digest(state):
    digest = hashlib.sha1()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(state[name].asnumpy()).tobytes())
    return digest.hexdigest()


class _RootShare(nn.Cell):
    """x on rank 0, summed with zeros from every other rank: a broadcast from rank 0 by AllReduce
    (exact: x + 0 = x), which every backend's collective library has. Integers travel as two float32
    halves of 12 bits each (exact below 2^36), since MindSpore's CPU AllReduce takes floats only."""

    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x, is_root):
        if x.dtype in (ms.float32, ms.float16, ms.bfloat16):
            return self.all_reduce(ops.select(is_root, x, ops.zeros_like(x)))
        wide = x.astype(ms.int64)
        high, low = (wide // 4096).astype(ms.float32), (wide % 4096).astype(ms.float32)
        high = self.all_reduce(ops.select(is_root, high, ops.zeros_like(high)))
        low = self.all_reduce(ops.select(is_root, low, ops.zeros_like(low)))
        return (high.astype(ms.int64) * 4096 + low.astype(ms.int64)).astype(x.dtype)


class _Gather(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_gather = ops.AllGather()

    def construct(self, x):
        return self.all_gather(x)


class StateBroadcast:
    """Rank 0's start step and training state, copied to every rank, and a check that all ranks agree."""

    def __init__(self, state, rank):
        self.state = state
        self.is_root = ms.Tensor(rank == 0)

    def broadcast_step(self, step):
        return int(_RootShare()(ms.Tensor(np.array([step], np.int32)), self.is_root).asnumpy()[0])

    def broadcast_state(self):
        """One collective per dtype: the state flattened into a vector (on the host; a one-off at start)."""
        share = _RootShare()
        groups = {}
        for name in sorted(self.state):
            groups.setdefault(self.state[name].dtype, []).append(name)
        for dtype, names in groups.items():
            values = [self.state[name].asnumpy() for name in names]
            flat = share(ms.Tensor(np.concatenate([v.reshape(-1) for v in values])), self.is_root).asnumpy()
            offset = 0
            for name, value in zip(names, values):
                self.state[name].set_data(ms.Tensor(flat[offset:offset + value.size].reshape(value.shape), dtype))
                offset += value.size

    def check_same(self, digest):
        """Stop on every rank, with the ranks named, when their training states differ."""
        words = np.frombuffer(bytes.fromhex(digest), dtype=np.uint16).astype(np.float32)  # exact in float32
        every = _Gather()(ms.Tensor(words)).asnumpy().reshape(-1, words.size)
        differ = [r for r in range(every.shape[0]) if not np.array_equal(every[r], every[0])]
        if differ:
            raise RuntimeError(f"after the broadcast from rank 0 the training state of rank(s) "
                               f"{', '.join(map(str, differ))} still differs from rank 0's (checksums differ); "
                               "the ranks do not run the same model/config. Check that every node runs the same "
                               "code and config.")


def log_model_summary(model):
    count = sum(math.prod(p.shape) for p in model.trainable_params())
    logger.info("model: %s with %.2f M parameters", type(model).__name__, count / 1e6)
    return count
