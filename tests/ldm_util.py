"""Shared by the latent-diffusion tests: the fixtures' files and the networks built from a converted checkpoint."""
import os

import numpy as np

from mind_diffusion.convert import load_into
from mind_diffusion.convert_ldm import PREFIXES, convert_ldm_state_dict, load_ldm_checkpoint
from models.autoencoder import create_autoencoder
from models.latent_unet import create_latent_unet

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SD_CKPT = os.path.join(FIXTURES, "ldm_sd1_tiny.ckpt")
SD_SAFETENSORS = os.path.join(FIXTURES, "ldm_sd1_tiny.safetensors")
WUKONG_CKPT = os.path.join(FIXTURES, "wukong_tiny.ckpt")
TINY_HEADS = 2  # the tiny fixtures' UNet and text encoder heads (ldm_sd1_tiny.json); shapes cannot tell


def fixture_arrays(name):
    """The npz of a fixture (``ldm_sd1_tiny`` or ``wukong_tiny``)."""
    return np.load(os.path.join(FIXTURES, name + ".npz"))


def component(params, name):
    """{our name without the component prefix: array} of one component of a converted state."""
    prefix = PREFIXES[name]
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def load_networks(path, unet_dtype=None, **options):
    """(unet, vae, config) of a checkpoint, in eval mode, every parameter checked by name and shape
    (``unet_dtype``: the UNet torso's compute dtype, float32 by default)."""
    options.setdefault("num_heads", TINY_HEADS)
    options.setdefault("text_heads", TINY_HEADS)
    state, config, _ = load_ldm_checkpoint(path, **options)
    params, report = convert_ldm_state_dict(state, config)
    assert report["unexpected"] == []
    unet = create_latent_unet(**config["unet"], dtype=unet_dtype)
    vae = create_autoencoder(config["vae"]["ddconfig"], config["vae"]["embed_dim"], config["scale_factor"])
    for network, name in ((unet, "unet"), (vae, "vae")):
        load_into(network, component(params, name))  # strict: every parameter, no name left over, same shapes
        network.set_train(False)
    return unet, vae, config

