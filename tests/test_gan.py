"""common/gan.py on fixed inputs: each loss equals its equation, the adaptive weight the ratio of two known gradient
norms, the alternation and the start step their rules."""
import math

import pytest
import torch

from common.gan import (PatchGAN, adaptive_weight, feature_matching, frozen, generator_turn, hinge_d_loss, hinge_g_loss,
                        started, vanilla_d_loss, vanilla_g_loss)


def full(value, shape=(2, 1, 3, 3)):
    return torch.full(shape, float(value))


def test_hinge_losses_vanish_beyond_the_margins():
    assert hinge_d_loss(full(2), full(-2)).item() == 0.0
    assert hinge_d_loss(full(0), full(0)).item() == 1.0                   # 1/2 (1 + 1)
    assert hinge_d_loss(full(0.5), full(-2)).item() == pytest.approx(0.25)
    assert hinge_g_loss(full(-1.5)).item() == 1.5


def test_vanilla_losses_are_the_log_likelihoods_of_the_logits():
    assert vanilla_d_loss(full(0), full(0)).item() == pytest.approx(math.log(2))
    assert vanilla_d_loss(full(30), full(-30)).item() == pytest.approx(0.0, abs=1e-12)
    assert vanilla_g_loss(full(0)).item() == pytest.approx(math.log(2))
    assert vanilla_g_loss(full(2)).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_feature_matching_sums_layer_means():
    fake = [full(1, (2, 3)), full(3, (4,))]
    real = [full(0, (2, 3)), full(1, (4,))]
    assert feature_matching(fake, real, "l1").item() == pytest.approx(1 + 2)
    assert feature_matching(fake, real, "l2").item() == pytest.approx(1 + 4)
    real[0].requires_grad_(True)
    feature_matching(fake, real, "l1")                                    # real features are held fixed
    assert not feature_matching(fake, real, "l1").requires_grad


def test_adaptive_weight_is_the_ratio_of_the_two_gradient_norms_clamped():
    w = torch.ones(3, requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    weight = adaptive_weight((w * a).sum(), (w * b).sum(), w)               # gradients a and b: norms 5 and 1
    assert weight.item() == pytest.approx(5 / (1 + 1e-4)) and not weight.requires_grad
    assert adaptive_weight((w * a).sum(), (w * 0).sum(), w).item() == 1e4   # clamped


def test_the_adversarial_terms_start_at_the_start_step():
    assert [started(s, 3) for s in range(5)] == [0, 0, 0, 1, 1]


def test_steps_alternate_one_to_one_with_accumulated_batches():
    assert [generator_turn(k, 3) for k in range(12)] == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
    assert [generator_turn(k) for k in range(4)] == [True, False, True, False]


def test_frozen_call_passes_gradients_to_the_input_only():
    net = torch.nn.Linear(3, 1)
    x = torch.randn(2, 3, requires_grad=True)
    frozen(net, x).sum().backward()
    assert x.grad is not None and net.weight.grad is None


@pytest.mark.parametrize("dims,shape,kw", [(2, (2, 3, 32, 32), {}),
                                          (3, (2, 3, 4, 32, 32), dict(kernel=(3, 4, 4), stride=(1, 2, 2),
                                                                      padding=(1, 2, 2))),
                                          (3, (2, 3, 16, 32, 32), dict(padding=2))])
def test_patchgan_gives_patch_logits_and_every_layers_features(dims, shape, kw):
    d = PatchGAN(dims, ch=8, layers=3, **kw)
    logits, feats = d(torch.randn(*shape))
    assert logits.shape[:2] == (2, 1) and len(feats) == 4
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    conv = d.layers[1][0]
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.2)       # pix2pix's N(0, 0.02)
    scales = torch.cat([layer[1].weight for layer in d.layers[1:-1]])      # 16 + 32 + 64 norm scales: N(1, 0.02)
    shifts = torch.cat([layer[1].bias for layer in d.layers[1:-1]])
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01) and scales.std().item() == pytest.approx(0.02, rel=0.3)
    assert not shifts.any()
