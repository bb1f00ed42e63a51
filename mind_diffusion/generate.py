"""Sampling images from a trained model: prompts or labels in, [-1, 1] images out.

Shared by the trainer's periodic sample grids, ``run_infer.sh`` and the
benchmarks. The model is any network trained on ``diffusion``; for text models
a tokenizer turns prompts into (tokens, mask), and a guidance scale other than
1 wraps the model in classifier-free guidance; a super-resolution model (GLIDE's
upsampler) also takes the low-resolution images to enlarge. Compiled step graphs are cached
per (sampler, steps, η, scale), and every batch has the same size (the last
one is padded), so repeated calls reuse the graphs.
"""
import numpy as np
import mindspore as ms

from .sampling import create_sampler, schedulers
from .sampling.guidance import ClassifierFreeGuidance, ClassifierGuidance

# GaussianDiffusion needs two steps (β̃ at t = 0 is borrowed from t = 1), so a respacing does too.
MIN_SAMPLING_STEPS = 2
# ddpm and ddim run through the Sampler classes (the schedulers of the same names draw bit for bit the same);
# the others are schedulers of mind_diffusion.sampling.schedulers.
SAMPLER_NAMES = tuple(schedulers.SCHEDULERS)


class ImageGenerator:
    """Draws samples with the recipe's samplers.

    :param model: ``model(x, t, **cond)`` trained on ``diffusion``.
    :param diffusion: the trained (un-respaced) :class:`GaussianDiffusion`.
    :param image_shape: (C, H, W) of the samples.
    :param tokenizer: prompts → (tokens, mask), for text-conditioned models.
    :param num_classes: > 0 for class-conditional models (labels are passed as ``y``).
    :param low_res_size: > 0 for super-resolution models (``low_res`` [N, C, s, s] in [-1, 1]).
    :param classifier: a noisy classifier ``classifier(x_t, t) -> logits`` trained on the same
        process, for classifier guidance (ADM): :meth:`sample` with ``labels`` and a
        ``classifier_scale`` > 0 steers every step toward the labels. It combines with
        classifier-free guidance of a text model.
    """

    def __init__(self, model, diffusion, image_shape, tokenizer=None, num_classes=0, low_res_size=0,
                 classifier=None):
        self.model = model
        self.low_res_size = int(low_res_size)
        self.diffusion = diffusion
        self.image_shape = tuple(image_shape)
        self.tokenizer = tokenizer
        self.num_classes = num_classes
        self.classifier = classifier
        self._samplers = {}

    def check_request(self, count, steps, batch_size):
        """Refuse sampling settings that cannot be honoured (rather than quietly running others)."""
        total = self.diffusion.num_timesteps
        if int(count) < 1:
            raise ValueError(f"the number of images must be at least 1, got {count}")
        if int(batch_size) < 1:
            raise ValueError(f"the batch size must be at least 1, got {batch_size}")
        if not MIN_SAMPLING_STEPS <= int(steps) <= total:
            raise ValueError(f"sampling steps must lie in {MIN_SAMPLING_STEPS}..{total} (the model was trained "
                             f"with T = {total} diffusion steps; a respaced process needs at least "
                             f"{MIN_SAMPLING_STEPS}), got {steps}")

    def _guided_model(self, scale):
        """The model, wrapped in classifier-free guidance for a text model at a scale other than 0 and 1."""
        if self.tokenizer is not None and scale not in (0.0, 1.0):
            uncond_tokens, uncond_mask = self.tokenizer.unconditional(1)
            return ClassifierFreeGuidance(self.model, scale, uncond_tokens, uncond_mask,
                                          eps_channels=self.image_shape[0])
        return self.model

    def _respaced(self, steps):
        """The trained process on ``steps`` steps (itself at its own length)."""
        diffusion = self.diffusion
        if steps == diffusion.num_timesteps:
            return diffusion
        if diffusion.num_timesteps != diffusion.original_num_steps:
            raise ValueError(f"the process is already respaced to {diffusion.num_timesteps} of its "
                             f"{diffusion.original_num_steps} steps (diffusion.timestep_respacing), so it cannot "
                             f"be sampled on {steps}: sample with {diffusion.num_timesteps} steps, or build the "
                             "process without timestep_respacing")
        return diffusion.respace(str(steps))

    def _sampler(self, name, steps, eta, scale, clip_denoised, progress, classifier_scale=0.0):
        if name not in ("ddpm", "ddim") or classifier_scale:
            return self._scheduler(name, steps, eta, scale, clip_denoised, progress, classifier_scale)
        key = (name, steps, eta, scale, clip_denoised)
        if key not in self._samplers:
            self._samplers[key] = create_sampler(name, self._respaced(steps), self._guided_model(scale), eta=eta,
                                                 clip_denoised=clip_denoised)
        sampler = self._samplers[key]
        sampler.progress = progress
        return sampler

    def _scheduler(self, name, steps, eta, scale, clip_denoised, progress, classifier_scale=0.0):
        """A scheduler-driven walker with the Sampler's ``sample(shape, model_kwargs, seed)`` call.

        The schedulers take classifier guidance in their step graph (DDPM and DDIM too, drawing
        the same numbers as the Sampler classes), so a guided request always comes here.
        """
        key = (name, steps, eta, scale, clip_denoised, classifier_scale)
        if key not in self._samplers:
            diffusion = self.diffusion
            if diffusion.num_timesteps != diffusion.original_num_steps:
                raise ValueError(f"sampler {name!r} respaces the trained process itself, but this one is already "
                                 f"respaced to {diffusion.num_timesteps} of its {diffusion.original_num_steps} steps "
                                 "(diffusion.timestep_respacing): build the process without timestep_respacing")
            # sample.eta is DDIM's η: Euler ancestral keeps its own (1), the others have none.
            scheduler = schedulers.create_scheduler(name, diffusion, clip_denoised=clip_denoised,
                                                    eta=eta if name == "ddim" else None)
            cond_fn = ClassifierGuidance(self.classifier, classifier_scale) if classifier_scale else None
            self._samplers[key] = _SchedulerWalker(scheduler.set_timesteps(steps), self._guided_model(scale),
                                                   cond_fn)
        walker = self._samplers[key]
        walker.progress = progress
        return walker

    def guide_inputs(self, labels, classifier_scale):
        """The classifier's inputs ``{"y": labels}`` under classifier guidance, else None."""
        if not classifier_scale:
            return None
        if self.classifier is None:
            raise ValueError("classifier guidance needs a classifier (ImageGenerator(classifier=...))")
        if labels is None:
            raise ValueError("classifier guidance steers toward class labels: give labels")
        labels = np.asarray(labels, np.int32)
        if labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {labels.min()}")
        return {"y": ms.Tensor(labels)}

    def conditioning(self, prompts=None, labels=None, scale=1.0, low_res=None):
        """The model's keyword inputs for a batch of prompts or labels (and low-res images)."""
        if self.tokenizer is not None:
            if prompts is None:
                raise ValueError("this is a text-to-image model: give prompts")
            # Scale 0 is the unconditional model: the empty caption, no second pass.
            tokens, mask = self.tokenizer([""] * len(prompts) if scale == 0.0 else list(prompts))
            cond = {"tokens": ms.Tensor(tokens), "mask": ms.Tensor(mask)}
            if self.low_res_size:
                cond["low_res"] = ms.Tensor(self._checked_low_res(low_res, len(prompts)))
            return cond
        if self.num_classes:
            if labels is None:
                raise ValueError(f"this is a class-conditional model ({self.num_classes} classes): give labels")
            labels = np.asarray(labels, np.int32)
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
            return {"y": ms.Tensor(labels)}
        return {}

    def _checked_low_res(self, low_res, count):
        if low_res is None:
            raise ValueError("this is a super-resolution model: give the low-resolution images to enlarge")
        low_res = np.asarray(low_res, np.float32)
        want = (count, self.image_shape[0], self.low_res_size, self.low_res_size)
        if low_res.shape != want:
            raise ValueError(f"low-resolution images must be {want} (N, C, H, W in [-1, 1]); got {low_res.shape}")
        return low_res

    def sample(self, count, prompts=None, labels=None, sampler="ddim", steps=50, eta=0.0,
               guidance_scale=1.0, batch_size=16, seed=0, clip_denoised=True, progress=False, low_res=None,
               classifier_scale=0.0):
        """``count`` images as float32 [count, C, H, W] in [-1, 1].

        :param sampler: one of :data:`SAMPLER_NAMES` (ddpm, ddim, plms, dpm++2m, dpm++3m, euler_a); η is DDIM's.
        :param guidance_scale: classifier-free guidance scale of a text model.
        :param classifier_scale: s of classifier guidance (0 = none); the labels are then the
            classifier's targets, and the model's own condition too if it is class-conditional.

        Prompts (or labels, or low-resolution images) are cycled to ``count``;
        sample i of the same seed is the same image whatever ``count`` is, as
        long as the batch size is.

        :raises ValueError: for ``count`` or ``batch_size`` below 1, or ``steps``
            outside 2..T (T = the trained process's ``num_timesteps``).
        """
        self.check_request(count, steps, batch_size)
        if prompts is not None:
            prompts = [prompts[i % len(prompts)] for i in range(count)]
        if labels is not None:
            labels = [labels[i % len(labels)] for i in range(count)]
        if low_res is not None:
            low_res = np.asarray(low_res, np.float32)
            low_res = low_res[np.arange(count) % len(low_res)]
        classifier_scale = float(classifier_scale)
        walker = self._sampler(sampler, int(steps), float(eta),
                               float(guidance_scale), clip_denoised, progress, classifier_scale)
        batches = []
        for start in range(0, count, batch_size):
            index = [min(i, count - 1) for i in range(start, start + batch_size)]  # pad the last batch
            cond = self.conditioning(None if prompts is None else [prompts[i] for i in index],
                                     None if labels is None else [labels[i] for i in index],
                                     float(guidance_scale), None if low_res is None else low_res[index])
            guide = self.guide_inputs(None if labels is None else [labels[i] for i in index], classifier_scale)
            guided = {} if guide is None else {"cond_kwargs": guide}
            images = walker.sample((batch_size,) + self.image_shape, model_kwargs=cond,
                                   seed=seed * 1_000_003 + start, **guided)
            batches.append(images.asnumpy()[:min(batch_size, count - start)])
        return np.concatenate(batches)[:count]


class _SchedulerWalker:
    """A scheduler, its model and its classifier guidance (or None) behind the
    ``sample(shape, model_kwargs, seed)`` call of the Sampler classes."""

    def __init__(self, scheduler, model, cond_fn=None):
        self.scheduler = scheduler
        self.model = model
        self.cond_fn = cond_fn
        self.progress = False

    def sample(self, shape, model_kwargs=None, seed=0, cond_kwargs=None):
        return schedulers.sample(self.model, shape, self.scheduler, seed=seed, model_kwargs=model_kwargs,
                                 cond_fn=self.cond_fn, cond_kwargs=cond_kwargs, progress=self.progress)
