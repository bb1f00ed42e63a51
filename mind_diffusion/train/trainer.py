"""The training loop around the compiled step: data, host-side randomness, logs, checkpoints, samples.

Everything that varies between steps enters the compiled :class:`TrainStep` as
a Tensor; the loop itself only feeds batches, keeps the step's outputs on the
device, and reads them back once per ``train.log_every`` steps.
"""
import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import mindspore as ms
from mindspore import nn
from tqdm.auto import tqdm

from ..config import config_to_dict, save_config
from ..data import create_dataset, transforms
from ..kernels.dropout import seed_step
from ..resample import create_named_schedule_sampler
from .checkpoint import (checkpoint_config, checkpoint_path, checkpoint_step, latest_checkpoint,
                         list_checkpoints, load_initial_weights, read_checkpoint, restore_state, save_training_checkpoint, training_state)
from .step import EMA, DiffusionLoss, TrainStep, WarmupLR

logger = logging.getLogger("mind_diffusion.train")

# Batch columns → the model's keyword inputs.
CONDITION_COLUMNS = {"tokens": "tokens", "mask": "mask", "y": "labels"}
# Stop when this many steps in a row had a non-finite loss (each such step is skipped).
MAX_NONFINITE_STREAK = 20


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf: training cannot continue from here."""


def step_randomness(seed, rank, step, batch_size, image_shape):
    """The uniform draws for t and the Gaussian ε of one step, from a counter-based generator.

    Seeded by (seed, rank, step), so a resumed run draws exactly what the
    uninterrupted run would have, and workers draw independently.
    """
    rng = np.random.default_rng([seed, rank, step])
    u = rng.random(batch_size, dtype=np.float32)
    noise = rng.standard_normal((batch_size,) + tuple(image_shape), dtype=np.float32)
    return u, noise


class MetricLog:
    """Accumulates step outputs on the device; summarises them (also per quartile of t) when flushed."""

    def __init__(self, num_timesteps, path=None):
        self.num_timesteps = num_timesteps
        self.path = path
        self.pending = []

    def add(self, outputs):
        self.pending.append(outputs)

    def flush(self, step, extra=None):
        """Read the pending outputs back, write one JSON line, and return the summary dict."""
        if not self.pending:
            return None
        loss, t, losses, mse, vb, finite = (np.concatenate([np.atleast_1d(o[i].asnumpy()) for o in self.pending])
                                            for i in range(6))
        self.pending = []
        record = {"step": int(step), "loss": float(loss.mean()), "mse": float(mse.mean()),
                  "vb": float(vb.mean()), "skipped_steps": int((~finite.astype(bool)).sum())}
        quartile = (4 * t) // self.num_timesteps
        for q in range(4):
            chosen = quartile == q
            if chosen.any():
                record[f"loss_q{q}"] = float(losses[chosen].mean())
                record[f"mse_q{q}"] = float(mse[chosen].mean())
                record[f"vb_q{q}"] = float(vb[chosen].mean())
        record.update(extra or {})
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record, finite.astype(bool)


class Trainer:
    """Trains ``model`` on ``diffusion`` as the config says.

    :param config: a validated :class:`mind_diffusion.config.Config`.
    :param model: the network, ``model(x_t, t, **cond)``.
    :param diffusion: the :class:`GaussianDiffusion` to train on.
    :param run_dir: folder of this run's checkpoints, logs, samples and resolved config.
    :param tokenizer: prompts → (tokens, mask), for text-conditioned models.
    :param sample_fn: ``sample_fn(ema_model_state, step) -> path or None``, called
        every ``train.sample_every`` steps and at the end (rank 0 only).
    :param rank, world_size: data-parallel position (world_size > 1 after ``init()``).
    """

    def __init__(self, config, model, diffusion, run_dir, tokenizer=None, sample_fn=None, rank=0, world_size=1):
        self.config = config
        self.model = model
        self.diffusion = diffusion
        self.run_dir = run_dir
        self.tokenizer = tokenizer
        self.sample_fn = sample_fn
        self.rank, self.world_size = rank, world_size
        train = config.train
        self.cond_names = self._condition_names()
        self.schedule_sampler = create_named_schedule_sampler(config.diffusion.schedule_sampler,
                                                              diffusion.num_timesteps)
        if train.init_from:
            # before the EMA copies are made, so that they start from these weights too
            load_initial_weights(model, train.init_from)
        loss_net = DiffusionLoss(model, diffusion, self.schedule_sampler, self.cond_names)
        named = [(name, p) for name, p in model.parameters_and_names() if p.requires_grad]
        optimizer = nn.AdamWeightDecay([p for _, p in named], learning_rate=WarmupLR(train.lr, train.warmup_steps),
                                       beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=train.weight_decay)
        ema = EMA(named, train.ema_rate) if train.ema_rate else None
        self.train_step = TrainStep(loss_net, optimizer, ema, grad_clip=train.grad_clip,
                                    loss_scale=train.loss_scale if config.model.use_fp16 else 0.0,
                                    world_size=world_size)
        self.state = training_state(model, self.train_step)
        self.image_shape = (config.model.in_channels, config.model.image_size, config.model.image_size)

    def _condition_names(self):
        names = []
        if self.tokenizer is not None:
            names += ["tokens", "mask"]
        if self.config.model.class_cond:
            names.append("y")
        if self.config.model.arch == "glide_upsample":
            names.append("low_res")
        return tuple(names)

    def _condition(self, batch, name):
        """One conditioning input of a batch; an upsampler's low-res input is its target, box-downsampled."""
        if name == "low_res":
            return transforms.box_downsample(batch["images"], self.config.model.low_res_size)
        return batch[CONDITION_COLUMNS[name]]

    @property
    def is_writer(self):
        return self.rank == 0

    def ema_model_state(self, rate=None):
        """name → Parameter of the EMA copy at ``rate`` (default: the first), under the model's names."""
        ema = self.train_step.ema
        if ema is None:
            return dict(self.model.parameters_and_names())
        index = 0 if rate is None else ema.rates.index(rate)
        state = dict(self.model.parameters_and_names())
        state.update(zip(ema.names, ema.shadows[index]))
        return state

    def resume(self, resume):
        """Restore from ``resume`` ("auto": this run's newest checkpoint, or a path); return the start step."""
        path = latest_checkpoint(self.run_dir) if resume == "auto" else resume
        if not path:
            return 0
        checkpoint = read_checkpoint(path)
        self._check_same_process(checkpoint_config(checkpoint), path)
        restore_state(self.state, checkpoint, path)
        step = checkpoint_step(checkpoint)
        logger.info("resumed from %s at step %d", path, step)
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

    def save(self, step):
        if not self.is_writer:
            return None
        path = checkpoint_path(self.run_dir, step)
        save_training_checkpoint(path, self.state, step, config_to_dict(self.config))
        return path

    def fit(self, resume=None, progress=True):
        """Train up to ``train.total_steps``; returns the path of the final checkpoint (rank 0) or None."""
        train = self.config.train
        start = self.resume(resume) if resume else 0
        if self.is_writer:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(self.config, os.path.join(self.run_dir, "config.yaml"))
        if start >= train.total_steps:
            logger.info("nothing to do: the run is at step %d of %d", start, train.total_steps)
            return latest_checkpoint(self.run_dir)
        stream = iter(create_dataset(self.config.data, train.batch_size, self.rank, self.world_size,
                                     tokenizer=self.tokenizer, seed=self.config.seed, start_step=start))
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl") if self.is_writer else None
        if metrics_path and start == 0 and os.path.exists(metrics_path):
            os.remove(metrics_path)  # a fresh run in an old folder: don't mix its log with the old one
        log = MetricLog(self.diffusion.num_timesteps, metrics_path)
        bar = tqdm(total=train.total_steps, initial=start, desc=f"train {self.config.name}",
                   disable=not (progress and self.is_writer), dynamic_ncols=True)
        last_saved, nonfinite_streak, started = None, 0, time.perf_counter()
        data_digest, items_seen = hashlib.sha1(), 0
        step = start
        while step < train.total_steps:
            batch = next(stream)
            data_digest.update(np.ascontiguousarray(batch["index"]).tobytes())
            items_seen += len(batch["index"])
            u, noise = step_randomness(self.config.seed, self.rank, step, train.batch_size, self.image_shape)
            seed_step(self.config.seed, self.rank, step)  # the step's dropout masks
            cond = [ms.Tensor(self._condition(batch, name)) for name in self.cond_names]
            log.add(self.train_step(ms.Tensor(batch["images"]), ms.Tensor(u), ms.Tensor(noise), *cond))
            step += 1
            bar.update(1)
            done = step == train.total_steps
            if step % train.log_every == 0 or done:
                images_per_s = (step - start) * train.batch_size * self.world_size / (time.perf_counter() - started)
                record, finite = log.flush(step, {"images_per_s": round(images_per_s, 2)})
                nonfinite_streak = _trailing_false(finite, nonfinite_streak)
                bar.set_postfix(loss=f"{record['loss']:.4f}", mse=f"{record['mse']:.4f}", vb=f"{record['vb']:.4f}")
                if self.is_writer:
                    logger.info("step %d  loss %.4f  mse %.4f  vb %.4f  %.1f img/s", step, record["loss"],
                                record["mse"], record["vb"], images_per_s)
                if nonfinite_streak >= MAX_NONFINITE_STREAK:
                    bar.close()
                    good = list_checkpoints(self.run_dir)
                    raise TrainingDiverged(
                        f"the loss was NaN/inf for the last {nonfinite_streak} steps (each was skipped); stopping "
                        f"at step {step}. Last good checkpoint: {good[-1][1] if good else 'none written yet'}. "
                        "Lower train.lr or enable train.grad_clip, then resume from it with --resume PATH.")
            if step % train.save_every == 0 or done:
                last_saved = self.save(step) or last_saved
            if self.sample_fn and self.is_writer and (
                    done or (train.sample_every and step % train.sample_every == 0)):
                path = self.sample_fn(self.ema_model_state(), step)
                if path:
                    logger.info("samples at step %d: %s", step, path)
        bar.close()
        # One line per worker, so data-parallel runs can be checked: equal parameters, different data.
        print(f"[rank {self.rank}] finished at step {step}: parameters sha1 {self.parameter_digest()}, "
              f"{items_seen} items this session, data sha1 {data_digest.hexdigest()}", flush=True)
        return last_saved

    def parameter_digest(self):
        """SHA-1 of the model's parameters, in name order."""
        digest = hashlib.sha1()
        for name, param in sorted(self.model.parameters_and_names(), key=lambda item: item[0]):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(param.asnumpy()).tobytes())
        return digest.hexdigest()


def _trailing_false(flags, streak):
    """Length of the run of False at the end of ``flags``, continuing ``streak`` if all are False."""
    for flag in flags:
        streak = 0 if flag else streak + 1
    return streak


def log_model_summary(model):
    count = sum(math.prod(p.shape) for p in model.trainable_params())
    logger.info("model: %s with %.2f M parameters", type(model).__name__, count / 1e6)
    return count
