"""VQ-VDM: Video Diffusion Models with 3D VQGAN.
Kaji and Yanai, ACM Multimedia Asia 2023 (doi 10.1145/3595916.3626363).

The idea: compress a 16x128x128 clip with a 3D VQGAN (4x in time, 8x in space) into a 4x16x16 latent with 4
channels, and run a DDPM on that latent with a 3D U-Net whose temporal attention is causal (frame i sees frames
j <= i). The clip's frame rate is embedded like the timestep (Eq. 6), and a class label with a learned "no label"
entry gives classifier-free guidance (Eq. 9). Sampling never needs the encoder: noise -> latent -> decoder.

Implemented here, all of it:
  §2.2 the 3D VQGAN: 3D convolutions with replicate padding on t, h and w (TATS's layout), nearest-code
       quantization with the straight-through estimator, codebook + commitment loss (Eq. 2, beta = 0.25),
       L2 + LPIPS reconstruction (Eq. 1), one 3D discriminator that downsamples in every layer with the vanilla
       GAN loss (Eq. 3) and squared-L2 feature matching (Eq. 4), weighted as Eq. (5) (lambda = 1, 0.5, 1), the
       adversarial terms off for the first --disc-start steps; codebook usage (perplexity, dead codes) logged
  §2.3 the 3D U-Net: ResBlocks of GroupNorm -> SiLU -> 3x3x3 conv (replicate padding) with the embedding added in
       the middle, spatial attention, causal temporal attention, skips concatenated per block; fps embedding
       Linear(SiLU(Linear(PE(fps)))) added to the timestep embedding (Eq. 6)
  §2.4 joint training: the unconditional loss (Eq. 7) with probability rho, the class-conditional one (Eq. 8)
       otherwise, fps never dropped; classifier-free guidance w (eps_c - eps_u) + eps_u (Eq. 9)
What the paper leaves open, each chosen here and named as a config field (no official code exists): the codebook
size; a data-dependent codebook initialisation and the restart of dead codes from encoder outputs (against the
classic VQGAN codebook collapse); the diffused latent (z_e before quantization, mapped from its
range over training clips (and the codes they pick) onto [-1, 1], where sampling clips x0_hat as DDPM clips
pixels, and re-quantized before decoding: `--latent z_q` diffuses the quantized one); the widths and
depth of both networks; down-sampling in space only; no temporal position code beyond the causal mask and the 3D
convolutions; the sampler (DDPM, "standard DDPM [4]", T = 1000 with the linear schedule); the generator's side of
Eq. (3) as the non-saturating -log D(x_hat); --disc-start gating the feature matching of Eq. (4) too, as TATS does
(§2.2 names only L_disc); the VQGAN's and the discriminator's optimizer steps alternating, each player's
gradient clipped on its own, as TATS's two optimizers (a turn takes a batch of its own: --ae-steps counts both
players' steps). LPIPS is the standard VGG-16 one (Eq. 1 cites a VGG-19 perceptual loss, ref. [28]).
Only the attention is causal in time (the spatial attention normalises each frame on its own, then the causal
temporal attention): the 3x3x3 convolutions and the GroupNorms of the ResBlocks (and of the output) mix frames
both ways, as the paper's ResBlocks do, so the U-Net as a whole is not causal.

    python vqvdm.py train                                   # tiny demo on synthetic videos, CPU, < 10 minutes
    python vqvdm.py sample --label 1 --guidance 3           # class 1, Eq. (9) with w = 3
    python vqvdm.py sample --label 3 --fps 32               # another frame rate
    python vqvdm.py eval --c3d c3d_ucf101.pt                # FVD/KVD, IS, and the VQGAN's PSNR/SSIM
    python vqvdm.py train --data ucf101 --data-root DIR --preset ucf128
    python vqvdm.py train --data sky --data-root DIR --preset sky128
"""
import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from common.checkpoint import config_from_checkpoint, find_checkpoint, load_checkpoint, load_state_checked
from common.cli import (GUIDANCE_MAX, SEED_MAX, build_parser, check_steps, config_from_args, eval_settings, flag,
                        main, number)
from common.data import DATASETS, LABELLED, SyntheticVideos, fixed_batch, make_dataset
from common.diffusion import Schedule, cfg_vqvdm, ddim_sample, ddpm_sample, guided
from common.errors import UserError
from common.evaluate import evaluate_run
from common.files import output_folder
from common.gan import (feature_matching, frozen, generator_turn, pix2pix_init, started, vanilla_d_loss,
                        vanilla_g_loss)
from common.lpips import perceptual_loss_or_none
from common.metrics import psnr
from common.nn import norm, timestep_embedding, zero
from common.run import (autocast, check_memory, check_sample_memory, clip_floats, count_params, fmt_params,
                        pick_device, pick_precision)
from common.train import Run, run_command, train_stage
from common.video import make_grid, to_uint8, write_gif, write_samples

SCRIPT = "vqvdm"


# --- Configuration ---

@dataclass
class Config:
    # data and optimisation (shared flags of every script)
    data: str = flag("synthetic", "dataset", choices=list(DATASETS))
    data_root: Optional[str] = flag(None, "dataset folder (see README, Data)")
    steps: int = flag(1000, "diffusion steps", lo=1)
    ae_steps: int = flag(600, "VQGAN steps", lo=1)
    batch_size: int = flag(8, "clips per diffusion step and process", lo=1)
    ae_batch_size: int = flag(4, "clips per VQGAN step and process", lo=1)
    lr: float = flag(1e-3, "diffusion learning rate (AdamW, constant; ours: the paper gives none)", lo=0, lo_open=True)
    ae_lr: float = flag(1e-3, "VQGAN and discriminator learning rate (Adam, betas 0.5, 0.9 as TATS; ours)", lo=0,
                        lo_open=True)
    seed: int = flag(0, "random seed", lo=0, hi=SEED_MAX)
    sample_every: int = flag(0, "write a sample GIF every N diffusion steps (0: never)", lo=0)
    save_every: int = flag(200, "checkpoint every N steps (0: only at the end)", lo=0)
    # the paper's method
    frames: int = flag(16, "frames per clip (a multiple of the VQGAN's temporal factor)", lo=1)
    resolution: int = flag(32, "frame height and width", lo=1)
    class_cond: bool = flag(True, "condition on the class label (Eq. 8) with classifier-free guidance (Eq. 9)")
    fps_cond: bool = flag(True, "condition on the clip's frame rate (Eq. 6)")
    rho: float = flag(0.5, "probability of an unconditional example (Eq. 7) in joint training; 1 on Sky (§3.1)",
                      lo=0, hi=1)
    disc_start: int = flag(300, "VQGAN step from which the adversarial terms are on (paper: 10,000)", lo=0)
    restart_after: int = flag(50, "a code no vector picked for this many VQGAN steps moves onto an encoder output "
                              "(ours, against codebook collapse; 0: never)", lo=0)
    latent: str = flag("z_e", "the diffused latent: z_e before quantization (re-quantized before decoding) or the "
                       "quantized z_q (ours: the paper does not say)", choices=["z_e", "z_q"])
    # set by `train` from the data (rebuilding the model needs them)
    num_classes: int = 0            # 0 when unconditional on classes
    fps: float = 0.0                # the median clip frame rate of the training data: sample's default --fps
    # architecture and fixed training settings (presets only)
    ae_ch: int = 16                 # TATS n_hiddens: stage i has ae_ch * 2^(i+1) channels
    ae_down_t: int = 4              # temporal factor (paper: 4)
    ae_down_s: int = 4              # spatial factor (paper: 8; tiny: 4, so a 32x32 frame keeps an 8x8 latent)
    z_channels: int = 4             # codebook dimension (paper: 4)
    n_codes: int = 1024             # codebook size (ours: the paper does not say; TATS uses 16384 x 256)
    beta: float = 0.25              # commitment weight, Eq. (2)
    lam_vq: float = 1.0             # lambda_1, Eq. (5)
    lam_disc: float = 0.5           # lambda_2
    lam_aux: float = 1.0            # lambda_3
    lpips_weight: float = 1.0       # Eq. (1) adds LPIPS with weight 1
    disc_ch: int = 16
    disc_layers: int = 3            # strided 3D convs; each halves t, h and w
    ch: int = 32
    mult: tuple = (1, 2)
    blocks: int = 1
    attn_ds: tuple = (1, 2)         # downsampling factors with spatial + causal temporal attention (and the middle)
    heads: int = 4
    dropout: float = 0.0
    schedule: str = "linear"        # "standard DDPM [4]": beta from 1e-4 to 0.02
    timesteps: int = 1000
    ema_decay: float = 0.999
    grad_clip: float = 1.0          # ours, for tiny's learning rates


PRESETS = {
    "tiny": Config(),
    # 16 x 128^2 -> 4 x 16^2 x 4 (§2.2, §3.1). Widths, depths, codebook size, learning rates and step counts are
    # ours (the paper gives none); the VQGAN follows TATS's layout at n_hiddens 32, its lr and betas.
    "ucf128": Config(data="ucf101", frames=16, resolution=128, steps=400_000, ae_steps=200_000, batch_size=8,
                     ae_batch_size=2, lr=1e-4, ae_lr=9e-5, sample_every=10_000, save_every=5_000, disc_start=10_000,
                     rho=0.5, ae_ch=32, ae_down_t=4, ae_down_s=8, n_codes=2048, restart_after=1000, disc_ch=64,
                     disc_layers=4, ch=128, mult=(1, 2, 4), blocks=2, attn_ds=(1, 2, 4), heads=8, dropout=0.1,
                     ema_decay=0.9999, grad_clip=1.0),
}
# Sky Time-lapse: no fps and no class (§3.1: rho = 1)
PRESETS["sky128"] = replace(PRESETS["ucf128"], data="sky", class_cond=False, fps_cond=False, rho=1.0)

STAGES = ("ae", "diffusion")
FPS_MAX = 240      # --fps: the highest rate common cameras record; the PE of Eq. (6) has seen the data's rates
AE_ARCH = ("resolution", "ae_ch", "ae_down_t", "ae_down_s", "z_channels", "n_codes", "disc_ch", "disc_layers")
ARCH = AE_ARCH + ("frames", "class_cond", "fps_cond", "num_classes", "latent", "ch", "mult", "blocks", "attn_ds",
                  "heads", "schedule", "timesteps")


# --- §2.2 The 3D VQGAN ---

# Copied from lvdm.py::_triple
def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


# Copied from lvdm.py::same_pad
def same_pad(kernel, stride):
    """F.pad's (w, w, h, h, t, t) amounts that make a conv's output size input / stride: k - s per axis, the
    extra one in front when k - s is odd (official aemodules3d.py SamePadConv3d)."""
    pad = []
    for k, s in reversed(list(zip(_triple(kernel), _triple(stride)))):
        p = k - s
        pad += [p - p // 2, p // 2]
    return tuple(pad)


# Copied from lvdm.py::SamePadConv3d
class SamePadConv3d(nn.Module):
    """A 3D conv on an input padded by repeating its border frames and pixels: the "repeat padding" that keeps
    the encoder shift-equivariant in time (§3.1)."""

    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        self.pad = same_pad(kernel, stride)
        self.conv = nn.Conv3d(cin, cout, kernel, stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


# Copied from lvdm.py::SamePadConvTranspose3d
class SamePadConvTranspose3d(nn.Module):
    """The decoder's upsampling: the input padded as in SamePadConv3d, then a transposed conv with padding k - 1,
    which makes the output exactly stride x the input."""

    def __init__(self, cin, cout, kernel=4, stride=2):
        super().__init__()
        self.pad = same_pad(kernel, stride)
        self.conv = nn.ConvTranspose3d(cin, cout, kernel, stride, padding=tuple(k - 1 for k in _triple(kernel)))

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


# Copied from lvdm.py::ResBlock3d
class ResBlock3d(nn.Module):
    """(GroupNorm -> SiLU -> 3^3 conv) twice, plus the input."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(norm(ch), nn.SiLU(), SamePadConv3d(ch, ch, 3), norm(ch), nn.SiLU(),
                                  SamePadConv3d(ch, ch, 3))

    def forward(self, x):
        return x + self.body(x)


# Copied from lvdm.py::stage_strides
def stage_strides(down_t, down_s):
    """Per-stage (t, h, w) strides: log2 of each factor halvings, time halved in the first stages only
    (official: [4, 8, 8] gives (2,2,2), (2,2,2), (1,2,2))."""
    n_t, n_s = int(math.log2(down_t)), int(math.log2(down_s))
    return [(2 if i < n_t else 1, 2 if i < n_s else 1, 2 if i < n_s else 1) for i in range(max(n_t, n_s))]


class Codebook(nn.Module):
    """Nearest-code quantization z_q = q(z_e, e) with a learned codebook e (Eq. 2; not TATS's EMA update).

    Two remedies against codebook collapse, both ours: the codes start on encoder outputs of the first training
    batch (TATS's data-dependent init), and a code that no vector picked for `restart_after` training steps moves
    onto a random encoder output of the current batch. `last_used` and `calls` are buffers, so a resumed run
    keeps them (and does not initialise its codes again). Under DDP a code is alive when any rank picked it (the
    counts are summed over ranks) and the moved codes are rank 0's rows."""

    def __init__(self, n_codes, dim, restart_after):
        super().__init__()
        self.embed = nn.Embedding(n_codes, dim)
        nn.init.uniform_(self.embed.weight, -1 / n_codes, 1 / n_codes)
        self.restart_after = restart_after
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))              # training forwards
        self.register_buffer("last_used", torch.zeros(n_codes, dtype=torch.long))     # call a code was last picked

    @torch.no_grad()
    def _move(self, which, flat):
        """Put the codes `which` (bool mask) on distinct random rows of flat (N, d) plus noise of std 0.01 / sqrt(d)
        (TATS), the same on every rank."""
        k = int(which.sum())
        if not k:
            return 0
        pick = torch.randperm(flat.shape[0], device=flat.device)[:k] if flat.shape[0] >= k else \
            torch.randint(0, flat.shape[0], (k,), device=flat.device)
        rows = flat[pick] + torch.randn(k, flat.shape[1], device=flat.device) * 0.01 / flat.shape[1] ** 0.5
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(rows, src=0)
        self.embed.weight[which] = rows.to(self.embed.weight.dtype)
        self.last_used[which] = self.calls
        return k

    def nearest(self, flat):
        """The index of the nearest code of each row of flat (N, d), in float32, touching no buffer."""
        e = self.embed.weight.float()
        with torch.autocast(flat.device.type, enabled=False):     # bf16 distances pick wrong codes
            # ||z - e_k||^2 = ||z||^2 - 2 z.e_k + ||e_k||^2, nearest code per latent vector
            return (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]).argmin(dim=1)

    def lookup(self, z_e):
        """z_e (B, d, t, h, w) -> its nearest codes, without gradients and without counting as a training call
        (the discriminator's turn reconstructs with it: that turn must not age or restart codes)."""
        flat = rearrange(z_e, "b d t h w -> (b t h w) d").float()
        return rearrange(self.embed.weight.float()[self.nearest(flat)], "(b t h w) d -> b d t h w", b=z_e.shape[0],
                         t=z_e.shape[2], h=z_e.shape[3]).to(z_e.dtype)

    def forward(self, z_e):
        """z_e (B, d, t, h, w) -> z_q with straight-through gradients, the code indices (B, t, h, w), the two terms
        of Eq. (2), and the batch's usage statistics."""
        B, d, t, h, w = z_e.shape
        flat = rearrange(z_e, "b d t h w -> (b t h w) d").float()
        moved = 0
        if self.training:
            self.calls += 1
            if self.calls == 1:                                    # data-dependent init on the first batch
                self._move(torch.ones_like(self.last_used, dtype=torch.bool), flat.detach())
            elif self.restart_after:                               # decided on synced buffers: all ranks agree
                moved = self._move(self.calls - self.last_used > self.restart_after, flat.detach())
        e = self.embed.weight.float()
        index = self.nearest(flat)
        z_q = rearrange(e[index], "(b t h w) d -> b d t h w", b=B, t=t, h=h)
        codebook = F.mse_loss(z_q, z_e.detach().float())          # Eq. (2), first term: ||sg[z_e] - e||^2
        commit = F.mse_loss(z_e.float(), z_q.detach())            # second term, x beta by the caller
        counts = torch.bincount(index, minlength=e.shape[0]).float()
        if self.training:
            if dist.is_available() and dist.is_initialized():     # a code any rank picked is alive
                dist.all_reduce(counts)
            self.last_used[counts > 0] = self.calls
        p = counts / counts.sum()
        # usage: perplexity exp(H(p)) of the batch's code histogram (n_codes when all are used evenly), the codes
        # it used, and how many dead codes this step moved
        stats = {"perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()), "used": (counts > 0).sum(),
                 "restarted": moved}
        z_q = z_e + (z_q.to(z_e.dtype) - z_e).detach()             # straight-through: d z_q / d z_e = 1
        return z_q, index.reshape(B, t, h, w), codebook, commit, stats


class VQGAN3D(nn.Module):
    """(B, 3, T, H, W) <-> (B, d, T/f_t, H/f_s, W/f_s) through a codebook of d-dimensional codes (§2.2, Fig. 1).
    Encoder (TATS): a 3^3 conv, then per stage a 4^3 strided conv and one ResBlock (channels 2ch, 4ch, 8ch),
    GroupNorm, SiLU and a 1^3 conv to d. Decoder: a 1^3 conv, GroupNorm, SiLU, per stage a 4^3 transposed conv and
    two ResBlocks, a 3^3 conv to RGB. Every conv pads by replication on t, h and w."""

    def __init__(self, cfg: Config):
        super().__init__()
        strides, ch, d = stage_strides(cfg.ae_down_t, cfg.ae_down_s), cfg.ae_ch, cfg.z_channels
        enc, c = [SamePadConv3d(3, ch, 3)], ch
        for i, s in enumerate(strides):
            enc += [SamePadConv3d(c, ch * 2 ** (i + 1), 4, s), ResBlock3d(ch * 2 ** (i + 1))]
            c = ch * 2 ** (i + 1)
        self.encoder = nn.Sequential(*enc, norm(c), nn.SiLU(), nn.Conv3d(c, d, 1))
        self.codebook = Codebook(cfg.n_codes, d, cfg.restart_after)
        dec = [nn.Conv3d(d, c, 1), norm(c), nn.SiLU()]
        for i, s in enumerate(strides):           # time is upsampled first, as the encoder downsampled it first
            cout = ch * 2 ** (len(strides) - i)
            dec += [SamePadConvTranspose3d(c, cout, 4, s), ResBlock3d(cout), ResBlock3d(cout)]
            c = cout
        self.decoder = nn.Sequential(*dec)
        self.conv_out = SamePadConv3d(c, 3, 3)

    def encode(self, x):
        """z_e = E(x), before quantization."""
        return self.encoder(x)

    def quantize(self, z_e):
        return self.codebook(z_e)[0]

    def decode(self, z_q):
        return self.conv_out(self.decoder(z_q))


class Discriminator3D(nn.Module):
    """§2.2: "a lightweight design, consisting of a 3D convolution that downsamples in all layers". Each layer is a
    4^3 conv of stride 2 (GroupNorm after the first, LeakyReLU 0.2); a 1^3 conv reads one logit per patch.
    Returns (logits, the features of every layer) for the feature matching of Eq. (4). Init as pix2pix."""

    def __init__(self, ch, layers):
        super().__init__()
        mods, c = [], 3
        for i in range(layers):
            cout = ch * min(2 ** i, 8)
            mods.append(nn.Sequential(nn.Conv3d(c, cout, 4, 2, 1), norm(cout) if i else nn.Identity(),
                                      nn.LeakyReLU(0.2)))
            c = cout
        self.layers, self.logit = nn.ModuleList(mods), nn.Conv3d(c, 1, 1)
        pix2pix_init(self)

    def forward(self, x):
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return self.logit(x), feats


class AdversarialVQGAN(nn.Module):
    """The VQGAN and its discriminator as one module: one checkpoint, one optimizer (Adam keeps each parameter's
    moments, so it is two Adams in one), and a forward that is one batch's loss for the player whose turn it is
    (vqgan_loss), so DDP sees every step. `steps` counts the calls: it decides the turns, and a resumed run
    continues them."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.vq = VQGAN3D(cfg)
        self.disc = Discriminator3D(cfg.disc_ch, cfg.disc_layers)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x, cfg: Config, lpips=None):
        return vqgan_loss(self, x, cfg, lpips)


def vqgan_turn(step: int, disc_start: int) -> bool:
    """Whether optimizer step `step` (0-based) is the VQGAN's: every step before --disc-start, then every other
    one, the VQGAN's first (gan.generator_turn)."""
    return not started(step, disc_start) or generator_turn(step - disc_start)


def vqgan_loss(model: AdversarialVQGAN, x, cfg: Config, lpips=None):
    """Eq. (5) for one batch, split between the two players, whose optimizer steps alternate as TATS's two
    optimizers do (official tats/tats_vqgan.py: training_step's optimizer_idx), each with its own gradient clip:
    a step leaves the other player's parameters without a gradient, so the optimizer does not move them and
    train_stage's clip measures only this player's norm. Ours: a turn takes a batch of its own (TATS runs both on
    one batch), so --ae-steps counts the two players' steps together.
      VQGAN's turn (every step before --disc-start):  L_recon + lambda_1 L_vq [+ lambda_2 L_g + lambda_3 L_aux],
        L_g the non-saturating -log D(x_hat) through D's detached weights (gan.frozen), the real features of
        Eq. (4) held fixed;
      discriminator's turn (from --disc-start, every other step):  lambda_2 L_d, -log D(x) - log(1 - D(x_hat))
        on a reconstruction made without gradients and without counting as a codebook call."""
    step = int(model.steps)
    model.steps += 1
    if not vqgan_turn(step, cfg.disc_start):
        with torch.no_grad():
            x_hat = model.vq.decode(model.vq.codebook.lookup(model.vq.encode(x)))
        d = vanilla_d_loss(model.disc(x)[0], model.disc(x_hat)[0])        # Eq. (3), the discriminator's side
        return {"loss": cfg.lam_disc * d, "d": d}
    z_q, _, codebook, commit, stats = model.vq.codebook(model.vq.encode(x))
    x_hat = model.vq.decode(z_q)
    l2 = (x_hat.float() - x).pow(2).mean()                           # Eq. (1): ||x - x_hat||^2
    rec, out = l2, {"l2": l2}
    if lpips is not None and cfg.lpips_weight:                       # + L_LPIPS over every frame
        frames = lambda v: rearrange(v, "b c t h w -> (b t) c h w")   # noqa: E731
        p = lpips(frames(x_hat).float(), frames(x)).mean()
        rec, out["lpips"] = rec + cfg.lpips_weight * p, p
    vq = codebook + cfg.beta * commit                                # Eq. (2)
    loss = rec + cfg.lam_vq * vq
    out.update(vq=vq, **stats)
    if started(step, cfg.disc_start):
        fake, fake_feats = frozen(model.disc, x_hat)
        with torch.no_grad():
            real_feats = model.disc(x)[1]
        g = vanilla_g_loss(fake)                                     # Eq. (3), the generator's side
        aux = feature_matching(fake_feats, real_feats, "l2")         # Eq. (4): sum_i ||D_i(x) - D_i(x_hat)||^2
        loss = loss + cfg.lam_disc * g + cfg.lam_aux * aux
        out.update(g=g, aux=aux)
    return {"loss": loss, **out}


# --- §2.3 The diffusion 3D U-Net ---

def conv3(cin, cout):
    return SamePadConv3d(cin, cout, 3)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> 3^3 conv (replicate padding), + Linear(SiLU(emb)) added in the middle, GroupNorm ->
    SiLU -> dropout -> zero-initialised 3^3 conv, plus the (projected) input (§2.3)."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), conv3(cin, cout)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), zero(conv3(cout, cout))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):                   # x (B, C, T, H, W), emb (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[..., None, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class SpatialAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of each frame, zero-initialised output. Its GroupNorm
    normalises each frame on its own (lvdm.py's, whose statistics pool over T*H*W, would let a later frame change
    an earlier one's attention, beside Fig. 2's causal temporal attention): spatial + temporal attention are
    causal in time together (Attention)."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv, self.out = nn.Conv3d(ch, 3 * ch, 1), zero(nn.Conv3d(ch, ch, 1))

    def forward(self, x):                         # x (B, C, T, H, W)
        B, C, T, H, W = x.shape
        h = rearrange(self.norm(rearrange(x, "b c t y x -> (b t) c y x")), "(b t) c y x -> b c t y x", b=B)
        q, k, v = rearrange(self.qkv(h), "b (three h d) t y x -> three (b t) h (y x) d", three=3, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(o, "(b t) h (y x) d -> b (h d) t y x", t=T, y=H))


class CausalTemporalAttention(nn.Module):
    """§2.3: h (B, C, T, H, W) -> (B, H, W, T, C), every spatial position a batch entry, attention over T with a
    causal mask: frame i attends to frames j <= i only. Each (position, frame) token is normalised on its own
    (LayerNorm over C, ours): a GroupNorm pooled over T would carry frame j into frames i < j through its
    statistics. Zero-initialised output."""

    def __init__(self, ch, heads, causal=True):
        super().__init__()
        self.heads, self.causal, self.norm = heads, causal, nn.LayerNorm(ch)
        self.qkv, self.out = nn.Linear(ch, 3 * ch), zero(nn.Linear(ch, ch))

    def forward(self, x):                         # x (B, C, T, H, W)
        B, C, T, H, W = x.shape
        tokens = rearrange(x, "b c t y x -> (b y x) t c")
        q, k, v = rearrange(self.qkv(self.norm(tokens)), "n t (three h d) -> three n h t d", three=3, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)        # (B*H*W, heads, T, d)
        o = self.out(rearrange(o, "n h t d -> n t (h d)"))
        return x + rearrange(o, "(b y x) t c -> b c t y x", y=H, x=W)


class Attention(nn.Module):
    """Fig. 2's order: spatial attention, then causal temporal attention. Together causal in time: output frame i
    depends on input frames j <= i only. The U-Net as a whole is not: its ResBlocks' GroupNorm pools over frames
    and their 3x3x3 convolutions see one frame on each side (§2.3: GroupNorm and Conv3D with replication padding
    in time), as in the paper; so do the input, upsampling and output convolutions and the output GroupNorm."""

    def __init__(self, ch, heads):
        super().__init__()
        self.spatial, self.temporal = SpatialAttention(ch, heads), CausalTemporalAttention(ch, heads)

    def forward(self, x, emb):
        return self.temporal(self.spatial(x))


class Downsample(nn.Module):
    """Halves the frame size, keeps the frames (§2.3: "the video frame size is compressed to half")."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv3d(ch, ch, (1, 3, 3), (1, 2, 2), (0, 1, 1))

    def forward(self, x, emb):
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles the frame size (nearest), then a 3^3 conv."""

    def __init__(self, ch):
        super().__init__()
        self.conv = conv3(ch, ch)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


# Copied from lvdm.py::Stage
class Stage(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet3D(nn.Module):
    """eps_theta(z_t, t, f, c) on latents (B, d, l, h, w) (§2.3, Fig. 2): per level `blocks` x [ResBlock, spatial
    attention, causal temporal attention] and a 2x spatial downsampling, a middle block, the mirror path with every
    down-path output concatenated. The embedding is PE(t) -> MLP (+ Eq. 6's fps MLP) (+ the class embedding,
    whose last entry is the learned "no label" of classifier-free guidance). Holds the latent shift and scale."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ch, self.num_classes = cfg.ch, cfg.num_classes if cfg.class_cond else 0
        emb = 4 * cfg.ch
        self.time_mlp = nn.Sequential(nn.Linear(cfg.ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        # Eq. (6): emb_fps = Linear(SiLU(Linear(PE(fps)))), "the same form as the timestep embedding"
        self.fps_mlp = nn.Sequential(nn.Linear(cfg.ch, emb), nn.SiLU(), nn.Linear(emb, emb)) if cfg.fps_cond else None
        self.label_emb = nn.Embedding(self.num_classes + 1, emb) if self.num_classes else None
        # z_diff = scale (z + shift) per channel, the training latents' range onto [-1, 1] (set_latent_range)
        self.register_buffer("latent_shift", torch.zeros(cfg.z_channels, 1, 1, 1))
        self.register_buffer("latent_scale", torch.ones(cfg.z_channels, 1, 1, 1))

        def block(cin, cout, ds):
            layers = [ResBlock(cin, cout, emb, cfg.dropout)]
            if ds in cfg.attn_ds:
                layers.append(Attention(cout, cfg.heads))
            return Stage(layers)

        ch, mult = cfg.ch, cfg.mult
        self.inp = conv3(cfg.z_channels, ch)
        self.down, skips, cur, ds = nn.ModuleList(), [ch], ch, 1
        for level, m in enumerate(mult):
            for _ in range(cfg.blocks):
                self.down.append(block(cur, ch * m, ds))
                cur = ch * m
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(Stage([Downsample(cur)]))
                skips.append(cur)
                ds *= 2
        self.mid = Stage([ResBlock(cur, cur, emb, cfg.dropout), Attention(cur, cfg.heads),
                          ResBlock(cur, cur, emb, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * m, ds))
                cur = ch * m
                if level > 0 and i == cfg.blocks:
                    self.up[-1].append(Upsample(cur))
                    ds //= 2
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(conv3(cur, cfg.z_channels)))

    def null_label(self, B, device):
        return torch.full((B,), self.num_classes, device=device, dtype=torch.long)

    def forward(self, z, t, fps=None, label=None):
        """z (B, d, l, h, w); t (B,); fps (B,) float (ignored without fps_cond); label (B,) with num_classes (or
        None) meaning "no label" -> eps (B, d, l, h, w)."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.fps_mlp is not None:
            emb = emb + self.fps_mlp(timestep_embedding(fps, self.ch))
        if self.label_emb is not None:
            emb = emb + self.label_emb(self.null_label(z.shape[0], z.device) if label is None else label)
        h = self.inp(z)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def to_diffusion(self, z):
        """VQGAN latents (B, d, l, h, w) -> the diffused latents, scale (z + shift), in [-1, 1]."""
        return (self.latent_scale * (z.float() + self.latent_shift)).float()

    def from_diffusion(self, z):
        return z / self.latent_scale - self.latent_shift


# --- §2.4 Joint conditional / unconditional training ---

def drop_labels(label, num_classes, rho):
    """Each example becomes unconditional ("no label", Eq. 7) with probability rho, else keeps its class (Eq. 8)."""
    drop = torch.rand(label.shape, device=label.device) < rho
    return torch.where(drop, torch.full_like(label, num_classes), label)


def diffusion_loss(net, sched: Schedule, z0, fps, label, rho, num_classes):
    """Eq. (7)/(8): ||eps - eps_theta(z_t, t, f[, c])||^2, the label dropped with probability rho, fps never."""
    t = torch.randint(0, sched.T, (z0.shape[0],), device=z0.device)
    eps = torch.randn_like(z0)
    label = drop_labels(label, num_classes, rho) if num_classes else None
    return F.mse_loss(net(sched.q_sample(z0, t, eps), t, fps, label).float(), eps)


# --- Training ---

def check_config(cfg: Config):
    """Mistakes the flags alone reveal, reported before any data is read."""
    for name in ("ae_down_t", "ae_down_s"):
        f = getattr(cfg, name)
        if f < 1 or f & (f - 1):
            raise UserError(f"{name} must be a power of 2, got {f}")
    if cfg.frames % cfg.ae_down_t:
        raise UserError(f"--frames {cfg.frames} is not a multiple of the VQGAN's temporal factor {cfg.ae_down_t}")
    if cfg.resolution % (cfg.ae_down_s * 2 ** (len(cfg.mult) - 1)):
        raise UserError(f"--resolution {cfg.resolution} must be divisible by {cfg.ae_down_s * 2 ** (len(cfg.mult) - 1)}"
                        f" (the VQGAN's spatial factor {cfg.ae_down_s} times the U-Net's {len(cfg.mult) - 1} "
                        f"halvings)")
    if cfg.frames < 2 ** cfg.disc_layers:
        raise UserError(f"--frames {cfg.frames} is too short for the discriminator's {cfg.disc_layers} strided layers:"
                        f" use at least {2 ** cfg.disc_layers} frames")


def step_memory(cfg: Config) -> dict:
    """A floor of what one step of each stage holds (common/run.py): the clips, the VQGAN's reconstruction and
    its first stage's activations at full size (2 ae_ch channels)."""
    R, width = cfg.resolution, 2 * cfg.ae_ch
    return {f"a VQGAN step on {cfg.ae_batch_size} clips of {cfg.frames}x{R}x{R}":
            clip_floats(cfg.ae_batch_size, cfg.frames, R, 6 + 2 * width),
            f"a diffusion step on {cfg.batch_size} clips of {cfg.frames}x{R}x{R}":
            clip_floats(cfg.batch_size, cfg.frames, R, 3 + width)}


def clip_fps(data) -> np.ndarray:
    """The frame rate of every clip the dataset can give (file fps / stride; nan where a video has none)."""
    if isinstance(data, SyntheticVideos):
        return np.array([data.meta(i)["fps"] for i in range(min(len(data), 1000))])
    return np.array([fps / data.stride for *_, fps in data.videos])


def report_sizes(cfg: Config, gan: AdversarialVQGAN, unet, print_fn=print):
    l, h = cfg.frames // cfg.ae_down_t, cfg.resolution // cfg.ae_down_s
    print_fn(f"vqvdm: VQGAN {fmt_params(count_params(gan.vq))} (+ discriminator {fmt_params(count_params(gan.disc))}),"
             f" U-Net {fmt_params(count_params(unet))} parameters; clips {cfg.frames}x{cfg.resolution}x"
             f"{cfg.resolution} -> latent {cfg.z_channels}x{l}x{h}x{h}, {cfg.n_codes} codes")


def load_vqgan(run_dir, cfg: Config, device) -> VQGAN3D:
    """The run's trained VQGAN, frozen."""
    path = Path(run_dir) / "ae.pt"
    if not path.exists():
        raise UserError(f"no VQGAN in {run_dir}: run `python {SCRIPT}.py train --stage ae` first")
    state = load_checkpoint(path, SCRIPT, {k: getattr(cfg, k) for k in AE_ARCH}, device)["model"]
    vq = VQGAN3D(cfg).to(device)
    load_state_checked(vq, {k[3:]: v for k, v in state.items() if k.startswith("vq.")}, path)
    return vq.eval().requires_grad_(False)


def latents(vq: VQGAN3D, x, kind: str):
    """The diffused latent of clips x: z_e, or z_q = q(z_e) with --latent z_q."""
    z_e = vq.encode(x)
    return vq.quantize(z_e) if kind == "z_q" else z_e


@torch.no_grad()
def set_latent_range(unet: UNet3D, vq: VQGAN3D, data, device, clips=32, batch_size=8, seed=0):
    """shift and scale that map each channel's range over the training latents onto [-1, 1] (ours; the paper does
    not say how its latents are scaled, and the medicaldiffusion code maps TATS latents from the codebook's range,
    which left 0.65 % of our mapped z_e outside [-1, 1], up to 1.57): the range of z_e and of the codes it picks,
    over `clips` training clips at random starts. Sampling clips x0_hat to this box, as DDPM clips pixels
    (generate). Returns the box (lo, hi per channel); the fraction of z_e of `clips` other training clips that
    falls outside it; and the mean and std of the mapped latents (what `train` logs). Its own random generator:
    the same box whichever command computes it."""
    rng = np.random.default_rng([seed, 2])
    keys = [(int(i), [seed, 2, k]) for k, i in enumerate(rng.integers(len(data), size=2 * clips))]

    def encode(keys):
        z_e = torch.cat([vq.encode(torch.stack([data[key]["video"] for key in keys[b:b + batch_size]]).to(device))
                         for b in range(0, len(keys), batch_size)]).float()
        return z_e, vq.codebook.lookup(z_e).float()

    z_e, z_q = encode(keys[:clips])
    lo = torch.minimum(z_e.amin(dim=(0, 2, 3, 4)), z_q.amin(dim=(0, 2, 3, 4)))
    hi = torch.maximum(z_e.amax(dim=(0, 2, 3, 4)), z_q.amax(dim=(0, 2, 3, 4)))
    unet.latent_shift.copy_((-(lo + hi) / 2).reshape(-1, 1, 1, 1))
    unet.latent_scale.copy_((2 / (hi - lo).clamp_min(1e-6)).reshape(-1, 1, 1, 1))
    mapped = unet.to_diffusion(z_e)
    outside = (unet.to_diffusion(encode(keys[clips:])[0]).abs() > 1).float().mean().item()
    return lo.tolist(), hi.tolist(), outside, mapped.mean().item(), mapped.std().item()


def train(args):
    cfg = config_from_args(Config, PRESETS, args)
    check_config(cfg)
    check_memory(step_memory(cfg), pick_device(args.device))
    said = []
    # a conditional preset on data without labels or frame rates trains without them (known from the name)
    if cfg.class_cond and cfg.data not in LABELLED:
        cfg = replace(cfg, class_cond=False)
        said.append(f"--data {cfg.data} has no class labels: training without class conditioning (--no-class-cond)")
    if cfg.fps_cond and cfg.data == "sky":
        cfg = replace(cfg, fps_cond=False)
        said.append("--data sky is frame folders without a frame rate: training without fps conditioning "
                    "(--no-fps-cond)")
    data = make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution, seed=cfg.seed)
    fps = clip_fps(data)
    if cfg.fps_cond and not np.isfinite(fps).all():
        cfg = replace(cfg, fps_cond=False)
        said.append(f"{int((~np.isfinite(fps)).sum())} videos of --data {cfg.data} have no frame rate (frame "
                    f"folders): training without fps conditioning (--no-fps-cond)")
    cfg = replace(cfg, num_classes=getattr(data, "num_classes", 0) if cfg.class_cond else 0,
                  fps=float(np.median(fps)) if cfg.fps_cond else 0.0)
    match = {k: getattr(cfg, k) for k in ARCH}     # what the run's checkpoints must share with this config
    run = Run.start(SCRIPT, cfg, preset=args.preset, run_dir=args.run, device=args.device,
                    precision=args.precision, compile=args.compile, must_match=match)
    for line in said:
        run.print(line)
    dev = run.device
    gan, unet = AdversarialVQGAN(cfg).to(dev), UNet3D(cfg).to(dev)
    report_sizes(cfg, gan, unet, run.print)
    every_stage = dict(config=cfg, must_match=match, seed=cfg.seed, save_every=cfg.save_every,
                       grad_clip=cfg.grad_clip)
    stages = STAGES if args.stage == "all" else (args.stage,)

    # stage 1: the 3D VQGAN with its 3D discriminator (§2.2)
    if "ae" in stages:
        lpips = perceptual_loss_or_none(dev)
        train_stage(run, "ae", gan, torch.optim.Adam(gan.parameters(), lr=cfg.ae_lr, betas=(0.5, 0.9)),
                    lambda net, batch: net(batch["video"], cfg, lpips), data, steps=cfg.ae_steps,
                    batch_size=cfg.ae_batch_size, find_unused_parameters=True, **every_stage)
        held_out = fixed_batch(make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution,
                                            split="test", seed=cfg.seed), 8)["video"].to(dev)
        vq = load_vqgan(run.dir, cfg, dev)
        with torch.no_grad():
            z_q, index, *_ = vq.codebook(vq.encode(held_out))
            rec = vq.decode(z_q)
        run.print(f"VQGAN: reconstruction PSNR {psnr(rec, held_out).mean().item():.2f} dB on 8 held-out clips, "
                  f"{index.unique().numel()} of {cfg.n_codes} codes in use")
    if stages == ("ae",):
        return
    vq = load_vqgan(run.dir, cfg, dev)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)

    # stage 2: the latent diffusion model, joint class-conditional and unconditional (§2.3, §2.4)
    if not run.has("diffusion"):
        lo, hi, outside, mean, std = set_latent_range(unet, vq, data, dev, seed=cfg.seed)
        run.print("diffusion: the training latents' range per channel, " + ", ".join(
            f"[{a:.2f}, {b:.2f}]" for a, b in zip(lo, hi)) + f", maps onto [-1, 1] (mean {mean:.2f}, std {std:.2f});"
            f" {100 * outside:.2f} % of other training clips' z_e fall outside it")
    labels = torch.arange(8) % cfg.num_classes if cfg.num_classes else None

    def loss(net, batch):
        with torch.no_grad():
            z0 = unet.to_diffusion(latents(vq, batch["video"], cfg.latent))
        return diffusion_loss(net, sched, z0, batch["fps"].float(), batch["label"], cfg.rho, unet.num_classes)

    def sample_gif(ema, step):
        videos = generate(ema, vq, sched, cfg, n=8, labels=labels, steps=50, device=dev, dtype=run.dtype)
        write_gif(run.dir / "samples" / f"step_{step:07d}.gif", make_grid(videos))

    ema = train_stage(run, "diffusion", unet, torch.optim.AdamW(unet.parameters(), lr=cfg.lr), loss, data,
                      steps=cfg.steps, batch_size=cfg.batch_size, ema_decay=cfg.ema_decay, sample_fn=sample_gif,
                      sample_every=cfg.sample_every, follows=("ae",), **every_stage)
    if run.dist.is_main:
        videos = generate(ema, vq, sched, cfg, n=8, labels=labels, steps=100, device=dev, dtype=run.dtype,
                          progress=True)
        out = write_samples(run.dir / "samples" / "final", videos, None if labels is None else labels.numpy())
        run.print(f"samples written to {out}/ (grid.gif, samples.npz, one mp4 per video)")


# --- Sampling (Fig. 3): noise -> diffusion model -> VQGAN decoder ---

@torch.no_grad()
def generate(unet: UNet3D, vq: VQGAN3D, sched: Schedule, cfg: Config, *, n, labels=None, fps=None, guidance=1.0,
             frames=None, steps=100, sampler="ddpm", eta=1.0, requantize=True, seed=0, device="cpu", dtype=None,
             progress=False):
    """n videos, uint8 (n, T, H, W, 3). labels (n,) or None; fps the clips' frame rate (default: the training
    data's); Eq. (9) guidance w (1: the plain conditional model). The sampled z_e is snapped to its nearest codes
    before decoding (requantize), as the decoder only ever saw quantized latents."""
    g = torch.Generator(device=device).manual_seed(seed)
    l, h = (frames or cfg.frames) // cfg.ae_down_t, cfg.resolution // cfg.ae_down_s
    f = torch.full((n,), float(fps or cfg.fps), device=device)

    def noise(x):
        return torch.randn(x.shape, generator=g, device=device)

    def eps(label):
        def fn(z, t):
            with autocast(torch.device(device), dtype):
                return unet(z, t, f, label).float()
        return fn

    if labels is None:
        eps_fn = eps(None)
    else:
        labels = labels.to(device)
        # Eq. (9): w (eps_c - eps_u) + eps_u; w = 1 needs no unconditional pass
        eps_fn = eps(labels) if guidance == 1 else guided(eps(labels), eps(unet.null_label(n, device)), guidance,
                                                          cfg_vqvdm)
    z_T = noise(torch.empty(n, cfg.z_channels, l, h, h))
    # x0_hat clipped to [-1, 1], the training latents' range (set_latent_range), as DDPM clips pixels. Unclipped,
    # the chain blew up (std 5-9): near t = T, x0_hat = (z_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)
    # keeps sqrt((1 - alpha_bar) / alpha_bar) = 157 times the noise that eps_hat under-predicts (a regression
    # towards 0 where the network is unsure), and the posterior's x0 coefficient carries it into z_{t-1}
    if sampler == "ddpm":
        z = ddpm_sample(eps_fn, z_T, sched, steps, clip_x0=1.0, noise_fn=noise, progress=progress)
    else:
        z = ddim_sample(eps_fn, z_T, sched, steps, eta=eta, clip_x0=1.0, noise_fn=noise, progress=progress)
    z = unet.from_diffusion(z)
    if requantize and cfg.latent == "z_e":
        z = vq.quantize(z)
    return to_uint8(vq.decode(z).float())


def load_for_sampling(args, device):
    """The EMA diffusion model and the frozen VQGAN of a run or checkpoint file."""
    path = find_checkpoint(SCRIPT, args.run, args.ckpt)
    ckpt = load_checkpoint(path, SCRIPT, mmap=True, entries=("ema",))
    if "ema" not in ckpt:
        raise UserError(f"{path} is a {ckpt.get('stage')} checkpoint, not a diffusion one: pass diffusion.pt")
    cfg = config_from_checkpoint(Config, ckpt, path)
    unet = load_state_checked(UNet3D(cfg), ckpt["ema"]["model"], path)
    return cfg, unet.to(device).eval(), load_vqgan(path.parent, cfg, device), path


def check_guidance(guidance, label, unet: UNet3D):
    """--label and Eq. (9)'s w need a class-conditional run."""
    if not unet.num_classes:
        if label is not None or guidance != 1:
            raise UserError("this run is unconditional on classes: --label and --guidance need one trained with "
                            "--class-cond on labelled data")


def conditioning(args, cfg: Config, unet: UNet3D, n):
    """The labels (n,) or None and the fps that `sample` asks for, checked against what the run learned."""
    if args.fps is not None and not cfg.fps_cond:
        raise UserError("this run was trained without fps conditioning: --fps does not apply")
    check_guidance(args.guidance, args.label, unet)
    if not unet.num_classes:
        return None, args.fps
    if args.label is not None and not 0 <= args.label < unet.num_classes:
        raise UserError(f"--label must be in 0..{unet.num_classes - 1} for this run, got {args.label}")
    labels = torch.full((n,), args.label) if args.label is not None else torch.arange(n) % unet.num_classes
    return labels, args.fps


def check_frames(frames, cfg: Config):
    if frames is not None and (frames < cfg.ae_down_t or frames % cfg.ae_down_t):
        raise UserError(f"--frames must be a positive multiple of the VQGAN's temporal factor {cfg.ae_down_t}, "
                        f"got {frames}")


def sample(args):
    device = pick_device(args.device)
    cfg, unet, vq, path = load_for_sampling(args, device)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    check_steps(sched, ("--steps", args.steps))
    check_frames(args.frames, cfg)
    check_sample_memory(args.n, args.frames or cfg.frames, cfg.resolution, device)
    labels, fps = conditioning(args, cfg, unet, args.n)
    out = output_folder(args.out or path.parent / "samples" / "sample")
    videos = generate(unet, vq, sched, cfg, n=args.n, labels=labels, fps=fps, guidance=args.guidance,
                      frames=args.frames, steps=args.steps, sampler=args.sampler, eta=args.eta,
                      requantize=args.requantize, seed=args.seed, device=device,
                      dtype=pick_precision(args.precision, device), progress=True)
    write_samples(out, videos, None if labels is None else labels.numpy())
    how = "unconditional" if labels is None else f"class {args.label}" if args.label is not None else "classes in turn"
    print(f"wrote {args.n} videos ({how}, w = {args.guidance}, {fps or cfg.fps:g} fps) to {out}/ (grid.gif, "
          f"samples.npz, video_*.mp4)")


# --- Evaluation ---

def evaluate(args):
    """FVD and KVD of samples against the training data (IS with --c3d, on class-conditional samples whose labels
    cycle through the classes), and the VQGAN's PSNR, SSIM and R-FVD on held-out clips."""
    device = pick_device(args.device)
    cfg, unet, vq, path = load_for_sampling(args, device)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    steps = args.steps or 100
    check_steps(sched, ("--steps", steps))
    check_frames(args.frames, cfg)
    check_guidance(args.guidance, None, unet)
    dtype = pick_precision(args.precision, device)

    def fake(n, frames, seed):
        labels = torch.arange(seed, seed + n) % unet.num_classes if unet.num_classes else None
        return generate(unet, vq, sched, cfg, n=n, labels=labels, guidance=args.guidance, frames=frames,
                        steps=steps, seed=seed, device=device, dtype=dtype)

    evaluate_run(SCRIPT, cfg, path.parent, fake, frames=args.frames or cfg.frames, device=device,
                 reconstruct=lambda x: vq.decode(vq.quantize(vq.encode(x))),
                 sampler={"sampler": "ddpm", "steps": steps, "guidance": args.guidance}, **eval_settings(args, cfg))


# --- Command line ---

def cli(argv=None):
    parser, sub = build_parser(SCRIPT, __doc__, Config, PRESETS, stages=("all", *STAGES))
    s = sub["sample"]
    s.add_argument("--fps", type=number(float, 0, FPS_MAX, lo_open=True), default=None,
                   help=f"frame rate of the clips, above 0 and at most {FPS_MAX} (default: the training data's "
                        f"median)")
    s.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="DDPM (--steps below T respaces it) or DDIM")
    s.add_argument("--eta", type=number(float, 0, 1), default=1.0, help="DDIM stochasticity")
    s.add_argument("--requantize", default=True, action=argparse.BooleanOptionalAction,
                   help="snap sampled z_e to its nearest codes before decoding (runs trained with --latent z_q "
                        "diffuse codes: nothing to snap)")
    s.set_defaults(steps=100, guidance=1.0)
    sub["eval"].add_argument("--guidance", type=number(float, 0, GUIDANCE_MAX), default=1.0)
    for p in (s, sub["eval"]):   # Eq. (9)'s w differs from LVDM's and VideoFusion's: say so where users look
        next(a for a in p._actions if a.dest == "guidance").help = (
            "classifier-free guidance w of Eq. (9), w (eps_c - eps_u) + eps_u: 1 is the plain conditional model, "
            "0 the unconditional one, above 1 guided (LVDM's and VideoFusion's w = this w - 1); 0 to "
            f"{GUIDANCE_MAX}")
    args = parser.parse_args(argv)
    run_command(args, train=train, sample=sample, eval=evaluate)


if __name__ == "__main__":
    main(cli)
