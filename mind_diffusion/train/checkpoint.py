"""What a training run saves and restores, and the background writer of its checkpoints.

The file format (names, EMA copies, atomic writes, reading) is
:mod:`mind_diffusion.checkpoints`, shared with inference and export. A training
checkpoint holds everything a run needs to continue exactly: the network, every
EMA copy, AdamW's moments and step, the importance sampler's loss history and
the loss scale. The run's random numbers are counter-based (seed, rank, step),
so the step is all the RNG state there is.
"""
import json
import os
import threading

from ..checkpoints import (checkpoint_config, checkpoint_path, ema_prefix, list_checkpoints, model_weights,
                           read_checkpoint, restore_state, write_checkpoint)

# The diffusion settings that define the process a network was trained under; the switches among them are
# False where older files do not record them.
PROCESS_KEYS = ("steps", "noise_schedule", "predict_v", "predict_xstart", "zero_terminal_snr")
PROCESS_SWITCHES = ("predict_v", "predict_xstart", "zero_terminal_snr")


def own_state(loss_net):
    """name → Parameter that a loss cell trains or counts besides the model (``loss_net.own_state()``:
    the autoencoder loss's discriminator and its step count), saved under ``loss.<name>``."""
    own = getattr(loss_net, "own_state", None)
    return own() if own is not None else {}


def training_state(model, train_step):
    """name → Parameter of everything a checkpoint saves, under the stable names of :mod:`mind_diffusion.checkpoints`."""
    state = {f"model.{name}": param for name, param in model.parameters_and_names()}
    ema = train_step.ema
    if ema is not None:
        for rate, shadow in zip(ema.rates, ema.shadows):
            for name, param in zip(ema.names, shadow):
                state[f"{ema_prefix(rate)}{name}"] = param
    own = {f"loss.{name}": param for name, param in own_state(train_step.loss_net).items()}
    state.update(own)
    optimizer = train_step.optimizer
    names = {id(p): n for n, p in model.parameters_and_names()}
    names.update((id(p), n) for n, p in own.items())
    for slot in ("moments1", "moments2"):
        moments = getattr(optimizer, slot, None)
        if moments is None:
            continue
        for param, moment in zip(optimizer.parameters, moments):
            state[f"optimizer.{slot}.{names[id(param)]}"] = moment
    state["optimizer.global_step"] = optimizer.global_step
    sampler = train_step.loss_net.schedule_sampler
    for name, param in sampler.parameters_and_names():
        state[f"schedule_sampler.{name}"] = param
    state["loss_scale"] = train_step.loss_scale
    state["loss_scale.cur_iter"] = train_step.scale_update.cur_iter
    state["loss_scale.last_overflow_iter"] = train_step.scale_update.last_overflow_iter
    return state


class CheckpointWriter:
    """Writes a run's checkpoints in a background thread, keeping the newest ``keep``.

    :meth:`save` takes a host snapshot of the state (the one device → host copy)
    and returns at once; the file appears under its final name only when
    complete. At most one write is in flight: the next save (or :meth:`wait`)
    waits for it and re-raises its error, so a failed write is never silent.

    :param keep: complete checkpoints kept in the folder (0: all); older ones are deleted
        after each new one is in place.
    """

    def __init__(self, run_dir, keep=0):
        self.run_dir, self.keep = run_dir, int(keep)
        self._thread, self._error = None, None

    def save(self, state, step, config_dict):
        snapshot = {name: param.asnumpy().copy() for name, param in state.items()}
        self.wait()
        path = checkpoint_path(self.run_dir, step)

        def write():
            try:
                write_checkpoint(path, snapshot, step, config_dict)
                self.prune()
            except BaseException as err:  # handed to the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()
        return path

    def wait(self):
        """Block until the write in flight is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing a checkpoint in {self.run_dir} failed: {error}") from error

    def prune(self, prefix="ckpt"):
        """Delete all but the newest ``keep`` complete checkpoints (``prefix="ldm"``: a latent run's exports)."""
        if self.keep <= 0:
            return
        for _, old in list_checkpoints(self.run_dir, prefix)[:-self.keep]:
            os.remove(old)


def excluded_names(names, exclude):
    """The names among ``names`` that ``train.init_exclude`` keeps at their fresh initialisation: each entry
    is a parameter name or a prefix ending at a ``.``.

    :raises ValueError: an entry that names no parameter (a typo would otherwise load everything).
    """
    names = list(names)
    chosen = set()
    for entry in exclude:
        hits = [name for name in names if name == entry or name.startswith(entry.rstrip(".") + ".")]
        if not hits:
            raise ValueError(f"train.init_exclude: {entry!r} names no parameter of this model; give a name or "
                             f"prefix such as {names[0].split('.')[0]!r}")
        chosen.update(hits)
    return chosen


def recorded_process(checkpoint):
    """{diffusion setting: value} of the process a checkpoint's network was trained under, as far as the
    file says: a training checkpoint's recipe, or a latent export's ``ldm_config``; {} for other files."""
    config = checkpoint_config(checkpoint)
    if config is not None:
        diffusion = config.get("diffusion") or {}
        return {key: diffusion.get(key, False) for key in PROCESS_KEYS if key in diffusion or key in PROCESS_SWITCHES}
    if "ldm_config" in checkpoint:
        ldm_config = json.loads(str(checkpoint["ldm_config"]))
        schedule = ldm_config.get("schedule") or {}
        return {"steps": schedule.get("timesteps"), "predict_v": ldm_config.get("prediction") == "v",
                "zero_terminal_snr": bool(schedule.get("zero_terminal_snr", False))}
    return {}


def process_differences(checkpoint, diffusion_cfg):
    """``diffusion.<key>: <there> there, <here> here`` for each process setting in which the run that wrote
    ``checkpoint`` (a read file) differs from ``diffusion_cfg``. Fine-tuning across them is allowed (the pixel
    demo's ε → v stage does it); continuing a model as it was trained needs them alike."""
    return [f"diffusion.{key}: {value!r} there, {getattr(diffusion_cfg, key)!r} here"
            for key, value in recorded_process(checkpoint).items()
            if value is not None and value != getattr(diffusion_cfg, key)]


def read_initial_checkpoint(path):
    """The contents of ``train.init_from``'s file.

    :raises FileNotFoundError: no such file, saying what to give instead.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train.init_from: {path!r} is not a file; give a checkpoint "
                                "(a training checkpoint or an export such as checkpoints/demo.ckpt)")
    return read_checkpoint(path)


def load_initial_weights(model, path, exclude=(), checkpoint=None):
    """Start a run from another run's network (``train.init_from``): its EMA copy, else its raw weights;
    the parameters ``exclude`` names (``train.init_exclude``) keep their fresh initialisation.
    ``checkpoint`` is the file's contents when the caller has read them already
    (:func:`read_initial_checkpoint`), so that the file is read once.

    :return: the names of the parameters left fresh, sorted.
    :raises FileNotFoundError: no such file; ValueError: the weights do not fit ``model``.
    """
    if checkpoint is None:
        checkpoint = read_initial_checkpoint(path)
    params = dict(model.parameters_and_names())
    fresh = excluded_names(params, exclude)
    restore_state({name: p for name, p in params.items() if name not in fresh}, model_weights(checkpoint), path)
    return sorted(fresh)
