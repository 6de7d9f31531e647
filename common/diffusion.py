"""Gaussian diffusion maths shared by the four papers.

Everything here is the standard DDPM/DDIM machinery; the papers only differ in *what* they feed it:
    DDPM  Ho et al. 2020, arXiv 2006.11239    forward process, posterior, ancestral sampler (Alg. 2)
    DDIM  Song et al. 2021, arXiv 2010.02502  deterministic / eta-stochastic sampler on any step subset
    CFG   Ho & Salimans 2022, arXiv 2207.12598 classifier-free guidance (LVDM Eq. 9, VQ-VDM Eq. 9)

Conventions
    alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s   (VideoFusion writes hat-alpha_t)
    t is a 0-based index into the schedule: t = 0 is the least noisy step, t = T-1 the noisiest.
    The schedule is kept in float64; a coefficient is used in float32 or better, whatever the sample's dtype
    (in bf16, sqrt(1 - alpha_bar_0) = 0.0387 would round to 0 and the first steps would add no noise).

Samplers take a callable `eps = eps_fn(x_t, t)` with t a LongTensor (B,). Guidance, masks, conditioning and
VideoFusion's decomposed noise are wrappers around that callable (or around `noise_fn`, which draws the fresh
noise of stochastic steps), never forks of the sampler.
"""
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


# --- Noise schedules ---

def make_betas(kind: str, T: int = 1000, beta_start: Optional[float] = None,
               beta_end: Optional[float] = None) -> torch.Tensor:
    """beta_1..beta_T as a float64 tensor of length T.

    linear       DDPM: beta linear from 1e-4 to 0.02 (Ho et al. 2020, §4).
    sqrt_linear  latent diffusion's "linear": sqrt(beta) linear from sqrt(0.0015) to sqrt(0.0195); LVDM uses
                 beta_end 0.0155, PVDM 0.0195 (official LVDM configs/lvdm_short/*.yaml, PVDM
                 configs/latent-diffusion/base.yaml).
    cosine       alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008, beta clipped at 0.999
                 (Nichol & Dhariwal 2021, Eq. 17).
    """
    if kind == "linear":
        start, end = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "sqrt_linear":
        start, end = beta_start or 0.0015, beta_end or 0.0195
        return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {kind!r}: expected linear, sqrt_linear or cosine")


def coef_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a coefficient multiplies a sample x in: x's own when it is float32 or wider, else float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _gather(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """a[t] on x's device, shaped (B, 1, 1, ...) to broadcast against x, in `dtype` (default coef_dtype(x))."""
    out = a.to(t.device)[t].to(dtype or coef_dtype(x))
    return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class Schedule:
    """A fixed beta schedule and the closed forms that follow from it. Every coefficient is formed in float64 and
    cast only when it meets a sample: with DDPM's beta_1 = 1e-4, 1 - alpha_bar_0 formed in float32 keeps about 3
    significant digits."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.T = len(betas)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)
        # alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (the clean data)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = self.alpha_bar.sqrt(), (1 - self.alpha_bar).sqrt()

    @classmethod
    def make(cls, kind: str, T: int = 1000, beta_start=None, beta_end=None) -> "Schedule":
        return cls(make_betas(kind, T, beta_start, beta_end))

    def alpha_bar_like(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t shaped (B, 1, 1, ...) to broadcast against x, in float64 (callers cast the coefficients
        they build from it), with alpha_bar_{-1} = 1 ('the step after the last')."""
        return _gather(torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar]), t + 1, x, torch.float64)

    def noise_std(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """sqrt(1 - alpha_bar_t), the standard deviation of the noise in x_t, shaped and typed for x."""
        return _gather(self.sqrt_one_minus_alpha_bar, t, x)

    # --- forward process q(x_t | x_0) ---

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).  DDPM Eq. (4)."""
        return _gather(self.sqrt_alpha_bar, t, x0) * x0 + self.noise_std(t, x0) * noise

    # --- conversions between the three parameterisations ---

    def predict_x0(self, x_t, t, eps):
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).  DDPM Eq. (4) solved for x_0."""
        return (x_t - self.noise_std(t, x_t) * eps) / _gather(self.sqrt_alpha_bar, t, x_t)

    def predict_eps(self, x_t, t, x0):
        """eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t).  DDPM Eq. (4) solved for eps."""
        return (x_t - _gather(self.sqrt_alpha_bar, t, x_t) * x0) / self.noise_std(t, x_t)

    def v_from_eps(self, x0, t, eps):
        """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0  (Salimans & Ho 2022, §4)."""
        return _gather(self.sqrt_alpha_bar, t, x0) * eps - self.noise_std(t, x0) * x0

    def eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v  (the inverse of v_from_eps given x_t)."""
        return self.noise_std(t, x_t) * x_t + _gather(self.sqrt_alpha_bar, t, x_t) * v

    # --- posterior q(x_{t-1} | x_t, x_0) ---

    def q_posterior_mean_variance(self, x0, x_t, t, variance: str = "fixed_small"):
        """Mean and variance of q(x_{t-1} | x_t, x_0).  DDPM Eq. (6)-(7).

        mean = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
               + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
        var  = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t      ("fixed_small")
             or beta_t                                                              ("fixed_large", DDPM §3.2)
        """
        return posterior(_gather(self.alpha_bar, t, x_t, torch.float64),
                         _gather(self.alpha_bar_prev, t, x_t, torch.float64), x0, x_t, variance, first_step=(t == 0))


def posterior(ab_t, ab_prev, x0, x_t, variance="fixed_small", first_step=None):
    """q(x_prev | x_t, x_0) for any pair of steps, given their alpha_bar (float64).  DDPM Eq. (7) with beta_t
    replaced by the effective beta of the jump, 1 - alpha_bar_t / alpha_bar_prev (respacing, Nichol & Dhariwal
    2021 §4). The coefficients are formed in float64 and cast to coef_dtype(x_t)."""
    dt = coef_dtype(x_t)
    beta = 1 - ab_t / ab_prev
    c0 = ab_prev.sqrt() * beta / (1 - ab_t)
    c1 = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
    mean = c0.to(dt) * x0 + c1.to(dt) * x_t
    small = beta * (1 - ab_prev) / (1 - ab_t)
    if variance == "fixed_small":
        return mean, small.to(dt)
    if variance == "fixed_large":
        # beta_t, except at the first step where it would add noise to the final sample: there DDPM's
        # reference code uses beta_tilde_1, which is what keeps log-variance finite; we follow it.
        if first_step is not None:
            first = first_step.reshape(-1, *([1] * (x_t.dim() - 1)))
            return mean, torch.where(first, small, beta).to(dt)
        return mean, beta.to(dt)
    raise ValueError(f"unknown variance {variance!r}: expected fixed_small or fixed_large")


# --- Samplers ---

def ddpm_sample(eps_fn: EpsFn, x_T: torch.Tensor, sched: Schedule, steps: Optional[int] = None, *,
                variance: str = "fixed_small", clip_x0: Optional[float] = None,
                noise_fn: NoiseFn = torch.randn_like, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling, DDPM Algorithm 2: x_prev = mu(x_t, x0_hat) + sigma_t z, from the noisiest step down.

    x0_hat comes from eps_fn through predict_x0, optionally clipped to [-clip_x0, clip_x0]; without clipping
    the mean equals DDPM Eq. (11), 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps).
    steps=None runs all T steps; fewer steps run the same chain on an evenly respaced schedule (Nichol &
    Dhariwal 2021, §4). noise_fn(x) draws the fresh noise z of a step (VideoFusion decomposes it).
    """
    ts = ddim_timesteps(sched.T, steps or sched.T)
    x, B = x_T, x_T.shape[0]
    for i, step in enumerate(tqdm(ts, disable=not progress, desc="ddpm", leave=False)):
        t = torch.full((B,), step, device=x.device, dtype=torch.long)
        t_prev = torch.full_like(t, ts[i + 1] if i + 1 < len(ts) else -1)
        x0 = sched.predict_x0(x, t, eps_fn(x, t))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean, var = posterior(sched.alpha_bar_like(t, x), sched.alpha_bar_like(t_prev, x), x0, x, variance,
                              first_step=(t_prev == -1))
        x = mean if i + 1 == len(ts) else mean + var.sqrt() * noise_fn(x)   # no noise at the last step (Alg. 2)
    return x


def ddim_timesteps(T: int, steps: int) -> list:
    """`steps` timesteps spread evenly over [0, T-1], noisiest first (DDIM §4.2 'uniform' spacing). The first is
    always T-1, where x_T is pure noise: a single step goes from T-1 straight to the data."""
    if not 1 <= steps <= T:
        raise ValueError(f"expected between 1 and {T} sampling steps, got {steps}")
    if steps == 1:
        return [T - 1]
    ts = np.unique(np.linspace(0, T - 1, steps).round().astype(np.int64))
    return [int(s) for s in ts[::-1]]


def ddim_step(sched: Schedule, x_t, t, t_prev, eps, *, eta: float = 0.0, noise=None,
              clip_x0: Optional[float] = None):
    """One DDIM update from step t to step t_prev < t (t_prev = -1 means the clean data).  DDIM Eq. (12):

    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z,
    sigma  = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)  (Eq. 16).
    Returns (x_prev, x0_hat).
    """
    ab_t, ab_prev = sched.alpha_bar_like(t, x_t), sched.alpha_bar_like(t_prev, x_t)     # float64
    x0 = sched.predict_x0(x_t, t, eps)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = sched.predict_eps(x_t, t, x0)   # keep eps consistent with the clipped x0
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    dt = coef_dtype(x_t)
    x_prev = ab_prev.sqrt().to(dt) * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt().to(dt) * eps
    if eta > 0:
        x_prev = x_prev + sigma.to(dt) * noise
    return x_prev, x0


def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, sched: Schedule, steps: Union[int, Sequence[int]] = 50, *,
                eta: float = 0.0, clip_x0: Optional[float] = None, noise_fn: NoiseFn = torch.randn_like,
                progress: bool = False) -> torch.Tensor:
    """DDIM sampling over `steps` evenly spaced timesteps (or an explicit descending list of them).

    eta = 0 is deterministic; eta = 1 on consecutive steps is DDPM with the fixed-small variance.
    """
    ts = ddim_timesteps(sched.T, steps) if isinstance(steps, int) else [int(s) for s in steps]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"expected strictly decreasing timesteps, got {ts}")
    x, B = x_T, x_T.shape[0]
    for i, step in enumerate(tqdm(ts, disable=not progress, desc="ddim", leave=False)):
        t = torch.full((B,), step, device=x.device, dtype=torch.long)
        t_prev = torch.full((B,), ts[i + 1] if i + 1 < len(ts) else -1, device=x.device, dtype=torch.long)
        noise = noise_fn(x) if eta > 0 else None
        x, _ = ddim_step(sched, x, t, t_prev, eps_fn(x, t), eta=eta, noise=noise, clip_x0=clip_x0)
    return x


# --- Classifier-free guidance ---

def cfg_lvdm(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. (9), LVDM §3.4: (1 + w) eps_c - w eps_u.  w = 0 is the plain conditional model."""
    return (1 + w) * eps_c - w * eps_u


def cfg_vqvdm(eps_c: torch.Tensor, eps_u: torch.Tensor, w: float) -> torch.Tensor:
    """Eq. (9), VQ-VDM §2.4: w (eps_c - eps_u) + eps_u.  w = 1 is the plain conditional model, so
    cfg_vqvdm(w) == cfg_lvdm(w - 1)."""
    return w * (eps_c - eps_u) + eps_u


def guided(eps_cond: EpsFn, eps_uncond: EpsFn, w: float, rule: Callable = cfg_lvdm) -> EpsFn:
    """Wrap a conditional and an unconditional eps callable into one guided callable for any sampler."""
    def eps_fn(x_t, t):
        return rule(eps_cond(x_t, t), eps_uncond(x_t, t), w)
    return eps_fn
