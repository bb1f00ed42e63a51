"""The compiled train step: t ~ sampler, L(θ), gradients, all-reduce, AdamW, EMA — one graph, no branch.

Randomness comes in as inputs (uniform draws for t, Gaussian ε) that are a
function of (seed, rank, step) alone, so a resumed run sees exactly the numbers
the uninterrupted run would have seen.

Nothing in the graph branches on a tensor value. A step whose loss or gradients
overflow — on any rank — is switched off arithmetically: AdamW runs with
β1 = β2 = 1, η = 0 and zero gradients, and the EMA with rate 1, which leave
every parameter, moment and counter exactly as it was. So every rank runs the
same collectives in the same order every step (no collective inside an ``if``,
no host round trip to decide), and the graph can run many steps in a row on
the device (data sink).
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops
from mindspore.communication import GlobalComm
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

from ..checkpoints import ema_prefix
from ..kernels import multi_tensor


class WarmupLR(LearningRateSchedule):
    """AdamW's step size: lr · min(1, (s + 1) / warmup_steps) · √(1 − β2^(s+1)) / (1 − β1^(s+1)).

    The last factor is Adam's bias correction (Kingma & Ba 2015, Sec. 2):
    MindSpore's ``AdamWeightDecay`` kernel leaves it out, so it is folded into
    the step size here and the optimizer matches PyTorch's AdamW, as used by
    improved-diffusion, up to ε. Decoupled weight decay is scaled by the same
    factor, which tends to 1 after a few thousand steps.
    """

    def __init__(self, lr, warmup_steps, betas=(0.9, 0.999)):
        super().__init__()
        self.lr = float(lr)
        self.warmup_steps = max(int(warmup_steps), 0)
        self.beta1, self.beta2 = (float(b) for b in betas)

    def construct(self, global_step):
        step = global_step.astype(ms.float32) + 1.0
        correction = ops.sqrt(1.0 - ops.pow(self.beta2, step)) / (1.0 - ops.pow(self.beta1, step))
        if self.warmup_steps == 0:
            return self.lr * correction
        return self.lr * ops.minimum(step / self.warmup_steps, 1.0) * correction


class AdamW(nn.Cell):
    """AdamW (Loshchilov & Hutter 2019) whose update a boolean tensor can switch off inside the graph.

    m ← β1 m + (1 − β1) g,  v ← β2 v + (1 − β2) g²,  θ ← θ − η_s (m / (√v + ε) + λ θ),
    with η_s from a :class:`WarmupLR` at the count s of applied steps (MindSpore's
    ``AdamWeightDecay`` kernel per tensor). ``apply = False`` runs the same kernel with
    β1 = β2 = 1, η = 0 and g = 0, which leaves θ, m, v and s bit-for-bit unchanged: a
    skipped step costs no branch. On CPU with float32 parameters the same update is one
    C++ call over all tensors (:mod:`mind_diffusion.kernels.multi_tensor`), which skips
    the update when ``apply`` is False; it agrees with the kernel to float32 rounding.

    :param named_params: (name, Parameter) pairs of the trainable parameters.
    :param lr: a :class:`LearningRateSchedule` of the applied-step count.
    """

    def __init__(self, named_params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__()
        named_params = list(named_params)
        self.parameters = ParameterTuple(p for _, p in named_params)
        self.moments1 = self.parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self.parameters.clone(prefix="adam_v", init="zeros")
        self.global_step = Parameter(ms.Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.learning_rate = lr
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.kernel = ops.AdamWeightDecay()
        self.hyper_map = ops.HyperMap()
        # On CPU, one C++ call for all tensors (mind_diffusion.kernels.multi_tensor); None: the ops path.
        self.multi_tensor = multi_tensor.update_op("md_adamw", self.parameters)

    def construct(self, grads, apply):
        """One AdamW step of every parameter when ``apply``; returns a token that orders what follows
        (the EMA) after the update (:class:`TrainStep` depends on it)."""
        if self.multi_tensor is not None:
            hyper = ops.stack([apply.astype(ms.float32), self.learning_rate(self.global_step),
                               ops.fill(ms.float32, (), self.beta1), ops.fill(ms.float32, (), self.beta2),
                               ops.fill(ms.float32, (), self.eps), ops.fill(ms.float32, (), self.weight_decay)])
            done = self.multi_tensor(hyper, *self.parameters, *self.moments1, *self.moments2, *grads)
            return ops.depend(ops.assign_add(self.global_step, apply.astype(ms.int32)), done)
        zero, one = ops.zeros((), ms.float32), ops.ones((), ms.float32)
        lr = ops.select(apply, self.learning_rate(self.global_step), zero)
        beta1 = ops.select(apply, ops.fill(ms.float32, (), self.beta1), one)
        beta2 = ops.select(apply, ops.fill(ms.float32, (), self.beta2), one)
        done = self.hyper_map(
            ops.partial(self._update, apply, lr, beta1, beta2), self.parameters, self.moments1, self.moments2, grads)
        return ops.depend(ops.assign_add(self.global_step, apply.astype(ms.int32)), done)

    def _update(self, apply, lr, beta1, beta2, param, m, v, grad):
        # select, not a product: 0 · inf is NaN
        grad = ops.select(apply, grad.astype(param.dtype), ops.zeros_like(param))
        return self.kernel(param, m, v, lr, beta1, beta2, self.eps, self.weight_decay, grad)[0]


class EMA(nn.Cell):
    """Exponential moving averages θ̄ ← r θ̄ + (1 − r) θ of a model's trainable parameters, one copy per rate r.

    :param named_params: (name, Parameter) pairs, the names being the model's
        own (they key the copies in checkpoints: ``ema_<r>.<name>``).
    :param rates: decay rates r ∈ [0, 1).
    """

    def __init__(self, named_params, rates):
        super().__init__()
        self.rates = tuple(float(r) for r in rates)
        for r in self.rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"train.ema_rate values must lie in [0, 1), got {r}")
        named_params = list(named_params)
        self.names = tuple(name for name, _ in named_params)
        self.params = ParameterTuple(p for _, p in named_params)
        self.shadows = tuple(
            ParameterTuple(Parameter(ms.Tensor(p.asnumpy()), name=f"{ema_prefix(r)}{name}", requires_grad=False)
                           for name, p in named_params)
            for r in self.rates)
        # On CPU, one C++ call per rate for all tensors (mind_diffusion.kernels.multi_tensor); None: ops.
        self.multi_tensor = multi_tensor.update_op("md_ema", self.params)

    def construct(self, apply=None):
        """One averaging step; a false ``apply`` tensor uses r = 1, i.e. keeps θ̄ exactly. Returns a token
        that the caller depends on (the C++ path updates in place, out of MindSpore's sight)."""
        if self.multi_tensor is not None:
            flag = ops.ones((), ms.float32) if apply is None else apply.astype(ms.float32)
            done = flag
            for rate, shadow in zip(self.rates, self.shadows):
                # 1 − r rounded as the ops path below rounds it: in float32, or in Python without apply
                keep = ops.fill(ms.float32, (), rate)
                take = 1.0 - keep if apply is not None else ops.fill(ms.float32, (), 1.0 - rate)
                hyper = ops.stack([ops.depend(flag, done), keep, take])
                done = self.multi_tensor(hyper, *self.params, *shadow)
            return done
        for rate, shadow in zip(self.rates, self.shadows):
            r = rate
            if apply is not None:
                r = ops.select(apply, ops.fill(ms.float32, (), rate), ops.ones((), ms.float32))
            for average, param in zip(shadow, self.params):
                ops.assign(average, average * r + param * (1.0 - r))
        return True


class DiffusionLoss(nn.Cell):
    """Importance-weighted diffusion loss of a batch: mean_b w_b L(x_0^b, t_b) with t_b ~ p_t.

    ``construct(x_0, u, ε, *cond) -> (loss, t, per-example L, *per-example metrics)``, the
    metrics named by :attr:`metric_names` (here L_simple's mse and L_vlb's vb); every
    training objective of :class:`TrainStep` has this shape, and its ``num_timesteps`` (T, which
    the metrics' t quartiles divide) and ``schedule_sampler`` attributes (see also
    :mod:`mind_diffusion.train.latent`).

    :param model: ``model(x_t, t, **cond)``.
    :param diffusion: the :class:`GaussianDiffusion` trained on.
    :param schedule_sampler: a :class:`ScheduleSampler` over its steps.
    :param cond_names: names of the conditioning inputs, in call order.
    """

    metric_names = ("mse", "vb")

    def __init__(self, model, diffusion, schedule_sampler, cond_names=()):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler
        self.num_timesteps = diffusion.num_timesteps
        self.cond_names = tuple(cond_names)

    def construct(self, x_start, u, noise, *cond):
        t, weights = self.schedule_sampler(u)
        kwargs = {}
        for name, value in zip(self.cond_names, cond):
            kwargs[name] = value
        loss, mse, vb = self.diffusion.training_losses(self.model, x_start, t, noise, **kwargs)
        return (loss * weights).mean(), t, loss, mse, vb


class ClassifierLoss(nn.Cell):
    """The noisy classifier's objective (Dhariwal & Nichol 2021, Sec. 4.1): cross-entropy
    −log p_φ(y | x_t, t) on noised images x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, with t ~ p_t.

    Same call as :class:`DiffusionLoss`, the label ``y`` being the one conditioning
    input: ``construct(x_0, u, ε, y) -> (mean_b w_b CE_b, t, CE, acc@1, acc@k)``.
    acc@k is 1 when fewer than k classes score strictly above the label (a tie
    counts in the label's favour).

    :param classifier: ``classifier(x_t, t) -> logits [B, num_classes]`` (models/classifier.py).
    :param diffusion: the :class:`GaussianDiffusion` whose q(x_t | x_0) noises the images.
    :param schedule_sampler: a :class:`ScheduleSampler` over its steps.
    :param top_k: k of the second accuracy (ADM logs acc@5).
    """

    metric_names = ("acc@1", "acc@5")

    def __init__(self, classifier, diffusion, schedule_sampler, top_k=5):
        super().__init__()
        self.model = classifier
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler
        self.num_timesteps = diffusion.num_timesteps
        self.top_k = int(top_k)
        self.metric_names = ("acc@1", f"acc@{self.top_k}")

    def construct(self, x_start, u, noise, y):
        t, weights = self.schedule_sampler(u)
        x_t = self.diffusion.q_sample(x_start, t, noise)
        logits = self.model(x_t, self.diffusion.model_timesteps(t)).astype(ms.float32)
        labels = y.astype(ms.int32).reshape(-1, 1)
        losses = -ops.gather_elements(ops.log_softmax(logits, -1), 1, labels).reshape(-1)
        higher = (logits > ops.gather_elements(logits, 1, labels)).astype(ms.float32).sum(-1)
        top1 = (higher < 1.0).astype(ms.float32)
        top_k = (higher < float(self.top_k)).astype(ms.float32)
        return (losses * weights).mean(), t, losses, top1, top_k


# Overflow detection modes (see OverflowCheck).
VALUES, STATUS_REGISTER = "values", "status_register"


def overflow_mode(target):
    """How a build for ``target`` detects overflow: ``"values"`` or ``"status_register"``.

    910A always saturates (inf → ±max, NaN → 0), and 910B does in its
    ``MS_ASCEND_CHECK_OVERFLOW_MODE=SATURATION_MODE``: the values then look finite
    and only the NPU's float-status register knows. Everything else keeps
    inf/NaN in the values.
    """
    if target != "Ascend":
        return VALUES
    import os
    from mindspore._c_expression import MSContext
    context = MSContext.get_instance()
    is_910a = context.ascend_soc_supports_feature("amp_loss_scale_train_classic_target")
    is_910b = context.ascend_soc_supports_feature("train_hq_dtype_line")
    if is_910a or (is_910b and os.environ.get("MS_ASCEND_CHECK_OVERFLOW_MODE") == "SATURATION_MODE"):
        return STATUS_REGISTER
    return VALUES


class OverflowCheck(nn.Cell):
    """Did this step overflow on any rank? The same verdict on every rank.

    ``"values"``: any non-finite value in the loss or the gradients.
    ``"status_register"``: the NPU's float-status register, cleared before the
    forward pass (:meth:`start`) and read after the backward pass — the only
    witness on a saturating NPU, where the values themselves stay finite.
    Either way the local flag is all-reduced (sum) over the data-parallel group,
    so a NaN on one rank makes every rank skip the step.

    :param mode: ``"values"`` or ``"status_register"`` (see :func:`overflow_mode`).
    :param world_size: > 1 all-reduces the flag.
    :param status_ops: (clear, get) operators of the status register; default
        MindSpore's ``NPUClearFloatStatusV2`` / ``NPUGetFloatStatusV2`` (tests
        pass an emulation).
    """

    GROUP = 48  # gradients per concatenation (MindSpore's Ascend backend splits Concats of over 63 inputs)

    def __init__(self, mode=VALUES, world_size=1, status_ops=None):
        super().__init__()
        if mode not in (VALUES, STATUS_REGISTER):
            raise ValueError(f"overflow mode must be {VALUES!r} or {STATUS_REGISTER!r}, got {mode!r}")
        self.mode = mode
        self.by_register = mode == STATUS_REGISTER
        if self.by_register:
            if status_ops is None:
                from mindspore.ops.operations.math_ops import NPUClearFloatStatusV2, NPUGetFloatStatusV2
                status_ops = (NPUClearFloatStatusV2(), NPUGetFloatStatusV2())
            self.clear_status, self.get_status = status_ops
        self.distributed = world_size > 1
        self.all_reduce = ops.AllReduce() if self.distributed else None

    def start(self, after, before):
        """Clear the register once ``after`` is computed and before ``before`` is used; returns (status, before)."""
        status = ops.zeros((8,), ms.int32)
        if self.by_register:
            status = ops.depend(status, after)
            before = ops.depend(before, self.clear_status(status))
        return status, before

    def construct(self, status, loss, grads):
        if self.by_register:
            status = ops.depend(status, grads)
            local = (self.get_status(ops.depend(status, loss)) != 0).any()
        else:
            # One finiteness test per group of flattened gradients rather than one per tensor: a
            # UNet has hundreds of parameter tensors, and two kernels each (IsFinite, ReduceAll)
            # cost ~5% of a CPU train step; the concatenation is one memory pass.
            flags = [ops.isfinite(loss).all()]
            for start in range(0, len(grads), self.GROUP):
                group = [g.reshape(-1) for g in grads[start:start + self.GROUP]]
                flags.append(ops.isfinite(ops.cat(group) if len(group) > 1 else group[0]).all())
            local = ops.logical_not(ops.stack(flags).all())
        flag = local.astype(ms.float32)
        if self.distributed:
            flag = self.all_reduce(flag)
        return flag > 0.5


class StepMetrics(nn.Cell):
    """Running sums of a log interval's step outputs, kept on the device.

    The host reads them once per interval (one device→host copy) and resets
    them; the steps in between never sync. Layout of :attr:`totals`, float32:
    ``steps, skipped, streak`` (non-finite steps in a row, up to now),
    ``loss, m1 … mK`` summed over applied steps (batch means), ``loss_max,
    loss_min`` over applied steps, then for each quartile q of t:
    ``count_q, loss_q, m1_q … mK_q`` summed over its examples. m1 … mK are the
    loss's per-example metrics, reported under ``names`` (the loss cell's
    ``metric_names``: mse and vb for diffusion, accuracies for a classifier,
    l1 and kl for an autoencoder, …).
    """

    STREAK = 2  # the index of ``streak`` in every layout
    NONE = 3.0e38  # loss_min before any applied step

    def __init__(self, num_timesteps, names=DiffusionLoss.metric_names):
        super().__init__()
        self.num_timesteps = int(num_timesteps)
        self.names = tuple(names)
        slots = tuple(f"m{i + 1}" for i in range(len(self.names)))
        self.head = ("steps", "skipped", "streak", "loss") + slots + ("loss_max", "loss_min")
        self.per_quartile = ("count", "loss") + slots
        self.max_index, self.min_index = self.head.index("loss_max"), self.head.index("loss_min")
        self.totals = Parameter(ms.Tensor(self.initial()), name="step_metrics", requires_grad=False)

    def initial(self, streak=0.0):
        """The totals of an interval with no step yet (the streak carries over)."""
        totals = np.zeros(len(self.head) + 4 * len(self.per_quartile), np.float32)
        totals[self.STREAK] = streak
        totals[self.min_index] = self.NONE
        return totals

    def construct(self, applied, loss, t, losses, *metrics):
        f = applied.astype(ms.float32)
        zero = ops.zeros((), ms.float32)
        kept = [ops.select(applied, value.astype(ms.float32), ops.zeros(value.shape, ms.float32))
                for value in (losses,) + metrics]
        step_loss = ops.select(applied, loss.astype(ms.float32), zero)
        old = self.totals
        streak = ops.select(applied, zero, old[self.STREAK] + 1.0)
        loss_max = ops.maximum(old[self.max_index], step_loss)
        loss_min = ops.select(applied, ops.minimum(old[self.min_index], step_loss), old[self.min_index])
        sums = [old[4 + i] + kept[1 + i].mean() for i in range(len(metrics))]
        head = ops.stack([old[0] + 1.0, old[1] + 1.0 - f, streak, old[3] + step_loss] + sums + [loss_max, loss_min])
        quartile = ops.minimum((4 * t) // self.num_timesteps, 3)
        one_hot = ops.one_hot(quartile, 4, ops.ones((), ms.float32), zero) * f  # [B, 4]
        per_quartile = ops.stack([one_hot.sum(axis=0)] + [(one_hot * k.reshape(-1, 1)).sum(axis=0) for k in kept],
                                 axis=1)  # [4, 2 + K]: count, loss, m1 … mK
        tail = old[len(self.head):] + per_quartile.reshape(-1)
        return ops.assign(self.totals, ops.concat([head, tail]))

    def summary(self, totals):
        """The host-side dict of one interval's ``totals`` (a NumPy array)."""
        head = dict(zip(self.head, (float(v) for v in totals[:len(self.head)])))
        applied = head["steps"] - head["skipped"]
        record = {"steps": int(head["steps"]), "skipped_steps": int(head["skipped"]),
                  "nonfinite_streak": int(head["streak"])}
        public = {"loss": "loss", **{f"m{i + 1}": name for i, name in enumerate(self.names)}}
        for slot, name in public.items():
            record[name] = head[slot] / applied if applied else float("nan")
        record["loss_max"] = head["loss_max"] if applied else float("nan")
        record["loss_min"] = head["loss_min"] if applied else float("nan")
        width = len(self.per_quartile)
        for q in range(4):
            count, *sums = (float(v) for v in totals[len(self.head) + width * q: len(self.head) + width * (q + 1)])
            if count:
                for slot, value in zip(self.per_quartile[1:], sums):
                    record[f"{public[slot]}_q{q}"] = value / count
        return record


class TrainStep(nn.Cell):
    """One optimisation step of a :class:`DiffusionLoss` (or :class:`ClassifierLoss`, or a loss of
    :mod:`mind_diffusion.train.latent`), compiled as a single graph without branches.

    Order inside the graph: clear the overflow status (status-register mode),
    forward and backward (loss × loss scale for fp16), gradient all-reduce across
    data-parallel workers, the overflow verdict (all-reduced, so every rank agrees),
    the loss-scale update (MindSpore's ``DynamicLossScaleUpdateCell``: halve on
    overflow, double after 1000 clean steps), unscale, global-norm clipping, AdamW,
    EMA, the timestep sampler's loss history (fed with every worker's losses, all-
    gathered every step) and the interval metrics. An overflowed step changes
    nothing but the loss scale and the metrics.

    :param loss_net: a :class:`DiffusionLoss`, :class:`ClassifierLoss`, or a latent or autoencoder loss.
    :param optimizer: an :class:`AdamW` over the model's trainable parameters.
    :param ema: an :class:`EMA` or None.
    :param grad_clip: max global gradient norm; 0 disables clipping.
    :param loss_scale: initial dynamic loss scale, or 0 for none (fp32/bf16 training).
    :param world_size: number of data-parallel workers (> 1 all-reduces gradients).
    :param overflow: an :class:`OverflowCheck` (default: value checks, all-reduced when world_size > 1).
    """

    def __init__(self, loss_net, optimizer, ema=None, grad_clip=0.0, loss_scale=0.0, world_size=1, overflow=None):
        super().__init__()
        self.loss_net = loss_net
        # Training mode for the whole network (MindSpore's Cells start in eval mode): dropout
        # is applied, and the layers that have a training-only fast path (attention) take it.
        self.set_train(True)
        self.optimizer = optimizer
        self.ema = ema
        self.weights = optimizer.parameters
        self.grad_clip = float(grad_clip)
        self.world_size = int(world_size)
        self.scaled_loss = _ScaledLoss(loss_net)
        self.grad_fn = ops.value_and_grad(self.scaled_loss, None, self.weights, has_aux=True)
        self.use_loss_scale = loss_scale > 0
        self.loss_scale = Parameter(ms.Tensor(float(loss_scale or 1.0), ms.float32), name="loss_scale",
                                    requires_grad=False)
        self.scale_update = nn.DynamicLossScaleUpdateCell(float(loss_scale or 1.0), scale_factor=2,
                                                          scale_window=1000)
        self.overflow = overflow if overflow is not None else OverflowCheck(VALUES, world_size)
        self.metrics = StepMetrics(loss_net.num_timesteps, loss_net.metric_names)
        # A Python constant: a sampler that learns nothing (uniform, high-noise) leaves no update and no
        # all-gathers in the graph (MindSpore used to prune its no-op update with a warning).
        self.sampler_learns = loss_net.schedule_sampler.learns_from_losses
        if self.world_size > 1:
            self.grad_reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=self.world_size)
            self.all_gather = ops.AllGather(GlobalComm.WORLD_COMM_GROUP)
        else:
            self.grad_reducer = ops.identity
            self.all_gather = ops.identity

    def construct(self, x_start, u, noise, *cond):
        status, x_start = self.overflow.start(self.loss_scale, x_start)
        outputs, grads = self.grad_fn(self.loss_scale, x_start, u, noise, *cond)
        loss, t, losses, metrics = outputs[1], outputs[2], outputs[3], outputs[4:]
        grads = self.grad_reducer(grads)
        loss, grads = self.device_view(loss, grads)
        overflow = self.overflow(status, loss, grads)
        finite = ops.logical_not(overflow)
        if self.use_loss_scale:
            grads = tuple(g / self.loss_scale for g in grads)
            self.scale_update(self.loss_scale, overflow)
        if self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        # The C++ updates (kernels.multi_tensor) write the Parameters in place: these depends order the
        # EMA after AdamW and keep both in the graph; on the ops path MindSpore orders them itself.
        updated = self.optimizer(grads, finite)
        if self.ema is not None:
            updated = self.ema(ops.depend(finite, updated))
        finite = ops.depend(finite, updated)
        if self.sampler_learns:
            self.loss_net.schedule_sampler.update(self.all_gather(t), self.all_gather(losses), finite)
        self.metrics(finite, loss, t, losses, *metrics)
        return (loss, t, losses) + metrics + (finite,)

    def device_view(self, loss, grads):
        """The loss and gradients as the device holds them: as computed. A test seam: the saturation
        tests override it to emulate an NPU that clamps inf to ±max and NaN to 0."""
        return loss, grads


class _ScaledLoss(nn.Cell):
    """The loss times the loss scale (1 without mixed precision), with the unscaled outputs as aux."""

    def __init__(self, loss_net):
        super().__init__()
        self.loss_net = loss_net

    def construct(self, scale, x_start, u, noise, *cond):
        outputs = self.loss_net(x_start, u, noise, *cond)
        return (outputs[0] * scale,) + outputs
