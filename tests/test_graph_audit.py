"""Graph audit: the train step and sampling step of every recipe, built as for Ascend, hold only what Ascend runs.

Each recipe in configs/ is shrunk (32 channels, 16×16 images, two resolutions,
one residual block, a one-layer text encoder, batch 1) with its options kept:
architecture, class or text conditioning, learned Σ, AdaGN, BiG-GAN up/down
blocks, attention order, dropout, model.dtype, loss, parametrisation, clipping,
EMA, loss scale, and the sampler with its guidance (recipes that then differ only in settings no graph
sees, e.g. mnist and fashion_mnist, are audited once, as one group). Both graphs are built and
compiled inside ``building_for("Ascend", "910B")`` — so the C++ CPU operators are
off, float64 is not used and FlashAttention is chosen where it applies — by the
graph compiler's front end only, as ``ms.export`` does (no CPU kernel is
selected, so ops that exist only on Ascend compile here), and their MindIR is
checked:

- no tensor in any graph is float64;
- no ``Custom`` operator (the C++ kernels are CPU-only);
- no control flow (``Switch``, ``SwitchLayer``, ``ConditionSwitch``, ...) in the
  train step: every branch there would be decided on the host;
- every primitive is in tests/data/ascend_primitives.txt, the list generated from
  MindSpore's own op definitions by scripts/gen_ascend_primitives.py.
"""
import dataclasses
import glob
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops
from mindspore.common.api import _cell_graph_executor
from mindspore.train import mind_ir_pb2

from mind_diffusion.cli.factory import build_diffusion, build_model
from mind_diffusion.config import DIGIT_KINDS, load_config
from mind_diffusion.device import building_for
from mind_diffusion.generate import ImageGenerator
from mind_diffusion.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
PRIMITIVES_FILE = os.path.join(ROOT, "tests", "data", "ascend_primitives.txt")
CONTROL_FLOW = {"Switch", "SwitchLayer", "ConditionSwitch", "ConditionGather", "While", "If"}
FLOAT64 = {mind_ir_pb2.TensorProto.DOUBLE, mind_ir_pb2.TensorProto.FLOAT64}
BATCH, IMAGE, CHANNELS, TEXT_CTX = 1, 16, 32, 8
LATENT_VOCAB = os.path.join(ROOT, "configs", "demo_vocab.txt")
# The chip the recipes are audited for: 910B-class, the superset (FlashAttention for the fp16
# recipes; 910A graphs differ only in taking the ops path there, whose primitives the fp32 recipes use).
AUDITED_SOC = "910B"


def ascend_primitives():
    with open(PRIMITIVES_FILE, encoding="utf-8") as f:
        return {line.split()[0] for line in f if line.strip() and not line.startswith("#")}


def shrunk(path):
    """The recipe at test size, its structure and options kept."""
    config = load_config(path)
    model = config.model
    # MNIST and Fashion-MNIST images are 32×32 by construction (28×28 padded; config refuses other sizes).
    image = model.image_size if config.data.kind in DIGIT_KINDS else IMAGE
    overrides = [
        f"model.image_size={image}", f"model.num_channels={CHANNELS}", "model.channel_mult=[1, 2]",
        "model.num_res_blocks=1", f"model.attention_resolutions=[{image // 2}]",
        f"train.batch_size={BATCH}", "train.init_from=''", f"sample.batch_size={BATCH}",
        "sample.steps=4", f"sample.num_samples={BATCH}",
    ]
    if model.num_head_channels > 0:
        overrides.append(f"model.num_head_channels={CHANNELS}")
    if model.arch in ("glide", "glide_upsample"):
        overrides += ["model.xf_width=32", "model.xf_layers=1", "model.xf_heads=2", f"model.text_ctx={TEXT_CTX}"]
    if model.arch == "glide_upsample":
        overrides.append(f"model.low_res_size={IMAGE // 2}")
    if model.arch in ("latent", "autoencoder"):
        # a factor-2 autoencoder (8×8 latents, attention at 8 as above), random weights instead of the recipe's
        # files, the demo's vocabulary (a latent model's); the text context stays 77 (the tokenizers')
        overrides += ["model.ae_channels=32", "model.ae_channel_mult=[1, 2]", "model.ae_num_res_blocks=1",
                      "model.unet_from=''", "model.text_encoder_from=''", "model.autoencoder_from=''",
                      "model.xf_width=32", "model.xf_layers=1", "model.xf_heads=2"]
    if model.arch == "latent":
        overrides.append(f"model.vocab={LATENT_VOCAB}")
    return load_config(path, overrides)


def fake_column(name, config, tokenizer, noise_shape):
    """A batch column of the right shape and dtype (values do not matter to the graph)."""
    c, side = config.model.in_channels, config.model.image_size
    images = np.zeros((BATCH, c, side, side), np.float32)
    columns = {"images": images, "noise": np.zeros((BATCH, *noise_shape), np.float32),
               "u": np.full((BATCH,), 0.5, np.float32),
               "labels": np.zeros((BATCH,), np.int32)}
    if tokenizer is not None:
        columns["tokens"], columns["mask"] = tokenizer(["a"] * BATCH)
    if config.model.low_res_size:
        columns["low_res"] = np.zeros((BATCH, c, config.model.low_res_size, config.model.low_res_size), np.float32)
    if name not in columns:
        raise KeyError(f"the audit cannot fake the train step's column {name!r}: add it to fake_column")
    return ms.Tensor(columns[name])


def exported(cell, args):
    """The MindIR model of ``cell`` compiled for ``args``.

    This is the first half of ``ms.export(..., file_format="MINDIR")``: the graph
    compiler's front end (parse, type inference, autodiff, optimisation), no CPU
    kernel selection, then the MindIR of every graph. The public call cannot be
    used for the train step: it refuses Parameters created outside a Cell's
    ``__init__`` (the EMA copies), and writes the weights, which the audit does not need.
    """
    graph_id, _ = _cell_graph_executor.compile(cell, *args, phase="export.mindir", do_convert=False)
    model = mind_ir_pb2.ModelProto()
    model.ParseFromString(_cell_graph_executor._get_func_graph_proto(cell, graph_id, "mind_ir"))
    return model


def train_step_ir(config, tmp_path):
    model, tokenizer = build_model(config.model)
    diffusion = build_diffusion(config.diffusion, config.model)
    trainer = Trainer(config, model, diffusion, str(tmp_path / "run"), tokenizer=tokenizer)
    args = [fake_column(name, config, tokenizer, trainer.noise_shape) for name in trainer.step_columns]
    return exported(trainer.train_step, args)


def guided_sampling_step_ir(classifier_config):
    """A classifier recipe's sampling graph: a UNet of its size, guided by it (run_infer --classifier),
    with the classifier's gradient in the graph, on the DDPM scheduler (the mean shift μ + Σ g)."""
    from mind_diffusion.sampling.guidance import ClassifierGuidance
    from mind_diffusion.sampling.schedulers import SamplingGraph, create_scheduler
    classifier, _ = build_model(classifier_config.model)
    unet_config = dataclasses.replace(classifier_config.model, arch="unet", learn_sigma=True)
    model, _ = build_model(unet_config)
    diffusion = build_diffusion(classifier_config.diffusion, unet_config, respaced=False)
    scheduler = create_scheduler("ddpm", diffusion).set_timesteps(4)
    graph = SamplingGraph(model, scheduler.make_step(guided=True), (), ClassifierGuidance(classifier, 1.0), 1)
    x = ms.Tensor(np.zeros((BATCH, unet_config.in_channels, unet_config.image_size, unet_config.image_size), np.float32))
    return exported(graph, [x, ms.Tensor(np.zeros((BATCH,), np.int32)), x, ms.Tensor(np.zeros((BATCH,), np.int32))])


def latent_sampling_step_ir(config):
    """A latent recipe's sampling graph as run_infer runs its export: the recipe's sampler on CompVis's steps,
    the UNet under classifier-free guidance on text states; an autoencoder recipe's: the latent decoder."""
    from mind_diffusion.config import unet_side
    from mind_diffusion.sampling.latent import ContextGuidance
    from mind_diffusion.sampling.schedulers import SamplingGraph, create_scheduler
    from models.autoencoder import LatentDecoder
    model, _ = build_model(config.model)
    m = config.model
    side = IMAGE // 2  # the shrunk autoencoder's factor 2
    if m.arch == "autoencoder":
        return exported(LatentDecoder(model), [ms.Tensor(np.zeros((BATCH, m.latent_channels, side, side), np.float32))])
    assert unet_side(m) == side
    s = config.sample
    eta = s.eta if s.sampler in ("ddim", "euler_a") else None
    scheduler = create_scheduler(s.sampler, build_diffusion(config.diffusion, m, respaced=False), eta=eta,
                                 clip_denoised=False).set_timesteps(s.steps, "ldm")
    graph = SamplingGraph(ContextGuidance(model.unet, s.guidance_scale), scheduler.make_step(guided=False),
                          ("context", "uncond"))
    z = ms.Tensor(np.zeros((BATCH, m.latent_channels, side, side), np.float32))
    context = ms.Tensor(np.zeros((BATCH, m.text_ctx, m.xf_width), np.float32))
    return exported(graph, [z, ms.Tensor(np.zeros((BATCH,), np.int32)), z, *(z,) * scheduler.history_size,
                            context, context])


def sampling_step_ir(config):
    """The step graph that run_infer.sh and the periodic grids run, with the recipe's sampler and guidance."""
    if config.model.arch == "classifier":
        return guided_sampling_step_ir(config)
    if config.model.arch in ("latent", "autoencoder"):
        return latent_sampling_step_ir(config)
    model, tokenizer = build_model(config.model)
    diffusion = build_diffusion(config.diffusion, config.model, respaced=False)
    image_shape = (config.model.in_channels, config.model.image_size, config.model.image_size)
    generator = ImageGenerator(model, diffusion, image_shape, tokenizer,
                               config.model.num_classes if config.model.class_cond else 0,
                               low_res_size=config.model.low_res_size)
    s = config.sample
    sampler = generator._sampler(s.sampler, s.steps, s.eta, s.guidance_scale, s.clip_denoised, False)
    cond = generator.conditioning(prompts=["a"] * BATCH, labels=[0] * BATCH, scale=s.guidance_scale,
                                  low_res=np.zeros((BATCH, *image_shape[:1], config.model.low_res_size,
                                                    config.model.low_res_size), np.float32)
                                  if config.model.low_res_size else None)
    names = tuple(sorted(cond))
    x = ms.Tensor(np.zeros((BATCH, *image_shape), np.float32))
    args = [x, ms.Tensor(np.zeros((BATCH,), np.int32)), x, *(cond[n] for n in names)]
    return exported(sampler.step_graph(names), args)


def primitives(model):
    return {p.op_type for p in model.primitives}


def _attribute_tensors(attribute):
    yield from attribute.tensors
    if attribute.HasField("t"):
        yield attribute.t


def float64_nodes(model):
    """Where float64 tensors occur (node outputs and constants, graph inputs/outputs, parameters), every graph."""
    found = []
    primitive_of = {p.name: p.op_type for p in model.primitives}  # node.op_type is "REF::<primitive key>"
    for graph in [model.graph, *model.functions]:
        for node in graph.node:
            if any(t.data_type in FLOAT64 for a in node.attribute for t in _attribute_tensors(a)):
                op = node.op_type[len("REF::"):] if node.op_type.startswith("REF::") else node.op_type
                found.append(f"{primitive_of.get(op, op)} at {node.domain or node.name}")
        for value in [*graph.input, *graph.output]:
            if any(t.data_type in FLOAT64 for t in value.tensor):
                found.append(f"graph value {value.name}")
        found += [f"parameter {p.name}" for p in graph.parameter if p.data_type in FLOAT64]
    return found


def audit(model, train_step):
    problems = []
    prims = primitives(model)
    float64 = float64_nodes(model)
    if float64:
        problems.append(f"float64 tensors ({len(float64)}): {float64[:5]}")
    if "Custom" in prims:
        problems.append("a Custom operator (C++ CPU kernel) is in the graph")
    if train_step and prims & CONTROL_FLOW:
        problems.append(f"host-side control flow in the train step: {sorted(prims & CONTROL_FLOW)}")
    unknown = sorted(prims - ascend_primitives() - {"Custom"})
    if unknown:
        problems.append(f"primitives without an Ascend kernel in {os.path.relpath(PRIMITIVES_FILE, ROOT)}: {unknown}")
    return problems


# Settings that never reach a compiled graph (data source and bookkeeping; the learning rate is a constant of
# the step). Recipes that differ only in these build the same two graphs once shrunk, so each group is
# audited once, under the names of all its recipes. A precomputed-latent source does change the train step.
GRAPH_FREE = {"name", "seed", "data.path", "data.demo_size", "data.demo_seed", "data.num_workers",
              "data.python_multiprocessing", "train.total_steps", "train.log_every", "train.save_every",
              "train.sample_every", "train.keep_checkpoints", "train.out_dir", "train.lr"}


def graph_settings(config):
    """The settings of a (shrunk) recipe that can shape its graphs, as a comparable string."""
    flat = {f"{section}.{key}": value for section, fields in dataclasses.asdict(config).items()
            if isinstance(fields, dict) for key, value in fields.items()}
    flat["data.kind"] = flat["data.kind"] == "latents"
    return repr(sorted((key, value) for key, value in flat.items() if key not in GRAPH_FREE))


def recipe_groups():
    """(first recipe's path, "name+name…") of each group of recipes with the same graph settings."""
    groups = {}
    for path in RECIPES:
        groups.setdefault(graph_settings(shrunk(path)), []).append(path)
    return [(paths[0], "+".join(os.path.basename(p)[:-5] for p in paths)) for paths in groups.values()]


GROUPS = recipe_groups()


def test_every_recipe_is_audited_and_only_graph_free_settings_are_shared():
    audited = [name for _, names in GROUPS for name in names.split("+")]
    assert sorted(audited) == sorted(os.path.basename(p)[:-5] for p in RECIPES)
    mnist = shrunk(os.path.join(ROOT, "configs", "mnist.yaml"))
    assert graph_settings(mnist) == graph_settings(shrunk(os.path.join(ROOT, "configs", "fashion_mnist.yaml")))
    # a setting that shapes a graph separates recipes; a graph-free one does not
    changed = dataclasses.replace(mnist, model=dataclasses.replace(mnist.model, dropout=0.3))
    assert graph_settings(changed) != graph_settings(mnist)
    moved = dataclasses.replace(mnist, train=dataclasses.replace(mnist.train, lr=0.5, total_steps=7))
    assert graph_settings(moved) == graph_settings(mnist)


@pytest.mark.parametrize("path", [p for p, _ in GROUPS], ids=[names for _, names in GROUPS])
def test_train_step_is_ascend_clean(path, tmp_path):
    with building_for("Ascend", AUDITED_SOC):
        model = train_step_ir(shrunk(path), tmp_path)
    assert audit(model, train_step=True) == []


@pytest.mark.parametrize("path", [p for p, _ in GROUPS], ids=[names for _, names in GROUPS])
def test_sampling_step_is_ascend_clean(path):
    with building_for("Ascend", AUDITED_SOC):
        model = sampling_step_ir(shrunk(path))
    assert audit(model, train_step=False) == []


def test_the_audit_sees_float64_custom_ops_and_branches():
    """The checks can fail: a graph with each fault is reported."""
    class Faulty(nn.Cell):
        def __init__(self):
            super().__init__()
            self.custom = ops.Custom(lambda x: x, out_shape=lambda x: x, out_dtype=lambda x: x, func_type="pyfunc")

        def construct(self, x):
            y = self.custom(ops.exp(x.astype(ms.float64)).astype(ms.float32))
            if y.sum() > 0:
                y = ops.Einsum("ij->ji")(y)
            return y

    model = exported(Faulty(), [ms.Tensor(np.ones((2, 2), np.float32))])
    problems = audit(model, train_step=True)
    assert problems[0].startswith("float64 tensors (") and "Exp at " in problems[0]
    assert problems[1] == "a Custom operator (C++ CPU kernel) is in the graph"
    assert problems[2] == "host-side control flow in the train step: ['Switch']"
    assert problems[3] == "primitives without an Ascend kernel in tests/data/ascend_primitives.txt: ['Einsum', 'Switch']"
    assert audit(model, train_step=False)[2:] == problems[3:]


# ---- FlashAttention: chosen only where it exists, and fed the right layout

FLASH_CASES = [  # (target, soc, dtype, channels, head channels) → FlashAttentionScore in the graph?
    (("Ascend", "910B", ms.float16, 64, 32), True),
    (("Ascend", "910B", ms.bfloat16, 64, 32), True),
    (("Ascend", "910B", ms.float32, 64, 32), False),  # float32: the ops path
    (("Ascend", "910B", ms.float16, 96, 24), False),  # d = 24 is not a multiple of 16
    (("Ascend", "910A", ms.float16, 64, 32), False),  # 910A has no FlashAttentionScore
    (("Ascend", None, ms.float16, 64, 32), False),    # chip unknown (a CPU machine): not assumed
    (("CPU", None, ms.float16, 64, 32), False),
]


@pytest.mark.parametrize("case, flash", FLASH_CASES,
                         ids=[f"{t}-{soc}-{dtype}-d{d}" for (t, soc, dtype, _, d), _ in FLASH_CASES])
def test_flash_attention_only_where_it_exists(case, flash):
    from models.unet import AttentionBlock

    target, soc, dtype, channels, head_channels = case
    with building_for(target, soc):
        block = AttentionBlock(channels, num_head_channels=head_channels, use_new_attention_order=True)
        block.set_train(True)
        model = exported(block, [ms.Tensor(np.zeros((1, channels, 4, 4), np.float32)).astype(dtype)])
    assert ("FlashAttentionScore" in primitives(model)) == flash
    assert audit(model, train_step=False) == []


def reference_flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                                    attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                                    keep_prob=1.0, scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647,
                                    inner_precise=0, input_layout="BSH", sparse_mode=0):
    """``ops.flash_attention_score``'s documented result for the arguments the UNet passes, in float32 on CPU:
    softmax(scalar_value · Q Kᵀ) V per (batch, head) in the BNSD layout, N = head_num."""
    if input_layout != "BNSD" or query.shape[1] != head_num:
        raise ValueError("the reference covers input_layout BNSD with N = head_num only")
    q, k, v = query.astype(ms.float32), key.astype(ms.float32), value.astype(ms.float32)
    weights = ops.softmax(ops.matmul(q, k.swapaxes(-1, -2)) * scalar_value, -1)
    return ops.matmul(weights, v).astype(query.dtype)


def attention64(qkv, heads, new_order, encoder_kv=None):
    """NumPy float64 multi-head attention on ADM's packed qkv ([N, 3·H·d, T]) in either head order."""
    n, width, length = qkv.shape
    d = width // (3 * heads)
    if new_order:
        q, k, v = (part.reshape(n * heads, d, length) for part in np.split(qkv, 3, axis=1))
    else:
        q, k, v = np.split(qkv.reshape(n * heads, 3 * d, length), 3, axis=1)
    if encoder_kv is not None:
        if new_order:
            ek, ev = (part.reshape(n * heads, d, -1) for part in np.split(encoder_kv, 2, axis=1))
        else:
            ek, ev = np.split(encoder_kv.reshape(n * heads, 2 * d, -1), 2, axis=1)
        k, v = np.concatenate([ek, k], axis=-1), np.concatenate([ev, v], axis=-1)
    logits = np.einsum("rdt,rds->rts", q, k) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("rds,rts->rdt", v, weights).reshape(n, heads * d, length)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy_order", "new_order"])
@pytest.mark.parametrize("with_text", [False, True], ids=["self", "with_encoder_kv"])
def test_flash_attention_layout_against_numpy(monkeypatch, new_order, with_text):
    """The BNSD transform around flash_attention_score, with a reference standing in for the Ascend kernel."""
    import models.unet as unet
    from graph_util import run

    monkeypatch.setattr(unet, "flash_attention_score", reference_flash_attention_score)
    heads, d, length, text = 2, 16, 6, 3
    rng = np.random.default_rng(5)
    qkv = rng.normal(0, 1, (2, 3 * heads * d, length)).astype(np.float16)
    extra = (rng.normal(0, 1, (2, 2 * heads * d, text)).astype(np.float16),) if with_text else ()
    with building_for("Ascend", "910B"):
        attention = unet.QKVAttention(heads) if new_order else unet.QKVAttentionLegacy(heads)
        got = run(attention, "construct", ms.Tensor(qkv), *(ms.Tensor(e) for e in extra))
    want = attention64(qkv.astype(np.float64), heads, new_order, *(e.astype(np.float64) for e in extra))
    assert got.dtype == np.float16 and got.shape == want.shape
    # float16 inputs, float32 inside, one float16 rounding of the output (values of size ~1: ulp 2^-10)
    assert np.abs(got - want).max() <= 2e-3
