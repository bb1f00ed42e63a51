"""Convert OpenAI PyTorch checkpoints (improved-diffusion, guided-diffusion, glide-text2im) and latent
diffusion checkpoints (Stable Diffusion 1.x/2.x .ckpt or .safetensors, Wukong-Huahua's MindSpore .ckpt)
to MindSpore.

No torch needed: :mod:`mind_diffusion.torch_pickle` reads the zip checkpoint
with a restricted unpickler. Our networks name every sub-cell like the
PyTorch module it mirrors, so a MindSpore parameter name maps to a PyTorch
key by identity except for the names MindSpore fixes for its own layers
(:data:`RENAMES`, applied to the last component of a name):

==================  =========================  ============
MindSpore           layer                      PyTorch
==================  =========================  ============
``gamma``           GroupNorm / LayerNorm      ``weight``
``beta``            GroupNorm / LayerNorm      ``bias``
``embedding_table`` Embedding                  ``weight``
==================  =========================  ============

Every parameter of the target network must be present with exactly its
shape; anything missing, mis-shaped or left over is reported by name.

Command line::

    python -m mind_diffusion.convert IN.pt OUT.ckpt --model-config CONFIG
    python -m mind_diffusion.convert IN.pt --list
    python -m mind_diffusion.convert sd-v1-5.safetensors OUT.ckpt      # latent diffusion: no config needed
    python -m mind_diffusion.convert wukong-huahua-ms.ckpt --list       # shows the inferred configuration

A latent diffusion checkpoint (keys ``model.diffusion_model.*`` / ``first_stage_model.*``) needs no
config: :mod:`mind_diffusion.convert_ldm` infers it from the names and shapes (``--num-heads`` /
``--num-head-channels``, ``--text-heads``, ``--prediction``, ``--numerics`` give what shapes cannot
tell). The networks are built from it and every tensor is checked by name and shape; the output holds
``unet.*``, ``vae.*``, ``text_encoder.*`` and the config as the string entry ``ldm_config``
(:func:`mind_diffusion.convert_ldm.read_converted`).

Python::

    torch_sd = load_torch_state_dict("model.pt")        # {torch key: np.ndarray}
    model = build_model(config)                         # or any of our Cells
    load_into(model, convert_state_dict(torch_sd, model))
    export_torch_state_dict(model, "back.pt")           # ours -> torch zip layout
"""
import argparse
import importlib
import inspect
import json
import os
import sys
import zipfile

import mindspore as ms
import numpy as np

from . import convert_ldm
from .torch_pickle import CheckpointFormatError, load_state_dict, save_state_dict

__all__ = [
    "RENAMES",
    "MODEL_BUILDERS",
    "CheckpointFormatError",
    "ConversionError",
    "to_torch_name",
    "load_torch_state_dict",
    "convert_state_dict",
    "load_into",
    "to_torch_state_dict",
    "export_torch_state_dict",
    "build_model",
    "load_model_config",
    "main",
]

RENAMES = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}

# config "kind" → "module:function" taking the rest of the config as keyword
# arguments (the OpenAI scripts' argument names; a "unet" with "large_size" is
# guided-diffusion's super-resolution model). Imported lazily so this library
# module depends on no architecture; other model files register here.
MODEL_BUILDERS = {
    "unet": "models.unet:create_model",
    "classifier": "models.classifier:create_classifier",
    "text2im": "models.glide:create_model",  # glide-text2im base and (super_res=True) upsampler
}
# The latent diffusion components (convert_ldm.PREFIXES) → builder taking that section of the inferred config.
LDM_BUILDERS = {
    "unet": ("models.latent_unet:create_latent_unet", lambda c: dict(c)),
    "vae": ("models.autoencoder:create_autoencoder", lambda c: dict(c)),
    "text_encoder": ("models.clip_text:CLIPTextEncoder",
                     lambda c: {k: v for k, v in c.items() if k not in ("layout", "prefix")}),
}


class ConversionError(ValueError):
    """A checkpoint does not fit the network: lists the missing, mis-shaped and unexpected names."""

    def __init__(self, missing=(), mismatched=(), unexpected=()):
        self.missing = list(missing)
        self.mismatched = list(mismatched)
        self.unexpected = list(unexpected)
        lines = ["checkpoint does not match the network:"]
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): " + ", ".join(self.missing))
        for name, ours, theirs in self.mismatched:
            lines.append(f"  shape mismatch for {name}: network {ours}, checkpoint {theirs}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        super().__init__("\n".join(lines))


def to_torch_name(name):
    """The PyTorch key of one of our parameter names (see :data:`RENAMES`)."""
    head, _, last = name.rpartition(".")
    last = RENAMES.get(last, last)
    return f"{head}.{last}" if head else last


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def load_torch_state_dict(path):
    """Read a PyTorch zip checkpoint's state dict as ``{key: np.ndarray}`` without torch.

    Accepts a bare state dict or one nested under ``state_dict`` / ``model``.

    :raises CheckpointFormatError: if the file is not such a checkpoint.
    """
    obj = load_state_dict(path)
    if isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[k] for k in ("state_dict", "model") if _is_state_dict(obj.get(k))), obj)
    if not _is_state_dict(obj):
        raise CheckpointFormatError(f"{path}: holds no state dict of tensors")
    return dict(obj)


def convert_state_dict(torch_state_dict, cell, strict=True):
    """Map a PyTorch state dict onto ``cell``'s parameters: ``{our name: array of our dtype}``.

    Checks that every parameter of ``cell`` has a key of the same shape and,
    with ``strict``, that no key is left over.

    :raises ConversionError: naming every missing, mis-shaped and unexpected key.
    """
    converted, missing, mismatched = {}, [], []
    used = set()
    for param in cell.get_parameters():
        key = to_torch_name(param.name)
        if key not in torch_state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = torch_state_dict[key]
        if tuple(value.shape) != tuple(param.shape):
            mismatched.append((key, tuple(param.shape), tuple(value.shape)))
            continue
        converted[param.name] = value.astype(_numpy_dtype(param.dtype))
    unexpected = sorted(set(torch_state_dict) - used) if strict else []
    if missing or mismatched or unexpected:
        raise ConversionError(missing, mismatched, unexpected)
    return converted


def _numpy_dtype(dtype):
    """The numpy dtype holding a MindSpore parameter dtype (float32 for bfloat16, which numpy lacks)."""
    table = {ms.float16: np.float16, ms.float64: np.float64, ms.int32: np.int32, ms.int64: np.int64}
    return table.get(dtype, np.float32)


def load_into(cell, state_dict, strict=True):
    """Set ``cell``'s parameters from ``{our name: array}``; with ``strict`` every parameter must be given.

    :raises ConversionError: for missing or mis-shaped entries.
    """
    params = {p.name: p for p in cell.get_parameters()}
    missing = sorted(set(params) - set(state_dict)) if strict else []
    unexpected = sorted(set(state_dict) - set(params)) if strict else []
    mismatched = [
        (name, tuple(params[name].shape), tuple(np.shape(value)))
        for name, value in state_dict.items()
        if name in params and tuple(params[name].shape) != tuple(np.shape(value))
    ]
    if missing or mismatched or unexpected:
        raise ConversionError(missing, mismatched, unexpected)
    for name, value in state_dict.items():
        if name in params:
            params[name].set_data(ms.Tensor(np.asarray(value), dtype=params[name].dtype))


def to_torch_state_dict(cell):
    """``cell``'s parameters as ``{PyTorch key: np.ndarray}`` (the inverse of :func:`convert_state_dict`)."""
    return {to_torch_name(p.name): p.asnumpy() for p in cell.get_parameters()}


def export_torch_state_dict(cell, path):
    """Write ``cell``'s parameters as a PyTorch zip checkpoint loadable by ``torch.load`` and by this module."""
    save_state_dict(to_torch_state_dict(cell), path)


def load_model_config(text_or_path):
    """A model config from a JSON/YAML file or an inline JSON string: ``{"kind": ..., <builder args>}``."""
    if os.path.exists(text_or_path):
        with open(text_or_path, encoding="utf-8") as f:
            text = f.read()
        if text_or_path.endswith((".yaml", ".yml")):
            import yaml

            return dict(yaml.safe_load(text))
    else:
        text = text_or_path
    try:
        return dict(json.loads(text))
    except json.JSONDecodeError as error:
        raise ValueError(f"model config is neither a file nor valid JSON: {error}") from None


# Arguments of the OpenAI scripts' model_and_diffusion_defaults() that do not change the weights: the
# diffusion's settings, and glide-text2im's cache of text embeddings. Dropped when the builder lacks them.
WEIGHTLESS_ARGS = frozenset({"diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
                             "rescale_timesteps", "rescale_learned_sigmas", "sigma_small", "cache_text_emb"})
# Arguments accepted with their default value only: name → (default, why another value is refused).
DEFAULT_ONLY_ARGS = {"inpaint": (False, "glide-text2im's inpainting models (inpaint=True) take the masked image "
                                        "as extra input channels, which this project does not build")}


def build_model(config, state_dict=None):
    """Build the network a config describes: ``kind`` picks :data:`MODEL_BUILDERS`, the rest are its arguments.

    Every argument of the OpenAI scripts is accepted: those that do not change the weights are
    ignored, unsupported values are refused by name. A text2im config without ``vocab_size`` takes it
    from ``state_dict``'s token embedding (a real GLIDE checkpoint has 50257).
    """
    config = dict(config)
    kind = config.pop("kind", "unet")
    if kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(sorted(MODEL_BUILDERS))}")
    module_name, function_name = MODEL_BUILDERS[kind].split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    accepted = inspect.signature(builder).parameters
    for name, (default, why) in DEFAULT_ONLY_ARGS.items():
        if name in config and name not in accepted:
            if config.pop(name) != default:
                raise ValueError(f"{name}={not default!r} is not supported: {why}")
    for name in WEIGHTLESS_ARGS & set(config) - set(accepted):
        config.pop(name)
    embedding = (state_dict or {}).get("token_embedding.weight")
    if kind == "text2im" and "vocab_size" not in config and embedding is not None:
        config["vocab_size"] = int(embedding.shape[0])
    return builder(**config)


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m mind_diffusion.convert",
        description=(
            "Convert an OpenAI PyTorch checkpoint (improved-diffusion, guided-diffusion, glide-text2im; "
            "torch.save zip format) to a MindSpore .ckpt, without torch. The network is built from "
            "--model-config and every parameter is checked by name and shape. A latent diffusion checkpoint "
            "(Stable Diffusion 1.x/2.x .ckpt or .safetensors, Wukong-Huahua's MindSpore .ckpt) needs no config: "
            "it is inferred from the tensors' names and shapes (--list shows it; see the options below)."
        ),
        epilog=(
            "The config is a JSON/YAML file or inline JSON: {\"kind\": KIND, ...} where KIND is one of "
            f"{', '.join(sorted(MODEL_BUILDERS))} and the other keys are the OpenAI scripts' "
            "create_model / create_classifier arguments, e.g. "
            "'{\"kind\": \"unet\", \"image_size\": 64, \"num_channels\": 192, \"num_res_blocks\": 3, "
            "\"learn_sigma\": true, \"class_cond\": true, \"attention_resolutions\": \"32,16,8\", "
            "\"num_head_channels\": 64, \"use_scale_shift_norm\": true, \"resblock_updown\": true, "
            "\"use_new_attention_order\": true}'. "
            "Arguments that do not change the weights (diffusion_steps, noise_schedule, timestep_respacing, "
            "cache_text_emb, ...) are ignored; inpaint=true is refused. A text2im config without vocab_size "
            "takes it from the checkpoint's token embedding (a real GLIDE checkpoint: vocab_size 50257). "
            "Parameter names map by identity except GroupNorm/LayerNorm gamma/beta <-> weight/bias and "
            "Embedding embedding_table <-> weight."
        ),
    )
    parser.add_argument("input", help="checkpoint to read: PyTorch .pt, SD .ckpt / .safetensors, Wukong MindSpore .ckpt")
    parser.add_argument("output", nargs="?", help="MindSpore checkpoint (.ckpt) to write")
    parser.add_argument("--model-config", help="network config: JSON/YAML file or inline JSON (see below)")
    parser.add_argument("--list", action="store_true", help="only print the checkpoint's keys, shapes and dtypes")
    parser.add_argument(
        "--non-strict", action="store_true", help="ignore checkpoint keys the network does not use"
    )
    ldm = parser.add_argument_group(
        "latent diffusion (SD 1.x/2.x .ckpt/.safetensors, Wukong-Huahua MindSpore .ckpt; no --model-config)")
    heads = ldm.add_mutually_exclusive_group()
    heads.add_argument("--num-heads", type=int, help="UNet attention heads (shapes cannot tell; default: SD 1.x's "
                       "8, or with --num-head-channels / an SD 2.x checkpoint 64 channels per head)")
    heads.add_argument("--num-head-channels", type=int, help="UNet channels per attention head (SD 2.x: 64)")
    ldm.add_argument("--text-heads", type=int, help="text encoder heads (default: width / 64, as CLIP)")
    ldm.add_argument("--prediction", choices=("eps", "v"), default="eps",
                     help="what the UNet predicts (SD 2.x 768-px models: v; default eps)")
    ldm.add_argument("--scale-factor", type=float, default=convert_ldm.SD_SCALE_FACTOR,
                     help="latent scale factor (default SD's 0.18215)")
    ldm.add_argument("--numerics", choices=("sd", "wukong"),
                     help="wukong: tanh-GELU in GEGLU, float32 timestep frequencies, text LayerNorm eps 1e-7 "
                          "(default: wukong for Wukong-named checkpoints, else sd)")
    return parser


def _read_input(path):
    """The checkpoint's tensors: a torch zip as before; .safetensors and MindSpore .ckpt through convert_ldm."""
    if str(path).endswith(".safetensors") or (str(path).endswith(".ckpt") and not zipfile.is_zipfile(path)):
        return convert_ldm.read_checkpoint(path)[0]
    return load_torch_state_dict(path)


def _build(spec, arguments):
    module_name, function_name = spec.split(":")
    return getattr(importlib.import_module(module_name), function_name)(**arguments)


def _in_checkpoint_names(error, component):
    """``error`` with the UNet's or VAE's names spelled as the checkpoint's (SD) keys."""
    sd_prefix = {"unet": convert_ldm.SD_UNET, "vae": convert_ldm.SD_VAE}.get(component)
    if sd_prefix is None:
        return error
    key = lambda name: sd_prefix + to_torch_name(name)  # noqa: E731
    return ConversionError([key(n) for n in error.missing], [(key(n), a, b) for n, a, b in error.mismatched],
                           [key(n) for n in error.unexpected])


def _network_problems(config, params):
    """Each component's network built from ``config`` and checked against ``params`` by name and shape
    (both ways): the errors, spelled with the checkpoint's keys."""
    problems = []
    for name, (spec, arguments) in LDM_BUILDERS.items():
        if config[name] is None:
            print(f"note: the checkpoint holds no {name}", file=sys.stderr)
            continue
        prefix = convert_ldm.PREFIXES[name]
        ours = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        try:
            load_into(_build(spec, arguments(config[name])), ours)
        except ConversionError as error:
            problems.append(f"{name}: {_in_checkpoint_names(error, name)}")
    return problems


def _main_ldm(args, parser, raw):
    """The latent diffusion branch of :func:`main` (``raw``: the checkpoint's tensors)."""
    try:
        state, config = convert_ldm.ldm_from_state(
            raw, num_heads=args.num_heads, num_head_channels=args.num_head_channels, text_heads=args.text_heads,
            prediction=args.prediction, scale_factor=args.scale_factor, numerics=args.numerics)
        params, report = convert_ldm.convert_ldm_state_dict(state, config)
    except ValueError as error:  # LDMConfigError, TextEncoderNamesError
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.list and not args.output:
        parser.error("OUT.ckpt is required unless --list is given")
    problems = _network_problems(config, params)
    if report["unexpected"] and not args.non_strict:
        problems.insert(0, str(ConversionError(unexpected=report["unexpected"])))
    if args.list:
        print(json.dumps(config, indent=1))
        for name, prefix in convert_ldm.PREFIXES.items():
            count = sum(k.startswith(prefix) for k in params)
            print(f"{name}: {count} tensors" if count else f"{name}: missing (no such tensors in the checkpoint)")
        print(f"ignored ({len(report['ignored'])}): " + ", ".join(report["ignored"]))
        print(f"unexpected ({len(report['unexpected'])}): " + ", ".join(report["unexpected"]))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if args.list or problems:
        return 1 if problems else 0
    entries = [{"name": k, "data": ms.Tensor(v)} for k, v in params.items()]
    ms.save_checkpoint(entries, args.output, append_dict={"ldm_config": convert_ldm.config_json(config)})
    print(f"wrote {len(entries)} parameters and the inferred config to {args.output}")
    return 0


def main(argv=None):
    """Command-line entry point; returns the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        torch_sd = _read_input(args.input)
    except (OSError, CheckpointFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if convert_ldm.is_ldm_checkpoint(torch_sd):
        return _main_ldm(args, parser, torch_sd)
    if args.list:
        for key, value in torch_sd.items():
            print(f"{key}\t{tuple(value.shape)}\t{value.dtype}")
        return 0
    if not args.output or not args.model_config:
        parser.error("OUT.ckpt and --model-config are required unless --list is given")
    try:
        model = build_model(load_model_config(args.model_config), torch_sd)
    except (ValueError, TypeError) as error:
        print(f"error: bad --model-config: {error}", file=sys.stderr)
        return 2
    try:
        converted = convert_state_dict(torch_sd, model, strict=not args.non_strict)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    load_into(model, converted)
    ms.save_checkpoint(model, args.output)
    print(f"wrote {len(converted)} parameters to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
