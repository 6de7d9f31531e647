"""Property tests of common/diffusion.py: every identity the samplers rely on."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from common.diffusion import (Schedule, cfg_lvdm, cfg_vqvdm, ddim_sample, ddim_step, ddim_timesteps, ddpm_sample,
                              guided, make_betas)

KINDS = st.sampled_from(["linear", "sqrt_linear", "cosine"])
settings.register_profile("vidiff", deadline=None, max_examples=40)
settings.load_profile("vidiff")


def schedule(kind, T=1000, **kw):
    return Schedule.make(kind, T, **kw)


@given(KINDS, st.integers(2, 2000))
def test_alpha_bar_is_strictly_decreasing_inside_unit_interval(kind, T):
    ab = schedule(kind, T).alpha_bar
    assert ab.dtype == torch.float64
    assert (ab > 0).all() and (ab < 1).all()
    assert (ab[1:] < ab[:-1]).all()


def test_each_schedule_is_its_papers_definition():
    linear = make_betas("linear", 1000)
    assert torch.allclose(linear[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))     # DDPM §4
    assert torch.allclose(linear.diff(), linear.diff()[0].expand(999))
    sqrt_linear = make_betas("sqrt_linear", 1000)                                               # LDM's "linear"
    assert torch.allclose(sqrt_linear[[0, -1]], torch.tensor([0.0015, 0.0195], dtype=torch.float64))
    ab = Schedule.make("cosine", 1000).alpha_bar                                                # iDDPM Eq. (17)

    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_betas("cosine", 1000).max().item() == pytest.approx(0.999)                      # clipped


@given(st.floats(0.0005, 0.005), st.floats(0.01, 0.03))
def test_sqrt_linear_schedule_interpolates_sqrt_beta(start, end):
    betas = make_betas("sqrt_linear", 1000, start, end)
    assert torch.allclose(betas[[0, -1]], torch.tensor([start, end], dtype=torch.float64))
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[0].expand(999))


@given(KINDS, st.integers(0, 999), st.floats(-1, 1), st.integers(0, 2 ** 31))
def test_q_sample_moments_match_closed_form(kind, t, x0, seed):
    sched = schedule(kind)
    n = 40_000
    g = torch.Generator().manual_seed(seed)
    x0s = torch.full((n, 1), x0, dtype=torch.float64)
    xt = sched.q_sample(x0s, torch.full((n,), t), torch.randn(n, 1, generator=g, dtype=torch.float64))
    ab = sched.alpha_bar[t]
    std = (1 - ab).sqrt()
    assert abs(xt.mean() - ab.sqrt() * x0) < 5 * std / n ** 0.5
    assert abs(xt.var() / (1 - ab) - 1) < 0.05


@given(KINDS, st.integers(1, 999), st.integers(0, 2 ** 31))
def test_posterior_equals_gaussian_conditioning(kind, t, seed):
    """q(x_{t-1} | x_t, x_0) from Bayes' rule on q(x_{t-1}|x_0) q(x_t|x_{t-1}), derived independently."""
    sched = schedule(kind)
    g = torch.Generator().manual_seed(seed)
    x0, xt = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mean, var = sched.q_posterior_mean_variance(x0[None], xt[None], torch.tensor([t]))
    a, ab_prev, beta = sched.alphas[t], sched.alpha_bar[t - 1], sched.betas[t]
    precision = 1 / (1 - ab_prev) + a / beta
    expected_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + a.sqrt() * xt / beta) / precision
    assert torch.allclose(mean[0], expected_mean, atol=1e-9)
    assert torch.allclose(var.flatten(), (1 / precision).reshape(1), rtol=1e-9)


@given(KINDS, st.integers(1, 999))
def test_fixed_large_variance_is_beta(kind, t):
    sched = schedule(kind)
    x = torch.zeros(1, 2, dtype=torch.float64)
    _, var = sched.q_posterior_mean_variance(x, x, torch.tensor([t]), "fixed_large")
    assert torch.allclose(var.flatten(), sched.betas[t].reshape(1))


@given(KINDS, st.integers(0, 999), st.integers(0, 2 ** 31))
def test_posterior_mean_from_predicted_x0_is_ddpm_eq_11(kind, t, seed):
    sched = schedule(kind)
    g = torch.Generator().manual_seed(seed)
    xt, eps = torch.randn(2, 1, 4, generator=g, dtype=torch.float64)
    tt = torch.tensor([t])
    mean, _ = sched.q_posterior_mean_variance(sched.predict_x0(xt, tt, eps), xt, tt)
    a, ab = sched.alphas[t], sched.alpha_bar[t]
    assert torch.allclose(mean, (xt - (1 - a) / (1 - ab).sqrt() * eps) / a.sqrt(), atol=1e-9)


@given(KINDS, st.integers(0, 999), st.integers(0, 2 ** 31))
def test_eps_x0_v_conversions_round_trip(kind, t, seed):
    sched = schedule(kind)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    tt = torch.full((2,), t)
    xt = sched.q_sample(x0, tt, eps)
    assert torch.allclose(sched.predict_x0(xt, tt, eps), x0, atol=1e-6)
    assert torch.allclose(sched.predict_eps(xt, tt, x0), eps, atol=1e-6)
    assert torch.allclose(sched.eps_from_v(xt, tt, sched.v_from_eps(x0, tt, eps)), eps, atol=1e-9)


def toy_eps(x, t):
    """A fixed nonlinear stand-in for a network."""
    return torch.tanh(x) * 0.5 + t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) / 2000


@given(st.integers(1, 50), st.integers(0, 2 ** 31))
def test_ddim_with_eta_zero_is_deterministic(steps, seed):
    sched = schedule("linear")
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed))
    a = ddim_sample(toy_eps, x_T, sched, steps, eta=0.0)
    b = ddim_sample(toy_eps, x_T, sched, steps, eta=0.0, noise_fn=lambda x: torch.randn_like(x) * 100)
    assert torch.equal(a, b)


@given(KINDS, st.lists(st.integers(0, 999), min_size=1, max_size=30, unique=True), st.integers(0, 2 ** 31))
def test_ddim_with_true_noise_recovers_x0_on_any_step_subset(kind, steps, seed):
    sched = schedule(kind)
    ts = sorted(steps, reverse=True)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)
    x_T = sched.q_sample(x0, torch.full((2,), ts[0]), eps)
    out = ddim_sample(lambda x, t: eps, x_T, sched, ts, eta=0.0)
    assert torch.allclose(out, x0, atol=1e-9)


@given(KINDS, st.integers(2, 999), st.integers(0, 2 ** 31))
def test_clipped_ddim_step_moves_along_the_noise_of_the_clipped_x0(kind, t, seed):
    """DDIM Eq. (12) with x0_hat clipped: the direction term must use the eps that the clipped x0_hat implies."""
    sched = schedule(kind)
    g = torch.Generator().manual_seed(seed)
    x_t, eps = torch.randn(2, 1, 6, generator=g, dtype=torch.float64) * 3
    tt, tp = torch.tensor([t]), torch.tensor([t // 2])
    x_prev, x0 = ddim_step(sched, x_t, tt, tp, eps, clip_x0=0.5)
    assert x0.abs().max() <= 0.5
    ab_prev = sched.alpha_bar[t // 2]
    expected = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * sched.predict_eps(x_t, tt, x0)
    assert torch.allclose(x_prev, expected, atol=1e-9)


@given(KINDS, st.integers(1, 999), st.integers(0, 2 ** 31))
def test_one_step_ddim_with_eta_one_is_the_ddpm_posterior(kind, t, seed):
    sched = schedule(kind)
    g = torch.Generator().manual_seed(seed)
    xt, eps = torch.randn(2, 1, 5, generator=g, dtype=torch.float64)
    tt, tp = torch.tensor([t]), torch.tensor([t - 1])
    no_noise, x0 = ddim_step(sched, xt, tt, tp, eps, eta=1.0, noise=torch.zeros_like(xt))
    unit_noise, _ = ddim_step(sched, xt, tt, tp, eps, eta=1.0, noise=torch.ones_like(xt))
    mean, var = sched.q_posterior_mean_variance(x0, xt, tt)
    assert torch.allclose(no_noise, mean, atol=1e-9)
    assert torch.allclose((unit_noise - no_noise) ** 2, var.expand_as(xt), rtol=1e-7, atol=1e-12)


def test_ddpm_sample_with_true_noise_at_every_step_stays_on_the_data():
    """If the network always returns the noise that produced x_t, each posterior mean is built from the true x0;
    with no fresh noise the chain lands exactly on x0."""
    sched = schedule("linear", 200)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, generator=g, dtype=torch.float64)
    eps_of = lambda x, t: sched.predict_eps(x, t, x0)
    out = ddpm_sample(eps_of, torch.randn(2, 3, generator=g, dtype=torch.float64), sched,
                      noise_fn=torch.zeros_like)
    assert torch.allclose(out, x0, atol=1e-9)


def test_ddim_timesteps_span_the_schedule_noisiest_first():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert ddim_timesteps(1000, 1) == [999]          # one step starts from pure noise, not from t = 0
    for k in (1, 2, 20, 100, 999):
        ts = ddim_timesteps(1000, k)
        assert len(ts) == k and ts == sorted(set(ts), reverse=True) and ts[0] == 999
        assert k == 1 or ts[-1] == 0


def test_one_step_samplers_denoise_from_the_noisiest_step():
    """With the true noise, one DDIM or DDPM step from x_{T-1} lands on x0: the step starts at T-1."""
    sched = schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    x_T = sched.q_sample(x0, torch.full((2,), sched.T - 1), eps)
    seen = []

    def eps_fn(x, t):
        seen.append(t.tolist())
        return eps

    assert torch.allclose(ddim_sample(eps_fn, x_T, sched, 1), x0, atol=1e-9)
    assert torch.allclose(ddpm_sample(eps_fn, x_T, sched, 1), x0, atol=1e-9)
    assert seen == [[999, 999]] * 2


@pytest.mark.parametrize("t", [0, 1, 5, 20])
def test_q_sample_adds_the_schedules_noise_to_bf16_latents(t):
    """Under autocast latents arrive in bf16; the coefficients must not be rounded to bf16 with them (at t = 0,
    sqrt(1 - alpha_bar) = 0.0387 rounds to 0 in bf16). The noise added equals sqrt(1 - alpha_bar_t) eps up to the
    bf16 rounding of the result, not of the coefficient."""
    sched = schedule("sqrt_linear")
    g = torch.Generator().manual_seed(t)
    x0 = (torch.rand(64, 4, generator=g) * 2 - 1).bfloat16()
    eps = torch.randn(64, 4, generator=g).bfloat16()
    tt = torch.full((64,), t)
    ab = sched.alpha_bar[t]
    added = sched.q_sample(x0, tt, eps).double() - ab.sqrt() * x0.double()
    expected = (1 - ab).sqrt() * eps.double()
    result_rounding = 2 ** -8 * (ab.sqrt() * x0.double()).abs() + 1e-6      # half an ulp of the bf16 result
    assert ((added - expected).abs() <= result_rounding).all()
    assert (added - expected).abs().max() < 0.01 * expected.abs().max()
    x0_hat = sched.predict_x0(sched.q_sample(x0, tt, eps), tt, eps)
    assert x0_hat.dtype == torch.float32 and torch.allclose(x0_hat, x0.float(), atol=1e-5)


@given(st.floats(-5, 5), st.integers(0, 2 ** 31))
def test_guidance_conventions_agree_when_w_vqvdm_is_one_plus_w_lvdm(w, seed):
    g = torch.Generator().manual_seed(seed)
    eps_c, eps_u = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(cfg_vqvdm(eps_c, eps_u, 1 + w), cfg_lvdm(eps_c, eps_u, w), atol=1e-12)
    assert torch.equal(cfg_lvdm(eps_c, eps_u, 0.0), eps_c)
    assert torch.equal(cfg_vqvdm(eps_c, eps_u, 0.0), eps_u)
    fn = guided(lambda x, t: eps_c, lambda x, t: eps_u, w)
    assert torch.allclose(fn(None, None), cfg_lvdm(eps_c, eps_u, w))


@given(KINDS, st.integers(2, 200), st.integers(0, 2 ** 31))
def test_respaced_ddpm_equals_ddim_with_eta_one(kind, steps, seed):
    """On the same step subset, DDPM with the fixed-small variance and DDIM with eta = 1 are one chain."""
    sched = schedule(kind)
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    noises = torch.randn(steps, 2, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)

    def replay():
        it = iter(noises)
        return lambda x: next(it)

    a = ddpm_sample(toy_eps, x_T, sched, steps, noise_fn=replay())
    b = ddim_sample(toy_eps, x_T, sched, steps, eta=1.0, noise_fn=replay())
    assert torch.allclose(a, b, atol=1e-9)
