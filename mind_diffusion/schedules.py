"""Noise schedules β_1..β_T and timestep respacing.

Everything here is float64 numpy, computed once on the host; the diffusion
process turns the results into float32 Tensors.
"""
import math

import numpy as np

COSINE_OFFSET = 0.008  # s in Nichol & Dhariwal (2021), Eq. 17
MAX_BETA = 0.999       # β clip that keeps the cosine schedule from a singularity at t = T


def linear_beta_schedule(num_timesteps):
    """DDPM's linear β_t (Ho et al. 2020), rescaled so any T matches T = 1000.

    β runs from 1e-4·1000/T to 0.02·1000/T, as improved DDPM does for T ≠ 1000,
    so T must exceed 20 (β_T < 1).
    """
    if num_timesteps <= 20:
        raise ValueError(f"the linear schedule needs more than 20 steps (β_T = 20/T < 1), got {num_timesteps}; "
                         "use the cosine schedule or your own betas for fewer steps")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(t):
    """ᾱ(t) = cos²(((t + s) / (1 + s)) · π/2) for t ∈ [0, 1] (improved DDPM, Eq. 17), unnormalised."""
    return math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2


def betas_for_alpha_bar(num_timesteps, alpha_bar, max_beta=MAX_BETA):
    """β_t = min(1 − ᾱ(t/T) / ᾱ((t−1)/T), max_beta): the βs whose cumulative product follows ᾱ."""
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_beta_schedule(num_timesteps):
    """Improved DDPM's cosine schedule: ᾱ_t = f(t)/f(0), β clipped at 0.999."""
    return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)


def get_named_beta_schedule(name, num_timesteps):
    """β_1..β_T for a schedule named ``linear`` or ``cosine``."""
    if name == "linear":
        return linear_beta_schedule(num_timesteps)
    if name == "cosine":
        return cosine_beta_schedule(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}: use 'linear', 'cosine', or pass betas yourself")


# ᾱ_T that stands for 0 in a zero-terminal-SNR schedule (as diffusers does): SNR_T = 6e-8, and β_T < 1 keeps
# every table of the process finite (1/√ᾱ_T, log β̃_T).
ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def rescale_zero_terminal_snr(betas, terminal_alpha_bar=ZERO_SNR_ALPHA_BAR):
    """β' whose ᾱ' reaches zero SNR at t = T (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Algorithm 1): √ᾱ'_t = (√ᾱ_t − √ᾱ_T) · √ᾱ_1 / (√ᾱ_1 − √ᾱ_T), an affine map of √ᾱ
    that keeps √ᾱ_1 and sends √ᾱ_T to 0, then β'_t = 1 − ᾱ'_t / ᾱ'_{t−1}.

    Why: latent diffusion's β (ᾱ_T = 0.0047) leaves √ᾱ_T x_0 in x_T, so the network learns to read the
    picture's mean colour from the low frequencies of x_T, while sampling starts from pure noise, whose
    random low frequencies it then reads as a colour (the CPU demo's shape/background swaps). ᾱ'_T is
    ``terminal_alpha_bar`` (2⁻²⁴) instead of exactly 0 so that β'_T < 1; use v prediction, as the paper
    says: ε cannot be predicted from x_T = ε.

    :raises ValueError: when ᾱ'_{T−1} is not above ``terminal_alpha_bar`` (β'_T would not be in (0, 1)).
    """
    betas = check_betas(betas)
    root = np.sqrt(np.cumprod(1.0 - betas))
    first, last = root[0], root[-1]
    alphas_cumprod = ((root - last) * first / (first - last)) ** 2
    alphas_cumprod[-1] = terminal_alpha_bar
    if not alphas_cumprod[-2] > terminal_alpha_bar:
        raise ValueError(f"zero terminal SNR: ᾱ'_(T-1) = {alphas_cumprod[-2]!r} is not above ᾱ'_T = "
                         f"{terminal_alpha_bar!r}; the schedule has too little room at its end")
    return 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])


def check_betas(betas):
    """Validate user-given β_t: a 1-D float array with every value in (0, 1).

    β = 1 would make ᾱ = 0 and x̂_0 = x_t / √ᾱ_t undefined from that step on.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("every beta must lie in (0, 1); "
                         f"got min {float(betas.min())!r} and max {float(betas.max())!r}")
    return betas


def space_timesteps(num_timesteps, spec):
    """The subset of the original T steps that a respaced process keeps.

    :param num_timesteps: T, the steps of the process trained on.
    :param spec: ``"ddimK"`` keeps ``range(0, T, stride)`` with the stride that
        gives exactly K steps (DDIM's even striding); otherwise a comma-separated
        list of counts (``"50"`` or ``"10,15,20"``), one per equal section of
        [0, T), each section's count spread evenly from its first step to its
        last (improved DDPM, Sec. 4). A list of ints is taken as counts too.
    :return: a sorted list of the kept timesteps.
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("ddim"):
            want = _parse_count(spec[len("ddim"):], spec)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"timestep spec {spec!r}: no integer stride gives exactly "
                             f"{want} of {num_timesteps} steps")
        counts = [_parse_count(part, spec) for part in spec.split(",")]
    else:
        counts = [int(c) for c in spec]

    section_len, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        length = section_len + (1 if i < extra else 0)
        if count > length:
            raise ValueError(f"timestep spec {spec!r}: cannot take {count} steps "
                             f"from a section of {length}")
        stride = 1 if count <= 1 else (length - 1) / (count - 1)
        # Accumulate the fractional index rather than multiply: the rounding of
        # half-way ties then matches improved DDPM's choice of steps exactly.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += length
    return sorted(set(kept))


def _parse_count(text, spec):
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"timestep spec {spec!r}: expected counts like '50', "
                         "'10,15,20' or 'ddim50'") from None
    if count < 1:
        raise ValueError(f"timestep spec {spec!r}: step counts must be positive")
    return count


def respace_betas(alphas_cumprod, kept_timesteps):
    """β' of the process that visits only ``kept_timesteps``.

    The kept steps keep their ᾱ; each new β is 1 − ᾱ_k / ᾱ_{previous kept step},
    so q(x_t | x_0) is unchanged at every kept t (improved DDPM, Sec. 4).
    """
    new_betas, last = [], 1.0
    for t in kept_timesteps:
        new_betas.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    return np.array(new_betas, dtype=np.float64)
