"""Adversarial losses of the video autoencoders (PVDM, LVDM, VQ-VDM): the discriminator, its losses, feature
matching, VQGAN's adaptive weight, the start step, and the alternation of generator and discriminator steps.

A paper script picks its recipe from these pieces in a few lines:
    PVDM    2D frame + 3D clip PatchGAN, hinge, L1 feature matching x4, no adaptive weight (official
            losses/perceptual.py)
    LVDM    2D per-frame PatchGAN, hinge, adaptive weight x0.5 from step 50001 (official
            lvdm/models/losses/contperceptual.py)
    VQ-VDM  its own 3D discriminator (vqvdm.py::Discriminator3D, not this PatchGAN) with pix2pix's init from here,
            vanilla loss, squared-L2 feature matching (§2.2, Eq. 3-5), adversarial terms off for the first 10,000
            steps, then VQGAN and discriminator steps alternating as TATS does (generator_turn)

Conventions: D returns (logits, features of every layer but the last); "real" and "fake" are logits.
"""
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchGAN(nn.Module):
    """Isola et al.'s PatchGAN, 2D (frames) or 3D (clips): a conv with stride `stride`, then `layers` convs with
    BatchNorm, all but the last strided, then a 1-channel conv giving one logit per patch. Weights N(0, 0.02),
    norm scales N(1, 0.02) (pix2pix's init, kept by taming, TATS and PVDM)."""

    def __init__(self, dims: int = 2, ch: int = 64, layers: int = 3, kernel=4, stride=2, padding=1,
                 in_ch: int = 3):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        mods, c = [nn.Sequential(conv(in_ch, ch, kernel, stride, padding), nn.LeakyReLU(0.2))], ch
        for i in range(1, layers + 1):                        # the last of them keeps the size (stride 1)
            cout = ch * min(2 ** i, 8)
            mods.append(nn.Sequential(conv(c, cout, kernel, stride if i < layers else 1, padding, bias=False),
                                      norm(cout), nn.LeakyReLU(0.2)))
            c = cout
        mods.append(conv(c, 1, kernel, 1, padding))
        self.layers = nn.ModuleList(mods)
        pix2pix_init(self)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return x, feats[:-1]


def pix2pix_init(module: nn.Module) -> nn.Module:
    """pix2pix's discriminator init: conv weights N(0, 0.02), norm scales N(1, 0.02) and shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


# --- Discriminator and generator losses ---

def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])  (Lim & Ye 2017; the 1/2 as taming and PVDM write it)."""
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """1/2 (E[-log sigmoid D(x)] + E[-log(1 - sigmoid D(x_hat))]): Goodfellow et al.'s log D(x) + log(1 - D(x_hat))
    (VQ-VDM Eq. 3) as a loss to minimise, written with softplus for stability."""
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(x_hat)], the generator's side of the hinge GAN."""
    return -fake.mean()


def vanilla_g_loss(fake: torch.Tensor) -> torch.Tensor:
    """E[-log sigmoid D(x_hat)]: the non-saturating generator loss of the vanilla GAN."""
    return F.softplus(-fake).mean()


def feature_matching(fake_feats: Sequence[torch.Tensor], real_feats: Sequence[torch.Tensor],
                     kind: str = "l1") -> torch.Tensor:
    """sum_l mean |D_l(x_hat) - D_l(x)| ("l1", PVDM and TATS) or sum_l mean (D_l(x_hat) - D_l(x))^2 ("l2",
    pix2pixHD and VQ-VDM Eq. 4): summed over the layers as the official codes do, real features held fixed."""
    dist = {"l1": lambda d: d.abs().mean(), "l2": lambda d: d.pow(2).mean()}[kind]
    return sum(dist(f - r.detach()) for f, r in zip(fake_feats, real_feats))


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4) at the decoder's last layer L, clamped to
    [0, max_weight] and detached (Esser et al. 2021, Eq. 7): the GAN term gets the reconstruction's gradient scale."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def started(step: int, start: int) -> float:
    """1 from step `start` on, else 0: the adversarial terms stay off while the autoencoder learns to reconstruct."""
    return 1.0 if step >= start else 0.0


# --- Alternating updates ---

def generator_turn(batches_seen: int, accumulate: int = 1) -> bool:
    """Optimizer steps alternate 1:1, generator first; each step is `accumulate` batches, all of one side."""
    return (batches_seen // accumulate) % 2 == 0


def frozen(module: nn.Module, *args):
    """module(*args) with its weights detached: gradients reach the inputs, not the weights, so the generator's
    step leaves the discriminator alone without toggling requires_grad (which DDP does not allow)."""
    return torch.func.functional_call(module, {k: v.detach() for k, v in module.named_parameters()}, args)
