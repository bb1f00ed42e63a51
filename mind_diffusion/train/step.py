"""The compiled train step: t ~ sampler, L(θ), gradients, all-reduce, AdamW, EMA — one graph.

Randomness comes in as inputs (uniform draws for t, Gaussian ε) from the
host's counter-based generator, so a resumed run sees exactly the numbers the
uninterrupted run would have seen.
"""
import re

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops
from mindspore.communication import GlobalComm
from mindspore.nn.learning_rate_schedule import LearningRateSchedule


class WarmupLR(LearningRateSchedule):
    """AdamW's step size: lr · min(1, (s + 1) / warmup_steps) · √(1 − β2^(s+1)) / (1 − β1^(s+1)).

    The last factor is Adam's bias correction (Kingma & Ba 2015, Sec. 2):
    MindSpore's ``nn.AdamWeightDecay`` (the AdamW with a CPU kernel) leaves it
    out, so it is folded into the step size here and the optimizer matches
    PyTorch's AdamW, as used by improved-diffusion, up to ε. Decoupled weight
    decay is scaled by the same factor, which tends to 1 after a few thousand steps.
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

    def construct(self):
        for rate, shadow in zip(self.rates, self.shadows):
            for average, param in zip(shadow, self.params):
                ops.assign(average, average * rate + param * (1.0 - rate))
        return True


_EMA_NAME = re.compile(r"^ema_(\d+(?:\.\d+)?(?:e-?\d+)?)\.(.+)$")


def ema_prefix(rate):
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


class DiffusionLoss(nn.Cell):
    """Importance-weighted diffusion loss of a batch: mean_b w_b L(x_0^b, t_b) with t_b ~ p_t.

    :param model: ``model(x_t, t, **cond)``.
    :param diffusion: the :class:`GaussianDiffusion` trained on.
    :param schedule_sampler: a :class:`ScheduleSampler` over its steps.
    :param cond_names: names of the conditioning inputs, in call order.
    """

    def __init__(self, model, diffusion, schedule_sampler, cond_names=()):
        super().__init__()
        self.model = model
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler
        self.cond_names = tuple(cond_names)

    def construct(self, x_start, u, noise, *cond):
        t, weights = self.schedule_sampler(u)
        kwargs = {}
        for name, value in zip(self.cond_names, cond):
            kwargs[name] = value
        loss, mse, vb = self.diffusion.training_losses(self.model, x_start, t, noise, **kwargs)
        return (loss * weights).mean(), t, loss, mse, vb


class TrainStep(nn.Cell):
    """One optimisation step of a :class:`DiffusionLoss`, compiled as a single graph.

    Order inside the graph: forward and backward (loss × loss scale when mixed
    precision is on), gradient all-reduce across data-parallel workers, unscale,
    overflow check, global-norm clipping, AdamW, EMA, and the timestep
    sampler's loss history (fed with every worker's losses). A step whose
    gradients overflow changes nothing but the loss scale.

    :param loss_net: a :class:`DiffusionLoss`.
    :param optimizer: e.g. ``nn.AdamWeightDecay`` over the model's trainable parameters.
    :param ema: an :class:`EMA` or None.
    :param grad_clip: max global gradient norm; 0 disables clipping.
    :param loss_scale: initial dynamic loss scale, or 0 for none (float32 training).
    :param world_size: number of data-parallel workers (> 1 all-reduces gradients).
    """

    def __init__(self, loss_net, optimizer, ema=None, grad_clip=0.0, loss_scale=0.0, world_size=1):
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
        self.good_steps = Parameter(ms.Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        self.scale_window = 1000
        if self.world_size > 1:
            self.grad_reducer = nn.DistributedGradReducer(self.weights, mean=True, degree=self.world_size)
            self.all_gather = ops.AllGather(GlobalComm.WORLD_COMM_GROUP)
        else:
            self.grad_reducer = ops.identity
            self.all_gather = ops.identity

    def construct(self, x_start, u, noise, *cond):
        (_, loss, t, losses, mse, vb), grads = self.grad_fn(self.loss_scale, x_start, u, noise, *cond)
        grads = self.grad_reducer(grads)
        finite = ops.isfinite(loss).all()
        if self.use_loss_scale:
            grads = tuple(g / self.loss_scale for g in grads)
            finite = ops.logical_and(finite, self._all_finite(grads))
            self._adjust_scale(finite)
        if self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        if finite:
            self.optimizer(grads)
            if self.ema is not None:
                self.ema()
            self.loss_net.schedule_sampler.update(self.all_gather(t), self.all_gather(losses))
        return loss, t, losses, mse, vb, finite

    @staticmethod
    def _all_finite(grads):
        flags = [ops.isfinite(g).all() for g in grads]
        return ops.stack(flags).all()

    def _adjust_scale(self, finite):
        """Dynamic loss scaling: halve on overflow, double after scale_window good steps."""
        good = ops.select(finite, self.good_steps + 1, ops.zeros_like(self.good_steps))
        grow = good >= self.scale_window
        scale = ops.select(finite, ops.select(grow, self.loss_scale * 2.0, self.loss_scale),
                           ops.maximum(self.loss_scale / 2.0, 1.0))
        ops.assign(self.loss_scale, scale)
        ops.assign(self.good_steps, ops.select(grow, ops.zeros_like(good), good))


class _ScaledLoss(nn.Cell):
    """The loss times the loss scale (1 without mixed precision), with the unscaled outputs as aux."""

    def __init__(self, loss_net):
        super().__init__()
        self.loss_net = loss_net

    def construct(self, scale, x_start, u, noise, *cond):
        loss, t, losses, mse, vb = self.loss_net(x_start, u, noise, *cond)
        return loss * scale, loss, t, losses, mse, vb
