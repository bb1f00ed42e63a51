"""Where a latent-diffusion checkpoint keeps its CLIP text encoder, and how its tensors map onto
:class:`models.clip_text.CLIPTextEncoder` (names, fused q|k|v, sizes). Names and numpy only.

Three checkpoint layouts hold the same network (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision": token + position embedding, pre-LN residual attention
blocks under a causal mask, MLP, final LayerNorm):

=============  ===========================================  =========================================
layout         where (prefix)                               what
=============  ===========================================  =========================================
``hf_clip``    ``cond_stage_model.transformer.text_model.``  SD v1: transformers ``CLIPTextModel``
               (or ``text_model.``, or none)                 (separate ``q_proj``/``k_proj``/``v_proj``)
``open_clip``  ``cond_stage_model.model.``                   SD v2: OpenCLIP ``ViT-H-14`` text tower
``wukong``     ``cond_stage_model.transformer.``             Wukong-Huahua's MindSpore ``TextEncoder``
=============  ===========================================  =========================================

Our parameter names (OpenAI CLIP's, with MindSpore's ``gamma``/``beta``/``embedding_table``), each
``[shape]`` for width W, context L, vocabulary V, MLP width M:

    token_embedding.embedding_table [V, W]; positional_embedding [L, W];
    transformer.resblocks.{i}.ln_1.gamma|beta [W]; ...attn.in_proj.weight [3W, W] (rows q; k; v),
    ...attn.in_proj.bias [3W]; ...attn.out_proj.weight [W, W] | bias; ...ln_2.gamma|beta;
    ...mlp.c_fc.weight [M, W] | bias [M]; ...mlp.c_proj.weight [W, M] | bias [W]; ln_final.gamma|beta.

:func:`text_encoder_plan` gives, for each of our names, the checkpoint keys whose arrays are
concatenated along axis 0 to make it (one key: a plain copy; SD v1's q, k, v: three keys), so a
converter needs nothing but this table and ``numpy.concatenate``. :func:`extract_text_encoder`
does exactly that and :func:`infer_text_config` reads the sizes from the shapes.

What the tensors cannot tell: the number of heads (CLIP's text towers all use width / 64:
ViT-L/14 768 → 12, ViT-H/14 1024 → 16, Wukong 768 → 12, which is the default here; pass
``heads`` for anything else), the activation (QuickGELU x·σ(1.702x) for OpenAI CLIP ViT-L/14 and
Wukong, exact GELU for OpenCLIP ViT-H/14) and the LayerNorm epsilon (1e-5 in CLIP, 1e-7 in Wukong,
whose ``mindspore.nn.LayerNorm`` keeps its default): these follow the layout.
"""
import re

import numpy as np

__all__ = [
    "HF_CLIP",
    "OPEN_CLIP",
    "WUKONG",
    "LAYOUTS",
    "TEXT_PREFIX",
    "TEXT_NUMERICS",
    "TextEncoderNamesError",
    "find_text_encoders",
    "text_encoder_plan",
    "ignored_text_keys",
    "infer_text_config",
    "extract_text_encoder",
    "layout_traits",
]

HF_CLIP = "hf_clip"
OPEN_CLIP = "open_clip"
WUKONG = "wukong"
LAYOUTS = (HF_CLIP, OPEN_CLIP, WUKONG)

# Where a converted checkpoint keeps our text encoder's names (the latent model's attribute).
TEXT_PREFIX = "cond_stage_model."

# LayerNorm epsilon of each numerics mode: CLIP's 1e-5, or Wukong's mindspore.nn.LayerNorm default 1e-7.
TEXT_NUMERICS = {"clip": 1e-5, "wukong": 1e-7}

# Of each layout: the key (after the prefix) of block 0's fused or query projection, which
# identifies it; the token embedding; the numerics; the activation; the layers SD skips at the end.
_LAYOUT_TRAITS = {
    HF_CLIP: dict(marker="encoder.layers.0.self_attn.q_proj.weight", token="embeddings.token_embedding.weight",
                  numerics="clip", activation="quick_gelu", skip_last_layers=0),
    OPEN_CLIP: dict(marker="transformer.resblocks.0.attn.in_proj_weight", token="token_embedding.weight",
                    numerics="clip", activation="gelu", skip_last_layers=1),  # SD v2 reads the penultimate layer
    WUKONG: dict(marker="transformer_layer.resblocks.0.attn.attn.in_proj.weight", token="embedding_table",
                 numerics="wukong", activation="quick_gelu", skip_last_layers=0),
}


def layout_traits(layout):
    """What a layout fixes beyond the sizes: ``activation``, ``numerics`` and ``skip_last_layers`` (and the
    ``marker`` and ``token`` names by which it is recognised)."""
    if layout not in _LAYOUT_TRAITS:
        raise ValueError(f"unknown text-encoder layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return dict(_LAYOUT_TRAITS[layout])


# Keys under a layout's prefix that are not parameters of the encoder (dropped by name).
_IGNORED = {
    HF_CLIP: ("embeddings.position_ids",),
    OPEN_CLIP: ("text_projection", "logit_scale", "attn_mask"),  # the joint-embedding head, unused by SD
    WUKONG: (),
}
_IGNORED_FOLDERS = {OPEN_CLIP: ("visual.",)}  # an OpenCLIP image tower left in the checkpoint

_BLOCK_INDEX = {
    HF_CLIP: re.compile(r"encoder\.layers\.(\d+)\."),
    OPEN_CLIP: re.compile(r"transformer\.resblocks\.(\d+)\."),
    WUKONG: re.compile(r"transformer_layer\.resblocks\.(\d+)\."),
}


class TextEncoderNamesError(ValueError):
    """A checkpoint's text-encoder tensors do not make a complete encoder: names what is wrong."""


def find_text_encoders(names):
    """Every (layout, prefix) of a CLIP text encoder among checkpoint keys ``names``, in a stable order."""
    found = set()
    for name in names:
        for layout in LAYOUTS:
            marker = _LAYOUT_TRAITS[layout]["marker"]
            if name == marker or name.endswith("." + marker):
                found.add((layout, name[: len(name) - len(marker)]))
    return sorted(found, key=lambda pair: (pair[1], pair[0]))


def _single_text_encoder(names, layout, prefix):
    """(layout, prefix) given or found; exactly one must fit."""
    candidates = [(l, p) for l, p in find_text_encoders(names)
                  if (layout is None or l == layout) and (prefix is None or p == prefix)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        wanted = f" in layout {layout!r}" if layout else ""
        wanted += f" under prefix {prefix!r}" if prefix is not None else ""
        raise TextEncoderNamesError(
            f"no CLIP text encoder{wanted} in the checkpoint: looked for a key ending in one of "
            + ", ".join(repr(t["marker"]) for t in _LAYOUT_TRAITS.values()))
    raise TextEncoderNamesError(
        f"several text encoders in the checkpoint: {candidates}; pass layout= and prefix= to choose one")


def _count_layers(names, layout, prefix):
    indices = set()
    for name in names:
        if name.startswith(prefix):
            match = _BLOCK_INDEX[layout].match(name[len(prefix):])
            if match:
                indices.add(int(match.group(1)))
    layers = max(indices) + 1 if indices else 0
    if sorted(indices) != list(range(layers)):
        raise TextEncoderNamesError(
            f"text encoder blocks under {prefix!r} are numbered {sorted(indices)}, not 0..{layers - 1}")
    return layers


def _block_sources(layout, p):
    """{our name within block: source key(s) within block} for one residual block; ``p`` = its key prefix."""
    if layout == HF_CLIP:
        a = p + "self_attn."
        return {
            "ln_1.gamma": p + "layer_norm1.weight", "ln_1.beta": p + "layer_norm1.bias",
            "attn.in_proj.weight": tuple(a + f"{x}_proj.weight" for x in "qkv"),
            "attn.in_proj.bias": tuple(a + f"{x}_proj.bias" for x in "qkv"),
            "attn.out_proj.weight": a + "out_proj.weight", "attn.out_proj.bias": a + "out_proj.bias",
            "ln_2.gamma": p + "layer_norm2.weight", "ln_2.beta": p + "layer_norm2.bias",
            "mlp.c_fc.weight": p + "mlp.fc1.weight", "mlp.c_fc.bias": p + "mlp.fc1.bias",
            "mlp.c_proj.weight": p + "mlp.fc2.weight", "mlp.c_proj.bias": p + "mlp.fc2.bias",
        }
    if layout == OPEN_CLIP:
        return {
            "ln_1.gamma": p + "ln_1.weight", "ln_1.beta": p + "ln_1.bias",
            "attn.in_proj.weight": p + "attn.in_proj_weight", "attn.in_proj.bias": p + "attn.in_proj_bias",
            "attn.out_proj.weight": p + "attn.out_proj.weight", "attn.out_proj.bias": p + "attn.out_proj.bias",
            "ln_2.gamma": p + "ln_2.weight", "ln_2.beta": p + "ln_2.bias",
            "mlp.c_fc.weight": p + "mlp.c_fc.weight", "mlp.c_fc.bias": p + "mlp.c_fc.bias",
            "mlp.c_proj.weight": p + "mlp.c_proj.weight", "mlp.c_proj.bias": p + "mlp.c_proj.bias",
        }
    return {  # WUKONG: the MLP's Dense layers sit directly in the block
        "ln_1.gamma": p + "ln_1.gamma", "ln_1.beta": p + "ln_1.beta",
        "attn.in_proj.weight": p + "attn.attn.in_proj.weight", "attn.in_proj.bias": p + "attn.attn.in_proj.bias",
        "attn.out_proj.weight": p + "attn.attn.out_proj.weight", "attn.out_proj.bias": p + "attn.attn.out_proj.bias",
        "ln_2.gamma": p + "ln_2.gamma", "ln_2.beta": p + "ln_2.beta",
        "mlp.c_fc.weight": p + "c_fc.weight", "mlp.c_fc.bias": p + "c_fc.bias",
        "mlp.c_proj.weight": p + "c_proj.weight", "mlp.c_proj.bias": p + "c_proj.bias",
    }


_BLOCK_PREFIX = {HF_CLIP: "encoder.layers.{}.", OPEN_CLIP: "transformer.resblocks.{}.",
                 WUKONG: "transformer_layer.resblocks.{}."}
_OUTSIDE_BLOCKS = {
    HF_CLIP: {"token_embedding.embedding_table": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.gamma": "final_layer_norm.weight", "ln_final.beta": "final_layer_norm.bias"},
    OPEN_CLIP: {"token_embedding.embedding_table": "token_embedding.weight",
                "positional_embedding": "positional_embedding",
                "ln_final.gamma": "ln_final.weight", "ln_final.beta": "ln_final.bias"},
    WUKONG: {"token_embedding.embedding_table": "embedding_table",
             "positional_embedding": "positional_embedding",
             "ln_final.gamma": "ln_final.gamma", "ln_final.beta": "ln_final.beta"},
}


def text_encoder_plan(layout, prefix, layers):
    """{our parameter name: tuple of checkpoint keys}: concatenating those keys' arrays along axis 0
    (in order) gives our parameter. ``prefix`` is prepended to every checkpoint key."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    plan = {ours: (prefix + theirs,) for ours, theirs in _OUTSIDE_BLOCKS[layout].items()}
    for i in range(layers):
        for ours, theirs in _block_sources(layout, prefix + _BLOCK_PREFIX[layout].format(i)).items():
            plan[f"transformer.resblocks.{i}.{ours}"] = theirs if isinstance(theirs, tuple) else (theirs,)
    return plan


def ignored_text_keys(names, layout, prefix):
    """The keys among ``names`` under ``prefix`` that a ``layout`` checkpoint holds beside the encoder's
    parameters (position ids, OpenCLIP's projection head and image tower): dropped, not errors."""
    ignored = {prefix + key for key in _IGNORED[layout]}
    folders = tuple(prefix + f for f in _IGNORED_FOLDERS.get(layout, ()))
    return sorted(n for n in names if n in ignored or (folders and n.startswith(folders)))


def infer_text_config(shapes, layout=None, prefix=None, heads=None):
    """The encoder's constructor arguments from checkpoint ``shapes`` {key: shape}.

    Returns a dict with ``layout``, ``prefix`` (where the encoder was found) and the arguments of
    :class:`models.clip_text.CLIPTextEncoder`: ``vocab_size``, ``context_length``, ``width``,
    ``layers``, ``heads`` (``heads`` if given, else width // 64), ``mlp_width``, ``activation``,
    ``numerics`` and ``skip_last_layers``.
    """
    names = list(shapes)
    layout, prefix = _single_text_encoder(names, layout, prefix)
    traits = _LAYOUT_TRAITS[layout]
    token_key = prefix + traits["token"]
    if token_key not in shapes:
        raise TextEncoderNamesError(f"text encoder under {prefix!r} has no token embedding {token_key!r}")
    vocab_size, width = (int(n) for n in shapes[token_key])
    layers = _count_layers(names, layout, prefix)
    plan = text_encoder_plan(layout, prefix, layers)
    context_length = int(shapes[plan["positional_embedding"][0]][0])
    mlp_width = int(shapes[plan["transformer.resblocks.0.mlp.c_fc.weight"][0]][0])
    if heads is None:
        heads = width // 64
        if heads < 1 or width % 64:
            raise TextEncoderNamesError(
                f"text encoder width {width} is not a multiple of 64, so its head count cannot be assumed "
                "(CLIP uses width / 64); pass the number of heads explicitly")
    if width % heads:
        raise TextEncoderNamesError(f"text encoder width {width} is not divisible by heads={heads}")
    return dict(layout=layout, prefix=prefix, vocab_size=vocab_size, context_length=context_length,
                width=width, layers=layers, heads=int(heads), mlp_width=mlp_width,
                activation=traits["activation"], numerics=traits["numerics"],
                skip_last_layers=traits["skip_last_layers"])


def _expected_shapes(config):
    """{our name: shape} of an encoder of ``config`` (infer_text_config's dict)."""
    w, m = config["width"], config["mlp_width"]
    shapes = {"token_embedding.embedding_table": (config["vocab_size"], w),
              "positional_embedding": (config["context_length"], w),
              "ln_final.gamma": (w,), "ln_final.beta": (w,)}
    block = {"ln_1.gamma": (w,), "ln_1.beta": (w,), "attn.in_proj.weight": (3 * w, w),
             "attn.in_proj.bias": (3 * w,), "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,),
             "ln_2.gamma": (w,), "ln_2.beta": (w,), "mlp.c_fc.weight": (m, w), "mlp.c_fc.bias": (m,),
             "mlp.c_proj.weight": (w, m), "mlp.c_proj.bias": (w,)}
    for i in range(config["layers"]):
        shapes.update({f"transformer.resblocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def extract_text_encoder(state_dict, layout=None, prefix=None, heads=None):
    """(params {our name: float array}, config) of the one text encoder in ``state_dict`` {key: array}.

    Every parameter must be present with the shape the sizes imply; keys under the encoder's prefix
    that are neither used nor known extras (:func:`ignored_text_keys`) are errors too. All of them
    are named in one :class:`TextEncoderNamesError`. Keys outside the prefix are not looked at.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    config = infer_text_config(shapes, layout, prefix, heads)
    plan = text_encoder_plan(config["layout"], config["prefix"], config["layers"])
    expected = _expected_shapes(config)
    missing, mismatched, params = [], [], {}
    for ours, sources in plan.items():
        absent = [k for k in sources if k not in state_dict]
        if absent:
            missing.extend(absent)
            continue
        value = np.concatenate([np.asarray(state_dict[k]) for k in sources], axis=0)
        if value.shape != expected[ours]:
            mismatched.append(f"{' + '.join(sources)}: {value.shape}, expected {expected[ours]}")
            continue
        params[ours] = value
    used = {k for sources in plan.values() for k in sources}
    used.update(ignored_text_keys(state_dict, config["layout"], config["prefix"]))
    # another encoder nested under ours (SD v1's "...transformer.text_model." under Wukong's "...transformer.")
    others = tuple(p for _, p in find_text_encoders(state_dict)
                   if p != config["prefix"] and p.startswith(config["prefix"]))
    unexpected = sorted(k for k in state_dict if k.startswith(config["prefix"]) and k not in used
                        and not (others and k.startswith(others)))
    if missing or mismatched or unexpected:
        lines = [f"text encoder ({config['layout']}, prefix {config['prefix']!r}) does not convert:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  wrong shape: {k}" for k in mismatched]
        lines += [f"  unexpected: {k}" for k in unexpected]
        raise TextEncoderNamesError("\n".join(lines))
    return params, config
