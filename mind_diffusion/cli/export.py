"""Shrink a training checkpoint to what sampling needs: one EMA copy of the weights (+ the recipe).

    python -m mind_diffusion.cli.export runs/demo/ckpt_00004000.ckpt checkpoints/demo.ckpt --fp16

Drops the optimizer moments, the raw weights and the other EMA copies; with
``--fp16`` stores the weights in float16 (sampling casts them back to the
model's float32). The result loads in ``run_infer.sh`` like any checkpoint.
A latent run's checkpoint (``arch: latent``) is exported in the converted format
that its ``ldm_<step>.ckpt`` has (``unet.*`` from the EMA copy, the frozen
``vae.*`` and ``text_encoder.*``, ``ldm_config``), which ``run_infer.sh
PROMPT --ckpt OUT --vocab VOCAB`` samples.

``--debias-ema`` removes the initial weights' share from a short run's EMA.
An EMA started at θ_0 is θ̄_n = r^n θ_0 + (1 − r) Σ_s r^(n−s) θ_s; after n steps
θ_0 still weighs r^n (13.5% at r = 0.999, n = 2000), which blurs a model
trained for few steps. Initialisation is deterministic per recipe seed, so θ_0
is rebuilt exactly and (θ̄_n − r^n θ_0) / (1 − r^n) — the bias-corrected average
of θ_1..θ_n, as Adam corrects its moments — is exported instead.
"""
import argparse
import json
import os
import sys

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mind_diffusion.cli.export",
                                     description="Export the EMA weights of a training checkpoint for sampling.")
    parser.add_argument("checkpoint", help="training checkpoint (ckpt_XXXXXXXX.ckpt)")
    parser.add_argument("out", help="output .ckpt")
    parser.add_argument("--ema-rate", type=float, default=None, help="EMA copy to keep (default: the slowest)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the size)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change the recipe stored with the weights, e.g. sample.sampler=ddpm (repeatable)")
    parser.add_argument("--debias-ema", action="store_true",
                        help="remove the initial weights' r^n share from the EMA (for short runs)")
    args = parser.parse_args(argv)

    import mindspore as ms
    from mind_diffusion.checkpoints import checkpoint_config, checkpoint_step, model_weights, read_checkpoint, \
        write_checkpoint

    checkpoint = read_checkpoint(args.checkpoint)
    config = checkpoint_config(checkpoint)
    if config is None:
        print(f"error: {args.checkpoint!r} is not a mind_diffusion training checkpoint (no recipe inside)",
              file=sys.stderr)
        return 2
    if args.overrides:
        from mind_diffusion.config import ConfigError, config_from_dict, config_to_dict
        try:
            config = config_to_dict(config_from_dict(config, args.overrides))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    dtype = np.float16 if args.fp16 else np.float32
    step = checkpoint_step(checkpoint)
    arrays = {name: value.asnumpy() for name, value in model_weights(checkpoint, args.ema_rate).items()}
    if args.debias_ema:
        arrays = debiased_ema(arrays, checkpoint, config, args.ema_rate, step)
    if config.get("model", {}).get("arch") == "latent":
        count = write_latent_export(args.out, arrays, config, dtype)
    else:
        weights = {f"model.{name}": ms.Parameter(ms.Tensor(value.astype(dtype)), name=f"model.{name}")
                   for name, value in arrays.items()}
        write_checkpoint(args.out, weights, step, config)
        count = len(weights)
    size = os.path.getsize(args.out) / 2 ** 20
    print(f"{args.out}: {count} tensors ({'float16' if args.fp16 else 'float32'}) from step {step}, "
          f"{size:.1f} MiB; recipe {json.dumps(config.get('name'))}")
    return 0


def write_latent_export(path, arrays, config_dict, dtype):
    """A latent run's weights as the converted checkpoint ``run_infer.sh`` samples (the run's networks'
    description from the recipe, as the trainer writes its ``ldm_<step>.ckpt``); returns the tensor count."""
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.config import config_from_dict
    from mind_diffusion.train.latent import export_config, write_export_weights

    config = config_from_dict(config_dict)
    model, _ = build_model(config.model)  # for its description (model.parts) only
    write_export_weights(path, {name: value.astype(dtype) for name, value in arrays.items()},
                         export_config(model.parts, config))
    return len(arrays)


def debiased_ema(arrays, checkpoint, config_dict, ema_rate, step):
    """(θ̄_n − r^n θ_0) / (1 − r^n), with θ_0 rebuilt from the recipe's seed (see the module docstring),
    or read from ``train.init_from`` when the run started from another checkpoint (but for the parameters
    ``train.init_exclude`` names, which started from the seed's initialisation there too). Parameters
    without an EMA copy (a latent run's frozen autoencoder) are returned unchanged."""
    import mindspore as ms
    from mind_diffusion.checkpoints import ema_rates, ema_state, model_weights, read_checkpoint
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.config import config_from_dict
    from mind_diffusion.train.checkpoint import excluded_names

    rates = ema_rates(checkpoint)
    if not rates or step < 1:
        raise ValueError("--debias-ema needs a training checkpoint with an EMA copy, after at least one step")
    rate = rates[-1] if ema_rate is None else ema_rate
    config = config_from_dict(config_dict)
    initial = {}
    if config.train.init_from:  # the run started from another network's weights: those are θ_0
        initial = {name: value.asnumpy().astype(np.float64)
                   for name, value in model_weights(read_checkpoint(config.train.init_from)).items()}
    if not config.train.init_from or config.train.init_exclude:
        ms.set_seed(config.seed)  # the trainer's initialisation: the same seed, the model built first
        model, _ = build_model(config.model)
        fresh = {name: param.asnumpy() for name, param in model.parameters_and_names()}
        # all of them without init_from; else those train.init_exclude left at their initialisation
        kept = excluded_names(fresh, config.train.init_exclude) if config.train.init_from else fresh
        initial.update({name: fresh[name] for name in kept})
    weight = rate ** step
    averaged = ema_state(checkpoint, rate)  # a latent run's frozen parts have no average: they stay as they are
    return {name: (value.astype(np.float64) - weight * initial[name]) / (1.0 - weight) if name in averaged
            else value for name, value in arrays.items()}


if __name__ == "__main__":
    sys.exit(main())
