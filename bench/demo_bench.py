"""What the demo-model benches share (prompt_adherence.py, sampler_quality.py): the caption-template
prompt list and loading a text-to-image checkpoint.

Imported by name: ``bench/`` is on the path when a bench runs as a script.
"""
import sys

import numpy as np


def template_prompts(count, seed, stream):
    """``count`` (prompt, wanted attributes) pairs from the demo set's caption templates.

    Shape, colour and an allowed background drawn at random from ``default_rng([seed, stream])``
    (each bench keeps its own ``stream``, so its published figures stay reproducible), languages
    alternating, templates in turn. ``wanted`` holds ``shape``, ``color`` and ``background``
    (None when the template does not name one), as ``evaluation.judge.adherence`` takes them.
    """
    from mind_diffusion.data import demo
    rng = np.random.default_rng([seed, stream])
    prompts = []
    for index in range(count):
        lang = ("en", "zh")[index % 2]
        template = (index // 2) % len(demo.TEMPLATES[lang])
        shape = demo.SHAPES[rng.integers(len(demo.SHAPES))].name
        colour = demo.COLORS[rng.integers(len(demo.COLORS))].name
        allowed = demo.ALLOWED_BACKGROUNDS[colour]
        background = allowed[rng.integers(len(allowed))]
        named = "{background}" in demo.TEMPLATES[lang][template]
        prompts.append((demo.make_caption(shape, colour, background, lang, template),
                        {"shape": shape, "color": colour, "background": background if named else None}))
    return prompts


def load_text2im(ckpt=None, raw=False):
    """(path, config, model, tokenizer) of a text-to-image training checkpoint, on the CPU in GRAPH_MODE.

    ``ckpt`` None picks the checkpoint as run_infer.sh does; ``raw`` takes the raw weights instead of
    the EMA copy. Exits with a message when the checkpoint's model takes no captions.
    """
    import mindspore as ms
    from mind_diffusion.checkpoints import checkpoint_config, model_weights, read_checkpoint, restore_state
    from mind_diffusion.cli.factory import build_model
    from mind_diffusion.cli.infer import find_checkpoint
    from mind_diffusion.config import config_from_dict

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    path = find_checkpoint(ckpt)
    checkpoint = read_checkpoint(path)
    config = config_from_dict(checkpoint_config(checkpoint))
    model, tokenizer = build_model(config.model)
    if tokenizer is None:
        sys.exit(f"{path} is not a text-to-image checkpoint")
    weights = model_weights(checkpoint, raw=raw)
    restore_state(dict(model.parameters_and_names()), {k: ms.Tensor(v.asnumpy()) for k, v in weights.items()}, path)
    model.set_train(False)
    return path, config, model, tokenizer
