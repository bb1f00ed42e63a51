"""The latent model's sampling graphs built as for Ascend (tests/test_graph_audit.py's audit): the float16 latent
UNet under classifier-free guidance and a PLMS step, and the autoencoder's decoder, hold no float64 tensor,
no C++ CPU operator, and only primitives with an Ascend kernel."""
import numpy as np
import pytest

import mindspore as ms

from mind_diffusion.device import building_for
from mind_diffusion.sampling.latent import ContextGuidance
from mind_diffusion.sampling.schedulers import SamplingGraph, create_scheduler
from mind_diffusion.sampling.schedulers.ldm import create_ldm_diffusion
from models.autoencoder import LatentDecoder, create_autoencoder
from models.latent_unet import create_latent_unet
from tests.test_graph_audit import AUDITED_SOC, audit, exported

TINY_VAE = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


@pytest.mark.parametrize("dtype,pooled", [(ms.float16, False), (ms.bfloat16, False), (ms.float16, True)],
                         ids=["float16", "bfloat16", "float16-pooled-text"])
def test_latent_sampling_step_is_ascend_clean(dtype, pooled):
    """``pooled``: the UNet of ``model.pooled_text`` (the mean text state into AdaGN)."""
    layout = dict(pooled_context=True, use_scale_shift_norm=True) if pooled else {}
    with building_for("Ascend", AUDITED_SOC):
        unet = create_latent_unet(image_size=8, in_channels=4, out_channels=4, model_channels=32,
                                  attention_resolutions=[1, 2], num_res_blocks=1, channel_mult=[1, 2],
                                  num_head_channels=16, transformer_depth=2, context_dim=16,
                                  use_linear_in_transformer=True, dtype=dtype, **layout)
        scheduler = create_scheduler("plms", create_ldm_diffusion(prediction="v"), clip_denoised=False)
        scheduler.set_timesteps(4, "ldm")
        graph = SamplingGraph(ContextGuidance(unet, 7.5), scheduler.make_step(), ("context", "uncond"))
        x = ms.Tensor(np.zeros((1, 4, 8, 8), np.float32))
        context = ms.Tensor(np.zeros((1, 5, 16), np.float32))
        args = [x, ms.Tensor(np.zeros((1,), np.int32)), x, x, x, x, x, context, context]
        assert audit(exported(graph, args), train_step=False) == []


def test_latent_decoder_is_ascend_clean():
    with building_for("Ascend", AUDITED_SOC):
        decoder = LatentDecoder(create_autoencoder(TINY_VAE, 4))
        assert audit(exported(decoder, [ms.Tensor(np.zeros((1, 4, 16, 16), np.float32))]), train_step=False) == []
