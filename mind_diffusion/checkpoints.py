"""The checkpoint format, one home for training, inference and export: names, EMA copies, reading, writing.

A checkpoint is one MindSpore ``.ckpt`` file holding, under stable names:
``model.<name>`` (the network), ``ema_<rate>.<name>`` (each EMA copy θ̄ at rate r),
``optimizer.<slot>.<name>`` and ``optimizer.global_step`` (AdamW's moments and
step), ``schedule_sampler.*`` (the importance sampler's loss history) and
``loss_scale*``, plus ``step`` and the resolved config as JSON. An export
(:mod:`mind_diffusion.cli.export`) keeps only ``model.<name>``, ``step`` and the
config. A run's checkpoints are ``ckpt_<step:08d>.ckpt`` in its folder.

Files are written to a temporary name in the same folder and renamed into
place, so a run killed mid-write leaves the previous checkpoint intact and never
a half-written one under a checkpoint's name. What a training run saves and
restores (:func:`mind_diffusion.train.checkpoint.training_state`) and its
background writer live with the trainer in :mod:`mind_diffusion.train.checkpoint`.
"""
import glob
import json
import os
import re

import mindspore as ms

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d{8})\.ckpt$")
_EMA_NAME = re.compile(r"^ema_(\d+(?:\.\d+)?(?:e-?\d+)?)\.(.+)$")


# ---------------------------------------------------------------------------
# A run's checkpoint files
# ---------------------------------------------------------------------------

def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:08d}.ckpt")


def list_checkpoints(run_dir, prefix="ckpt"):
    """(step, path) of the run's complete checkpoints, oldest first: ``ckpt_<step>.ckpt``, or with
    ``prefix="ldm"`` a latent run's sampling exports ``ldm_<step>.ckpt``."""
    pattern = CHECKPOINT_PATTERN if prefix == "ckpt" else re.compile(rf"^{re.escape(prefix)}_(\d{{8}})\.ckpt$")
    found = []
    for path in glob.glob(os.path.join(run_dir, f"{prefix}_*.ckpt")):
        match = pattern.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir):
    """Path of the newest checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------

def write_checkpoint(path, state, step, config_dict):
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


# ---------------------------------------------------------------------------
# The network's weights: raw or an EMA copy θ̄
# ---------------------------------------------------------------------------

def ema_prefix(rate):
    """The name prefix of the EMA copy at rate r: ``ema_<r>.`` (``%g``, so 0.9999 → ``ema_0.9999.``)."""
    return f"ema_{rate:g}."


def ema_rates(checkpoint):
    """The EMA rates stored in a checkpoint dict, in increasing order."""
    return sorted({float(m.group(1)) for m in map(_EMA_NAME.match, checkpoint) if m})


def ema_state(checkpoint, rate):
    """The parameters of the EMA copy at ``rate`` from a checkpoint dict, under the model's names."""
    prefix = ema_prefix(rate)
    state = {name[len(prefix):]: value for name, value in checkpoint.items() if name.startswith(prefix)}
    if not state:
        rates = ", ".join(f"{r:g}" for r in ema_rates(checkpoint)) or "none"
        raise KeyError(f"no EMA copy at rate {rate:g} in this checkpoint (it has: {rates})")
    return state


def model_weights(checkpoint, ema_rate=None, raw=False):
    """The network's weights from a checkpoint: an EMA copy when it has one (unless ``raw``), else the raw weights.

    Without ``ema_rate`` the slowest copy (largest r) is taken, the one sampling uses. Parameters that
    were not trained have no EMA copy (a latent model's frozen autoencoder and text encoder): theirs are
    the raw weights. A converted latent checkpoint (an ``ldm_<step>.ckpt`` or a ``cli.export`` of a latent
    run: ``unet.*``, ``vae.*``, ``text_encoder.*`` and the string ``ldm_config``) holds one copy, already
    under the latent model's names, and gives that.
    """
    if "ldm_config" in checkpoint:
        if ema_rate is not None:
            raise KeyError(f"a converted latent checkpoint holds one copy of the weights (asked for --ema-rate "
                           f"{ema_rate})")
        return {name: value for name, value in checkpoint.items() if name != "ldm_config"}
    weights = {name[len("model."):]: value for name, value in checkpoint.items() if name.startswith("model.")}
    rates = ema_rates(checkpoint)
    if rates and not raw:
        weights.update(ema_state(checkpoint, rates[-1] if ema_rate is None else ema_rate))
        return weights
    if ema_rate is not None:
        raise KeyError(f"this checkpoint has no EMA copies (asked for --ema-rate {ema_rate})")
    return weights


def restore_state(state, checkpoint, path):
    """Copy checkpoint values into ``state`` (name → Parameter), checking names and shapes.

    :raises ValueError: naming the missing or mis-shaped entries, e.g. a
        checkpoint of another model.
    """
    missing, mismatched = [], []
    for name, param in state.items():
        if name not in checkpoint:
            missing.append(name)
            continue
        value = checkpoint[name]
        if tuple(value.shape) != tuple(param.shape):
            mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(param.shape)}")
    if missing or mismatched:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if mismatched:
            lines.append(f"{len(mismatched)} with another shape (e.g. {'; '.join(mismatched[:3])})")
        raise ValueError(f"checkpoint {path!r} does not fit this model/config: " + "; ".join(lines)
                         + ". Is it from another recipe? Pass the matching config, or start a new run.")
    for name, param in state.items():
        param.set_data(ms.Tensor(checkpoint[name].asnumpy(), param.dtype))
