"""Training checkpoints: everything a run needs to continue exactly, written atomically.

A checkpoint is one MindSpore ``.ckpt`` file holding, under stable names:
``model.<name>`` (the network), ``ema_<rate>.<name>`` (each EMA copy),
``optimizer.<slot>.<name>`` and ``optimizer.global_step`` (AdamW's moments and
step), ``schedule_sampler.*`` (the importance sampler's loss history) and
``loss_scale*``, plus ``step`` and the resolved config as JSON. The run's
random numbers are counter-based (seed, rank, step), so the step is all the
RNG state there is. Files are written to a temporary name in the same folder
and renamed into place, so a run killed mid-write leaves the previous
checkpoint intact and never a half-written one under a checkpoint's name.
"""
import glob
import json
import os
import re

import mindspore as ms

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d{8})\.ckpt$")


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:08d}.ckpt")


def list_checkpoints(run_dir):
    """(step, path) of the run's complete checkpoints, oldest first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "ckpt_*.ckpt")):
        match = CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir):
    """Path of the newest checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def training_state(model, train_step):
    """name → Parameter of everything a checkpoint saves, under the stable names above."""
    state = {f"model.{name}": param for name, param in model.parameters_and_names()}
    ema = train_step.ema
    if ema is not None:
        for rate, shadow in zip(ema.rates, ema.shadows):
            for name, param in zip(ema.names, shadow):
                state[f"ema_{rate:g}.{name}"] = param
    optimizer = train_step.optimizer
    names = {id(p): n for n, p in model.parameters_and_names()}
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


def save_training_checkpoint(path, state, step, config_dict):
    """Write a checkpoint atomically (temporary file + rename).

    :param state: name → Parameter, Tensor or NumPy array.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # MindSpore appends ".ckpt" to names without it; "partial_" keeps it out of list_checkpoints.
    tmp = os.path.join(folder, f"partial_{os.path.basename(path)}")
    params = [{"name": name, "data": value if isinstance(value, ms.Tensor) else ms.Tensor(value)}
              for name, value in state.items()]
    try:
        ms.save_checkpoint(params, tmp, append_dict={"step": int(step), "config": json.dumps(config_dict)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
                save_training_checkpoint(path, snapshot, step, config_dict)
                self.prune()
            except BaseException as err:  # handed to the training thread by wait()
                self._error = err

        import threading
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

    def prune(self):
        """Delete all but the newest ``keep`` complete checkpoints."""
        if self.keep <= 0:
            return
        for _, old in list_checkpoints(self.run_dir)[:-self.keep]:
            os.remove(old)


def read_checkpoint(path):
    """name → Parameter of a checkpoint file, with a clear error when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for foreign or truncated files
        raise ValueError(f"{path!r} is not a readable MindSpore checkpoint ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def checkpoint_step(checkpoint):
    return int(checkpoint["step"].asnumpy()) if "step" in checkpoint else 0


def checkpoint_config(checkpoint):
    """The config dict saved with a training checkpoint, or None."""
    if "config" not in checkpoint:
        return None
    value = checkpoint["config"]
    return json.loads(value if isinstance(value, str) else str(value))


def model_weights(checkpoint, ema_rate=None, raw=False):
    """The network's weights from a checkpoint: an EMA copy when it has one (unless ``raw``), else the raw weights."""
    from .step import ema_rates, ema_state
    rates = ema_rates(checkpoint)
    if rates and not raw:
        return ema_state(checkpoint, rates[-1] if ema_rate is None else ema_rate)
    if ema_rate is not None:
        raise KeyError(f"this checkpoint has no EMA copies (asked for --ema-rate {ema_rate})")
    return {name[len("model."):]: value for name, value in checkpoint.items() if name.startswith("model.")}


def load_initial_weights(model, path):
    """Start a run from another run's network (``train.init_from``): its EMA copy, else its raw weights.

    :raises FileNotFoundError: no such file; ValueError: the weights do not fit ``model``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"train.init_from: {path!r} is not a file; give a checkpoint "
                                "(a training checkpoint or an export such as checkpoints/demo.ckpt)")
    restore_state(dict(model.parameters_and_names()), model_weights(read_checkpoint(path)), path)


def restore_state(state, checkpoint, path, prefix=""):
    """Copy checkpoint values into ``state`` (name → Parameter), checking names and shapes.

    :raises ValueError: naming the missing or mis-shaped entries, e.g. a
        checkpoint of another model.
    """
    missing, mismatched = [], []
    for name, param in state.items():
        key = prefix + name
        if key not in checkpoint:
            missing.append(key)
            continue
        value = checkpoint[key]
        if tuple(value.shape) != tuple(param.shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(param.shape)}")
    if missing or mismatched:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if mismatched:
            lines.append(f"{len(mismatched)} with another shape (e.g. {'; '.join(mismatched[:3])})")
        raise ValueError(f"checkpoint {path!r} does not fit this model/config: " + "; ".join(lines)
                         + ". Is it from another recipe? Pass the matching config, or start a new run.")
    for name, param in state.items():
        param.set_data(ms.Tensor(checkpoint[prefix + name].asnumpy(), param.dtype))
