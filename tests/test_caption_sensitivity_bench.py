"""bench/caption_sensitivity.py: its swapped captions change exactly one attribute, and a run of it on a tiny
latent export prints both tables."""
import os

import numpy as np
import pytest

from mind_diffusion.data.demo import DemoSet, prompt_to_attributes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def bench(bench_script):
    return bench_script("caption_sensitivity")


def test_a_swap_changes_one_attribute_in_the_items_language(bench):
    demo = DemoSet(24, 32, seed=1)
    attributes = [demo[i][2] for i in range(24)]
    captions, new_shapes = bench.caption_variants(attributes, np.random.default_rng(0))
    named = []
    for item, variants, new_shape in zip(attributes, captions, new_shapes):
        true = prompt_to_attributes(variants["true"])
        background = true["background"]  # the item's, or None where the template names none
        assert background in (item["background"], None)
        named.append(background is not None)
        assert (true["shape"], true["color"]) == (item["shape"], item["color"])
        shape = prompt_to_attributes(variants["shape swapped"])
        assert new_shape != item["shape"]
        assert (shape["shape"], shape["color"], shape["background"]) == (new_shape, item["color"], background)
        colour = prompt_to_attributes(variants["colour swapped"])
        assert (colour["shape"], colour["background"]) == (item["shape"], background)
        assert colour["color"] not in (item["color"], item["background"])
        assert variants["empty"] == ""
        chinese = any("\u4e00" <= ch <= "\u9fff" for ch in variants["true"])
        assert chinese == (item["lang"] == "zh")
    assert 0 < sum(named) < len(named)  # the templates vary over the items: some name the background


def test_it_runs_on_a_latent_export(bench, tmp_path, capsys):
    """Both tables, every row, from a tiny random latent model's export (v-prediction, pooled text)."""
    import mindspore as ms
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.config import config_from_dict
    from mind_diffusion.convert import load_into
    from mind_diffusion.train.latent import export_config, write_export_weights
    vocab = os.path.join(ROOT, "configs", "demo_vocab.txt")
    config = config_from_dict({
        "model": {"arch": "latent", "image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": [1, 2],
                  "attention_resolutions": [4], "num_head_channels": 32, "vocab": vocab, "text_ctx": 77,
                  "xf_width": 32, "xf_layers": 1, "xf_heads": 2, "ae_channels": 32, "ae_channel_mult": [1, 2],
                  "ae_num_res_blocks": 1, "latent_channels": 4, "scale_factor": 0.5, "pooled_text": True},
        "diffusion": {"steps": 1000, "noise_schedule": "scaled_linear", "predict_v": True}})
    ms.set_seed(0)
    model, _ = build_model(config.model)
    rng = np.random.default_rng(0)
    load_into(model.unet, {p.name: rng.normal(0, 0.05, p.shape).astype(np.float32)
                           for p in model.unet.get_parameters()})
    path = str(tmp_path / "tiny.ckpt")
    write_export_weights(path, {name: p.asnumpy() for name, p in model.parameters_and_names()},
                         export_config(model.parts, config))
    bench.main(["--ckpt", path, "--n", "4", "--vocab", vocab])
    out = capsys.readouterr().out
    assert "velocity prediction" in out
    for t in bench.LOSS_STEPS + bench.X0_STEPS:
        assert f"\n| {t} | " in out
    assert out.count("\n| ") == 2 + len(bench.LOSS_STEPS) + len(bench.X0_STEPS)  # two headers, the rows
    with pytest.raises(SystemExit, match="holds one set of weights"):
        bench.main(["--ckpt", path, "--n", "4", "--vocab", vocab, "--weights", "ema"])
