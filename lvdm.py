"""LVDM: Latent Video Diffusion Models for High-Fidelity Long Video Generation.
He, Yang, Zhang, Shan, Chen. arXiv 2211.13221 (2022).

The idea: compress a video with a 3D autoencoder (8x in space, 4x in time) and run diffusion on the small latent
with a 3D U-Net. Long videos come from the same network trained with a mask channel: a prediction model extends a
clip from its last latents, an interpolation model fills the latents between two given ones. Hierarchical
generation predicts sparse keyframe latents first and interpolates every gap after; the given latents are
perturbed by noise (conditional latent perturbation) and the unconditional score guides the conditional one
(unconditional guidance), both against the errors that accumulate over a thousand frames.

Implemented here, all of it:
  §3.1 the 3D autoencoder: 3D convolutions with replicate "same" padding on t, h and w (shift-equivariant in
       time), the official encoder/decoder layout (19.4M parameters at the paper's size); MSE + LPIPS as the paper
       states (`--rec-loss l1` for the official code's L1), a per-frame 2D PatchGAN with hinge loss and VQGAN's
       adaptive weight from `--disc-start` on (LPIPS required by the paper presets); latent shift and scale
       computed from random training clips
  §3.2 the 3D U-Net: 1x3x3 convolutions only, adaptive group norm carrying the timestep, factorized attention
       (spatial over H*W, then temporal over T with learned relative positions) at the official levels
  §3.3 mask-channel conditioning (Eq. 8), prediction and interpolation models started from the short one,
       joint conditional/unconditional training, conditional latent perturbation (s < s_max = 250 in training,
       s = 100 in sampling), unconditional guidance (Eq. 9), hierarchical and autoregressive long videos
  §4.1 the full UCF-101 and TaiChi (train and test splits, `--train-split all`), Sky Time-lapse's train split
What differs from the official code (github.com/YingqingHe/LVDM), each on purpose: the temporal attention adds its
relative-position logits untransposed and scaled as q.k (the official einsum adds them transposed); every gap
between keyframes is interpolated (the official loop fills one in three and returns ~1/3 of the frames asked for);
the unconditional guidance pass sees the sampler's own latents everywhere, none of the given ones (the official
one sees the given latents as z_s, written into its state, with an all-zero mask), and the same "no condition"
embedding that unconditional training examples get (the official one gets none); with guidance, the sampler's
state at the given latents follows that pass alone; the prediction model also learns dense (stride-1) clips,
told apart by a stride embedding, so that one run serves both `--mode autoregressive` and `--mode hierarchical`;
pred and interp start from the short model's EMA weights with a zero-initialised mask input channel and
zero-initialised embeddings (the official code has no working path for this).

    python lvdm.py train                                    # tiny demo on synthetic videos, CPU, < 10 minutes
    python lvdm.py sample                                   # 8 short clips from the unconditional model
    python lvdm.py sample --frames 256 --mode hierarchical  # keyframes by prediction, every gap interpolated
    python lvdm.py eval --frames 64                         # FVD of every 16-frame window (Fig. 6/7 curves)
    python lvdm.py train --data ucf101 --data-root DIR --preset ucf256
"""
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from common.checkpoint import config_from_checkpoint, find_checkpoint, load_checkpoint, load_state_checked
from common.cli import (GUIDANCE_MAX, SEED_MAX, build_parser, check_steps, config_from_args, eval_settings, flag,
                        main, number)
from common.data import DATASETS, StreamSampler, fixed_batch, make_dataset
from common.diffusion import Schedule, cfg_lvdm, ddim_sample, ddpm_sample
from common.errors import TooShort, UserError
from common.evaluate import evaluate_run
from common.files import output_folder
from common.gan import PatchGAN, adaptive_weight, frozen, hinge_d_loss, hinge_g_loss, started
from common.lpips import load_lpips, perceptual_loss_or_none
from common.metrics import psnr
from common.nn import norm, timestep_embedding, zero
from common.run import (autocast, check_memory, check_sample_memory, clip_floats, count_params, fmt_params,
                        pick_device, pick_precision)
from common.train import Run, run_command, train_stage
from common.video import make_grid, to_uint8, write_gif, write_samples

SCRIPT = "lvdm"


# --- Configuration ---

@dataclass
class Config:
    # data and optimisation (shared flags of every script)
    data: str = flag("synthetic", "dataset", choices=list(DATASETS))
    data_root: Optional[str] = flag(None, "dataset folder (see README, Data)")
    train_split: str = flag("train", "videos to train on: the train split, or all of them, train and test (§4.1 for "
                            "UCF-101 and TaiChi; a folder has no split)", choices=["train", "all"])
    steps: int = flag(600, "steps of the short (unconditional) diffusion model", lo=1)
    ae_steps: int = flag(600, "autoencoder steps", lo=1)
    pred_steps: int = flag(400, "steps of the prediction model (started from the short model)", lo=1)
    interp_steps: int = flag(300, "steps of the interpolation model (started from the short model)", lo=1)
    batch_size: int = flag(8, "clips per diffusion step and process", lo=1)
    ae_batch_size: int = flag(4, "clips per autoencoder batch and process", lo=1)
    lr: float = flag(1e-3, "diffusion learning rate (AdamW, weight decay 0.01, constant)", lo=0, lo_open=True)
    ae_lr: float = flag(5e-4, "autoencoder and discriminator learning rate (Adam, betas 0.5, 0.9)", lo=0, lo_open=True)
    seed: int = flag(0, "random seed", lo=0, hi=SEED_MAX)
    sample_every: int = flag(0, "write a sample GIF every N diffusion steps (0: never)", lo=0)
    save_every: int = flag(200, "checkpoint every N steps (0: only at the end)", lo=0)
    # the paper's method
    frames: int = flag(16, "frames per short clip (a multiple of the autoencoder's temporal factor)", lo=1)
    resolution: int = flag(32, "frame height and width", lo=1)
    rec_loss: str = flag("mse", "autoencoder reconstruction loss: MSE as §3.1 states, or L1 as the official code",
                         choices=["mse", "l1"])
    disc_start: int = flag(400, "autoencoder step from which the adversarial loss is on (official: 50001)", lo=0)
    diffusion_loss: str = flag("l2", "denoising loss: L2 as Eq. (7), or L1 as the official configs",
                               choices=["l2", "l1"])
    cond_noise_max: int = flag(250, "s_max: given latents are perturbed to z_s, s < s_max, in training (§3.3)",
                               lo=1)
    p_cond_pred: float = flag(0.5, "probability that a prediction example is conditional (p_c; the rest are p_u)",
                              lo=0, hi=1)
    p_cond_interp: float = flag(0.9, "probability that an interpolation example is conditional", lo=0, hi=1)
    cond_latents: int = flag(1, "k: latents the prediction model is given", lo=1)
    key_stride: int = flag(4, "latents between two keyframes of hierarchical generation (official: 4)", lo=2)
    # architecture and fixed training settings (presets only)
    ae_ch: int = 16
    ae_down_t: int = 4              # temporal factor of the autoencoder (paper: 4)
    ae_down_s: int = 4              # spatial factor (paper: 8; tiny: 4, so a 32x32 frame keeps an 8x8 latent)
    z_channels: int = 4
    ae_accumulate: int = 1          # batches per autoencoder step (official: batch 1, accumulate 2)
    kl_weight: float = 0.0          # the official KL weight: a plain autoencoder with a sampled posterior
    lpips_weight: float = flag(1.0, "weight of LPIPS in the autoencoder's loss (§3.1); 0 trains without it, "
                                    "where VGG-16's weights cannot be had (a GPU machine with no network)", lo=0)
    disc_ch: int = 32
    disc_layers: int = 2
    disc_weight: float = 0.5        # x the adaptive weight (official disc_weight)
    ch: int = 32
    mult: tuple = (1, 2)
    blocks: int = 1
    attn_ds: tuple = (1, 2)         # downsampling factors with factorized attention (and the middle block)
    heads: int = 4
    temporal_length: int = 4        # relative positions clip at +-this many latents (official: 4)
    dropout: float = 0.0
    schedule: str = "sqrt_linear"   # LDM's "linear": sqrt(beta) from sqrt(0.0015) to sqrt(beta_end)
    beta_end: float = 0.0155        # official configs/lvdm_short/*.yaml
    timesteps: int = 1000
    ema_decay: float = 0.999
    grad_clip: float = 1.0          # ours, for tiny's lr 1e-3; the official code clips nothing
    checkpointing: bool = False     # gradient checkpointing of the U-Net's ResBlocks (official: on)


PRESETS = {
    "tiny": Config(),
    # the released UCF-101 configuration (official configs/videoae/ucf.yaml, configs/lvdm_short/ucf.yaml,
    # configs/lvdm_long/*): 16 x 256^2 -> 4 x 32^2 x 4, U-Net 548.9M. The step counts are ours (the configs give
    # epochs); the batch sizes are per process.
    "ucf256": Config(data="ucf101", train_split="all", frames=16, resolution=256, steps=400_000, ae_steps=100_000,
                     pred_steps=200_000, interp_steps=200_000, batch_size=2, ae_batch_size=1, ae_accumulate=2, lr=6e-5,
                     ae_lr=3.6e-5, sample_every=10_000, save_every=5_000, rec_loss="mse", disc_start=50_001, ae_ch=32,
                     ae_down_t=4, ae_down_s=8, disc_ch=64, disc_layers=3, ch=256, mult=(1, 2, 3, 4), blocks=3,
                     attn_ds=(2, 4, 8), heads=4, ema_decay=0.9999, grad_clip=0.0, checkpointing=True),
}
PRESETS["sky256"] = dataclasses.replace(PRESETS["ucf256"], data="sky", train_split="train")   # §4.1: its train split
PRESETS["taichi256"] = dataclasses.replace(PRESETS["ucf256"], data="taichi", ae_lr=1.6e-5)   # frame stride 4
# the model of the paper's Table 2 ("418+19"M): 2 ResBlocks per level and attention at all four levels
PRESETS["table2"] = dataclasses.replace(PRESETS["ucf256"], blocks=2, attn_ds=(1, 2, 4, 8))

STAGES = ("ae", "short", "pred", "interp")    # `train` runs them in this order

AE_ARCH = ("resolution", "ae_ch", "ae_down_t", "ae_down_s", "z_channels")
ARCH = AE_ARCH + ("frames", "disc_ch", "disc_layers", "ch", "mult", "blocks", "attn_ds", "heads", "temporal_length",
                  "schedule", "beta_end", "timesteps", "cond_noise_max", "key_stride")


# --- §3.1 The 3D autoencoder ---

def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def same_pad(kernel, stride):
    """F.pad's (w, w, h, h, t, t) amounts that make a conv's output size input / stride: k - s per axis, the
    extra one in front when k - s is odd (official aemodules3d.py SamePadConv3d)."""
    pad = []
    for k, s in reversed(list(zip(_triple(kernel), _triple(stride)))):
        p = k - s
        pad += [p - p // 2, p // 2]
    return tuple(pad)


class SamePadConv3d(nn.Module):
    """A 3D conv on an input padded by repeating its border frames and pixels: the "repeat padding" that keeps
    the encoder shift-equivariant in time (§3.1)."""

    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        self.pad = same_pad(kernel, stride)
        self.conv = nn.Conv3d(cin, cout, kernel, stride)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class SamePadConvTranspose3d(nn.Module):
    """The decoder's upsampling: the input padded as in SamePadConv3d, then a transposed conv with padding k - 1,
    which makes the output exactly stride x the input."""

    def __init__(self, cin, cout, kernel=4, stride=2):
        super().__init__()
        self.pad = same_pad(kernel, stride)
        self.conv = nn.ConvTranspose3d(cin, cout, kernel, stride, padding=tuple(k - 1 for k in _triple(kernel)))

    def forward(self, x):
        return self.conv(F.pad(x, self.pad, mode="replicate"))


class ResBlock3d(nn.Module):
    """(GroupNorm -> SiLU -> 3^3 conv) twice, plus the input."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(norm(ch), nn.SiLU(), SamePadConv3d(ch, ch, 3), norm(ch), nn.SiLU(),
                                  SamePadConv3d(ch, ch, 3))

    def forward(self, x):
        return x + self.body(x)


def stage_strides(down_t, down_s):
    """Per-stage (t, h, w) strides: log2 of each factor halvings, time halved in the first stages only
    (official: [4, 8, 8] gives (2,2,2), (2,2,2), (1,2,2))."""
    n_t, n_s = int(math.log2(down_t)), int(math.log2(down_s))
    return [(2 if i < n_t else 1, 2 if i < n_s else 1, 2 if i < n_s else 1) for i in range(max(n_t, n_s))]


class Autoencoder3D(nn.Module):
    """(B, 3, T, H, W) <-> (B, z, T/f_t, H/f_s, W/f_s). Encoder: a 3^3 conv, then per stage a 4^3 strided conv and
    one ResBlock (channels ch -> 2ch -> 4ch -> 8ch), GroupNorm, SiLU and a 3^3 conv to the posterior's mean and
    log-variance. Decoder: per stage a 4^3 transposed conv and two ResBlocks, then a 3^3 conv to RGB (official
    autoencoder3d.py / aemodules3d.py). A diagonal-Gaussian posterior whose KL weight is 0 in the official configs."""

    def __init__(self, cfg: Config):
        super().__init__()
        strides, ch, z = stage_strides(cfg.ae_down_t, cfg.ae_down_s), cfg.ae_ch, cfg.z_channels
        enc, c = [SamePadConv3d(3, ch, 3)], ch
        for i, s in enumerate(strides):
            enc += [SamePadConv3d(c, ch * 2 ** (i + 1), 4, s), ResBlock3d(ch * 2 ** (i + 1))]
            c = ch * 2 ** (i + 1)
        enc += [norm(c), nn.SiLU(), SamePadConv3d(c, 2 * z, 3)]
        self.encoder, self.quant_conv = nn.Sequential(*enc), nn.Conv3d(2 * z, 2 * z, 1)
        dec, c = [], z
        for i, s in enumerate(strides):           # time is upsampled first, as the encoder downsampled it first
            cout = ch * 2 ** (len(strides) - i)
            dec += [SamePadConvTranspose3d(c, cout, 4, s), ResBlock3d(cout), ResBlock3d(cout)]
            c = cout
        self.post_quant_conv, self.decoder = nn.Conv3d(z, z, 1), nn.Sequential(*dec)
        self.conv_out = SamePadConv3d(c, 3, 3)

    def encode(self, x):
        """Posterior mean and log-variance, each (B, z, T/f_t, H/f_s, W/f_s)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def sample(self, x, generator=None):
        """A posterior sample: what the official LatentDiffusion trains on (not the mean)."""
        mean, logvar = self.encode(x)
        return mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device)

    def decode(self, z):
        return self.conv_out(self.decoder(self.post_quant_conv(z)))


class AdversarialAE(nn.Module):
    """The autoencoder and its per-frame 2D PatchGAN as one module: one checkpoint, one optimizer (Adam with the
    same settings for both, as the official two), and a forward that is one batch's loss, so DDP sees every step."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ae = Autoencoder3D(cfg)
        self.disc = PatchGAN(2, cfg.disc_ch, cfg.disc_layers)          # taming's NLayerDiscriminator, BatchNorm
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))   # batches seen: the step, on resume too

    def forward(self, x, cfg: Config, lpips=None):
        return ae_loss(self, x, cfg, lpips)


def frames_of(x):
    return rearrange(x, "b c t h w -> (b t) c h w")


def ae_loss(model: AdversarialAE, x, cfg: Config, lpips=None):
    """One batch of the autoencoder stage (official losses/contperceptual.py, with the paper's MSE by default):
    rec  = MSE (or L1) + lpips_weight LPIPS over every frame, + kl_weight KL
    from --disc-start on, the generator term lambda * disc_weight * hinge_g(D(x_hat)) with VQGAN's adaptive
    lambda, and the discriminator's hinge loss on detached reconstructions. Both nets step on the same batch: the
    generator term reaches D's weights detached (gan.frozen), the discriminator term reaches no autoencoder weight."""
    step = int(model.calls) // cfg.ae_accumulate
    model.calls += 1
    mean, logvar = model.ae.encode(x)
    x_hat = model.ae.decode(mean + (0.5 * logvar).exp() * torch.randn_like(mean))
    diff = (x_hat.float() - x)
    rec = diff.pow(2).mean() if cfg.rec_loss == "mse" else diff.abs().mean()
    out = {cfg.rec_loss: rec}
    if lpips is not None and cfg.lpips_weight:
        p = lpips(frames_of(x_hat).float(), frames_of(x)).mean()
        rec, out["lpips"] = rec + cfg.lpips_weight * p, p
    kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float()).mean()
    loss = rec + cfg.kl_weight * kl
    if started(step, cfg.disc_start):
        g = hinge_g_loss(frozen(model.disc, frames_of(x_hat))[0])
        weight = adaptive_weight(rec, g, model.ae.conv_out.conv.weight) * cfg.disc_weight
        d = hinge_d_loss(model.disc(frames_of(x))[0], model.disc(frames_of(x_hat.detach()))[0])
        loss = loss + weight * g + d
        out.update(g=g, d=d, adaptive=weight)
    return {"loss": loss, **out}


# --- §3.2 The 3D U-Net ---

def conv133(cin, cout, stride=1):
    """Space-only 1x3x3 conv: the U-Net has no temporal convolution (§3.2)."""
    return nn.Conv3d(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1))


class ResBlock(nn.Module):
    """GN -> SiLU -> conv, then adaptive group norm: GN(h) (1 + scale) + shift with (scale, shift) a linear map of
    the embedding (timestep, and for pred/interp the condition level and stride), -> SiLU -> zero-init conv.
    GroupNorm pools over all frames (T x H x W)."""

    def __init__(self, cin, cout, emb_dim, dropout, use_checkpoint=False):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), conv133(cin, cout)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), zero(conv133(cout, cout))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
        self.use_checkpoint = use_checkpoint

    def forward(self, x, emb):
        if self.use_checkpoint and self.training:
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):                  # x (B, C, T, H, W), emb (B, E)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[..., None, None, None].chunk(2, dim=1)
        h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of each frame, zero-initialised output."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv, self.out = nn.Conv3d(ch, 3 * ch, 1), zero(nn.Conv3d(ch, ch, 1))

    def forward(self, x):                         # x (B, C, T, H, W)
        B, C, T, H, W = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) t y x -> three (b t) h (y x) d",
                            three=3, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(o, "(b t) h (y x) d -> b (h d) t y x", t=T, y=H))


def relative_attention(q, k, v, rel_k, rel_v, max_dist):
    """Self-attention over T with Shaw et al.'s relative positions: for a query i and key j at distance
    r = clip(j - i, -max_dist, max_dist),
        logit_ij = q_i . (k_j + a^K_r) / sqrt(d),     out_i = sum_j softmax_j(logit_ij) (v_j + a^V_r).
    q, k, v (M, heads, T, d); rel_k, rel_v (2 max_dist + 1, d). The official code adds the a^K term transposed
    (einsum 'bct,tsc->bst' into a query x key matrix) and scales it by d^-1/4; here it is the formula above."""
    T, d = q.shape[-2], q.shape[-1]
    pos = torch.arange(T, device=q.device)
    index = (pos[None, :] - pos[:, None]).clamp(-max_dist, max_dist) + max_dist      # [i, j] -> j - i
    a_k, a_v = rel_k[index].to(q.dtype), rel_v[index].to(q.dtype)                     # (T, T, d)
    logits = (q @ k.transpose(-1, -2) + torch.einsum("mhid,ijd->mhij", q, a_k)) * d ** -0.5
    p = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    return p @ v + torch.einsum("mhij,ijd->mhid", p, a_v)


class TemporalAttention(nn.Module):
    """Multi-head self-attention over the T latents at each position, with relative positions (learned tables
    for keys and values, Xavier-initialised), zero-initialised output; no causal mask."""

    def __init__(self, ch, heads, max_dist):
        super().__init__()
        self.heads, self.max_dist, self.norm = heads, max_dist, norm(ch)
        self.qkv, self.out = nn.Conv3d(ch, 3 * ch, 1), zero(nn.Conv3d(ch, ch, 1))
        self.rel_k, self.rel_v = (nn.Parameter(nn.init.xavier_uniform_(torch.empty(2 * max_dist + 1, ch // heads)))
                                  for _ in range(2))

    def forward(self, x):                         # x (B, C, T, H, W)
        B, C, T, H, W = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) t y x -> three (b y x) h t d",
                            three=3, h=self.heads)
        o = relative_attention(q, k, v, self.rel_k, self.rel_v, self.max_dist)
        return x + self.out(rearrange(o, "(b y x) h t d -> b (h d) t y x", y=H, x=W))


class STAttention(nn.Module):
    """Factorized space-time attention (official STAttentionBlock): spatial, then temporal; no feed-forward."""

    def __init__(self, ch, heads, max_dist):
        super().__init__()
        self.spatial, self.temporal = SpatialAttention(ch, heads), TemporalAttention(ch, heads, max_dist)

    def forward(self, x, emb):
        return self.temporal(self.spatial(x))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = conv133(ch, ch, stride=2)

    def forward(self, x, emb):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = conv133(ch, ch)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


class Stage(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet3D(nn.Module):
    """ADM-style U-Net on latents (B, z, l, h, w). conditional=False: the short model eps(z_t, t).
    conditional=True: the prediction/interpolation model eps([z~_t, m], t, s, stride) of §3.3, whose input carries
    the mask channel and whose embedding adds the condition's noise level s (index s_max: no latent given) and
    whether its latents are keyframes (sparse) or consecutive (dense). Holds the latent shift and scale."""

    def __init__(self, cfg: Config, conditional: bool = False):
        super().__init__()
        self.conditional, self.ch, self.s_max = conditional, cfg.ch, cfg.cond_noise_max
        emb = 4 * cfg.ch
        self.time_mlp = nn.Sequential(nn.Linear(cfg.ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        if conditional:
            # zero-initialised, so that a model started from the short one computes what the short one did
            self.level_emb = zero(nn.Embedding(cfg.cond_noise_max + 1, emb))
            self.stride_emb = zero(nn.Embedding(2, emb))
        self.register_buffer("latent_shift", torch.tensor(0.0))   # z_diff = scale (z + shift), from training latents
        self.register_buffer("latent_scale", torch.tensor(1.0))

        def block(cin, cout, ds):
            layers = [ResBlock(cin, cout, emb, cfg.dropout, cfg.checkpointing)]
            if ds in cfg.attn_ds:
                layers.append(STAttention(cout, cfg.heads, cfg.temporal_length))
            return Stage(layers)

        ch, mult = cfg.ch, cfg.mult
        self.inp = conv133(cfg.z_channels + (1 if conditional else 0), ch)
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
        self.mid = Stage([ResBlock(cur, cur, emb, cfg.dropout, cfg.checkpointing),
                          STAttention(cur, cfg.heads, cfg.temporal_length),
                          ResBlock(cur, cur, emb, cfg.dropout, cfg.checkpointing)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * m, ds))
                cur = ch * m
                if level > 0 and i == cfg.blocks:
                    self.up[-1].append(Upsample(cur))
                    ds //= 2
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(conv133(cur, cfg.z_channels)))

    def forward(self, x, t, level=None, sparse=None):
        """x (B, z [+1], l, h, w); t (B,); level (B,) in 0..s_max; sparse (B,) 0 or 1 -> eps (B, z, l, h, w)."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if self.conditional:
            emb = emb + self.level_emb(level) + self.stride_emb(sparse)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

    def to_diffusion(self, z):
        """Autoencoder latents -> the diffused latents, scale (z + shift)."""
        return (self.latent_scale * (z.float() + self.latent_shift)).float()

    def from_diffusion(self, z):
        return z / self.latent_scale - self.latent_shift


# --- §3.3 Mask-channel conditioning and conditional latent perturbation ---

def perturb(sched: Schedule, z0, s, noise):
    """z_s ~ q(z_s | z_0), Eq. (3) with s counted from 1: s = 0 is z_0 itself, s = 1 the first diffusion step."""
    ab = sched.alpha_bar_like(s - 1, z0)                       # alpha_bar_{-1} = 1: s = 0 adds nothing
    return ab.sqrt().to(z0.dtype) * z0 + (1 - ab).sqrt().to(z0.dtype) * noise


def network_input(z_t, z_s, mask, s, s_max):
    """The conditional model's input and condition level, the same function in training and sampling.
    Eq. (8): z~ = [z_t (1 - m) + z_s m, m] per latent, the mask a channel; level = s for an example with a given
    latent, s_max ("no condition") for one without, so that unconditional examples and the unconditional guidance
    pass look alike. z_t (B, C, l, h, w); z_s like it or None; mask (B, 1, l, 1, 1) of 0/1; s (B,)."""
    x = z_t if z_s is None else torch.where(mask.bool(), z_s.to(z_t.dtype), z_t)
    B, _, l, h, w = z_t.shape
    has = mask.reshape(B, -1).amax(dim=1) > 0
    level = torch.where(has, s, torch.full_like(s, s_max))
    return torch.cat([x, mask.expand(B, 1, l, h, w).to(x.dtype)], dim=1), level


def condition_mask(kind: str, B: int, l: int, k: int, p_cond: float, device) -> torch.Tensor:
    """(B, 1, l, 1, 1) masks for training: "pred" gives the first k latents, "interp" the first and last; each
    example is conditional with probability p_cond and unconditional (all zeros) otherwise (Fig. 3: p_c, p_u)."""
    m = torch.zeros(B, 1, l, 1, 1, device=device)
    if kind == "pred":
        m[:, :, :k] = 1
    else:
        m[:, :, 0] = m[:, :, -1] = 1
    keep = (torch.rand(B, device=device) < p_cond).float()
    return m * keep[:, None, None, None, None]


def denoising_loss(pred, target, kind):
    """Eq. (7), ||eps - eps_theta||^2 (kind "l2"), or the official configs' L1."""
    pred = pred.float()
    return F.mse_loss(pred, target) if kind == "l2" else F.l1_loss(pred, target)


def short_loss(net, sched: Schedule, z0, cfg: Config):
    """The unconditional model on short clips, Eq. (7)."""
    t = torch.randint(0, sched.T, (z0.shape[0],), device=z0.device)
    eps = torch.randn_like(z0)
    return denoising_loss(net(sched.q_sample(z0, t, eps), t), eps, cfg.diffusion_loss)


def cond_loss(net, sched: Schedule, z0, cfg: Config, kind: str, sparse):
    """A conditional model's loss on clips of latents z0 (B, C, l, h, w): the given latents enter as z_s with
    s ~ U{0..s_max-1} (conditional latent perturbation), the rest as z_t; the target is the noise of each latent
    (that of z_s where given), over all latents as in the official code. sparse (B,): keyframe clips or not."""
    B = z0.shape[0]
    t = torch.randint(0, sched.T, (B,), device=z0.device)
    s = torch.randint(0, cfg.cond_noise_max, (B,), device=z0.device)
    eps_t, eps_s = torch.randn_like(z0), torch.randn_like(z0)
    z_t, z_s = sched.q_sample(z0, t, eps_t), perturb(sched, z0, s, eps_s)
    p = cfg.p_cond_pred if kind == "pred" else cfg.p_cond_interp
    mask = condition_mask(kind, B, z0.shape[2], cfg.cond_latents, p, z0.device)
    x, level = network_input(z_t, z_s, mask, s, cfg.cond_noise_max)
    target = torch.where(mask.bool(), eps_s, eps_t)
    return denoising_loss(net(x, t, level, sparse), target, cfg.diffusion_loss)


def key_clips(z, l, key_stride, sparse):
    """Training clips of l latents from long latent sequences z (B, C, L, h, w): keyframes z[:, :, ::key_stride]
    where sparse[b] (the hierarchical prediction model), else l consecutive latents from a random start."""
    B, L = z.shape[0], z.shape[2]
    starts = torch.randint(0, L - l + 1, (B,), device=z.device)
    dense = starts[:, None] + torch.arange(l, device=z.device)[None]                      # (B, l)
    keys = torch.arange(0, l * key_stride, key_stride, device=z.device)[None].expand(B, l)
    index = torch.where(sparse.bool()[:, None], keys, dense)
    return z[torch.arange(B, device=z.device)[:, None], :, index].permute(0, 2, 1, 3, 4)


def init_from_short(model: UNet3D, short_state: dict):
    """§4.1: prediction and interpolation models are resumed from the unconditional one. The input conv gains a
    zero-initialised mask channel; the level and stride embeddings start at zero (ours; the official code drops
    the mismatched conv to random init and crashes on the missing embedding)."""
    own = model.state_dict()
    own["level_emb.weight"].zero_()
    own["stride_emb.weight"].zero_()
    for key, value in short_state.items():
        if key == "inp.weight":
            own[key].zero_()
            own[key][:, :value.shape[1]] = value
        else:
            own[key] = value
    load_state_checked(model, own, "the short model's EMA weights")


# --- Training ---

def check_config(cfg: Config):
    """Mistakes the flags alone reveal, reported before any data is read."""
    for name in ("ae_down_t", "ae_down_s"):
        f = getattr(cfg, name)
        if f < 1 or f & (f - 1):
            raise UserError(f"{name} must be a power of 2, got {f}")
    if cfg.frames % cfg.ae_down_t:
        raise UserError(f"--frames {cfg.frames} is not a multiple of the autoencoder's temporal factor {cfg.ae_down_t}")
    if cfg.resolution % cfg.ae_down_s:
        raise UserError(f"--resolution {cfg.resolution} is not divisible by the autoencoder's spatial factor "
                        f"{cfg.ae_down_s}")
    h, halvings = cfg.resolution // cfg.ae_down_s, len(cfg.mult) - 1    # each U-Net level but the last halves h, w
    if h % 2 ** halvings:
        raise UserError(f"--resolution {cfg.resolution} gives {h}x{h} latents, which the U-Net halves {halvings} "
                        f"times: use a multiple of {cfg.ae_down_s * 2 ** halvings}")
    l = cfg.frames // cfg.ae_down_t
    if not 1 <= cfg.cond_latents < l:
        raise UserError(f"--cond-latents must leave a latent to predict in a {l}-latent clip: between 1 and {l - 1}, "
                        f"got {cfg.cond_latents}")
    if cfg.cond_noise_max > cfg.timesteps:
        raise UserError(f"--cond-noise-max must be between 1 and {cfg.timesteps}, got {cfg.cond_noise_max}")


def latents_per_clip(cfg: Config) -> int:
    return cfg.frames // cfg.ae_down_t


def report_sizes(cfg: Config, ae, unet, print_fn=print):
    l, h = latents_per_clip(cfg), cfg.resolution // cfg.ae_down_s
    print_fn(f"lvdm: autoencoder {fmt_params(count_params(ae))}, U-Net {fmt_params(count_params(unet))} parameters; "
             f"clips {cfg.frames}x{cfg.resolution}x{cfg.resolution} -> latent {l}x{h}x{h}x{cfg.z_channels}")


def load_autoencoder(run_dir, cfg: Config, device) -> Autoencoder3D:
    """The run's trained autoencoder, frozen."""
    path = Path(run_dir) / "ae.pt"
    if not path.exists():
        raise UserError(f"no autoencoder in {run_dir}: run `python {SCRIPT}.py train --stage ae` first")
    state = load_checkpoint(path, SCRIPT, {k: getattr(cfg, k) for k in AE_ARCH}, device)["model"]
    ae = Autoencoder3D(cfg).to(device)
    load_state_checked(ae, {k[3:]: v for k, v in state.items() if k.startswith("ae.")}, path)
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def set_latent_stats(unet: UNet3D, ae: Autoencoder3D, data, device, clips=32, batch_size=8, seed=0):
    """shift = -mean, scale = 1 / std of posterior samples of `clips` training clips, so that the diffused latents
    have zero mean and unit variance (the official configs hard-code these per dataset, LVDM issue #10). The clips
    are the first that a training stream of this seed draws: random videos of the whole data set, each from a
    random start frame. Its own generators: the same statistics whichever command computes them."""
    keys = list(itertools.islice(StreamSampler(len(data), clips, seed=seed), clips))   # (index, item_seed)
    g = torch.Generator(device=device).manual_seed(seed)
    z = []
    for a in range(0, clips, batch_size):
        video = torch.stack([data[key]["video"] for key in keys[a:a + batch_size]]).to(device)
        z.append(ae.sample(video, g).float())
    z = torch.cat(z)
    unet.latent_shift.fill_(-z.mean().item())
    unet.latent_scale.fill_(1.0 / z.std().item())
    return unet.latent_shift.item(), unet.latent_scale.item()


def perceptual_loss(cfg: Config, preset: str):
    """LPIPS for the autoencoder's loss (§3.1), on the CPU. Without its weights the tiny demo trains on MSE alone
    after a warning; a paper preset refuses to, as its autoencoder would not be the paper's."""
    if not cfg.lpips_weight:
        return None
    if preset == "tiny":
        return perceptual_loss_or_none("cpu")
    try:
        return load_lpips(device="cpu")
    except UserError as e:
        raise UserError(f"--preset {preset} trains the autoencoder with LPIPS as §3.1 does; {e}") from None


class Joined(torch.utils.data.Dataset):
    """Data sets one after the other, read as each of them is: by an int, or by a training key (index, item_seed)."""

    def __init__(self, parts):
        self.parts = parts

    def __len__(self):
        return sum(len(part) for part in self.parts)

    def __getitem__(self, key):
        index, item_seed = key if isinstance(key, (tuple, list)) else (key, None)
        for part in self.parts:
            if index < len(part):
                return part[index if item_seed is None else (index, item_seed)]
            index -= len(part)
        raise IndexError(key)


def step_memory(cfg: Config, stages) -> dict:
    """A floor of what one step of each of `stages` holds (common/run.py): the clips it reads and the
    autoencoder's first activations at full size (the prediction and interpolation models read long clips)."""
    R, w = cfg.resolution, 2 * cfg.ae_ch
    clips = {"ae": (cfg.ae_batch_size, cfg.frames), "short": (cfg.batch_size, cfg.frames),
             "pred": (cfg.batch_size, cfg.frames * cfg.key_stride),
             "interp": (cfg.batch_size, (cfg.key_stride + 1) * cfg.ae_down_t)}
    return {f"{'an autoencoder' if s == 'ae' else 'a ' + s} step on {clips[s][0]} clips of {clips[s][1]}x{R}x{R}":
            clip_floats(*clips[s], R, (6 if s == "ae" else 3) + w) for s in stages}


def training_data(cfg: Config, frames: int):
    """Clips of `frames` frames from --train-split: the train split, or all videos (its train and test splits
    joined), as §4.1 trains on UCF-101 and TaiChi ("Due to the limited number of videos ... we adopt the full
    dataset") and on Sky Time-lapse's train split only."""
    splits = ("train", "test") if cfg.train_split == "all" and cfg.data != "folder" else ("train",)
    parts = [make_dataset(cfg.data, cfg.data_root, frames=frames, resolution=cfg.resolution, split=split,
                          seed=cfg.seed) for split in splits]
    return parts[0] if len(parts) == 1 else Joined(parts)


def train(args):
    cfg = config_from_args(Config, PRESETS, args)
    check_config(cfg)
    stages = STAGES if args.stage == "all" else (args.stage,)
    check_memory(step_memory(cfg, stages), pick_device(args.device))
    lpips = perceptual_loss(cfg, args.preset) if "ae" in stages else None     # missing weights: found before data
    l, ft = latents_per_clip(cfg), cfg.ae_down_t
    data = training_data(cfg, cfg.frames)
    # the prediction model reads key_stride clips' worth of frames, the interpolation model key_stride + 1 latents:
    # videos too short for them are found now, not after the stages before them have trained. Asked for by name,
    # such a stage is an error; within `all`, both are left out (interpolation only fills gaps between predicted
    # keyframes), the run says so and samples short clips
    long_clips, left_out = {}, []
    for name, frames in (("pred", cfg.frames * cfg.key_stride), ("interp", (cfg.key_stride + 1) * ft)):
        if name not in stages:
            continue
        try:
            long_clips[name] = training_data(cfg, frames)
        except TooShort as e:
            if args.stage != "all":
                raise
            left_out = [f"pred, interp: left out: the {name} model trains on {frames}-frame clips (pred: --frames x "
                        f"--key-stride) and the longest video holds {e.longest}; this run samples "
                        f"clips of up to {cfg.frames} frames with the short model (long videos need longer training "
                        f"videos or a smaller --key-stride)"]
            long_clips = {}
            break
    stages = tuple(s for s in stages if s not in ("pred", "interp") or s in long_clips)
    match = {k: getattr(cfg, k) for k in ARCH}     # what the run's checkpoints must share with this config
    run = Run.start(SCRIPT, cfg, preset=args.preset, run_dir=args.run, device=args.device,
                    precision=args.precision, compile=args.compile, must_match=match)
    dev = run.device
    for line in left_out:
        run.print(line)
    gan, short = AdversarialAE(cfg).to(dev), UNet3D(cfg).to(dev)
    report_sizes(cfg, gan.ae, short, run.print)
    every_stage = dict(config=cfg, must_match=match, seed=cfg.seed, save_every=cfg.save_every)
    sched = Schedule.make(cfg.schedule, cfg.timesteps, beta_end=cfg.beta_end)

    # stage 1: the 3D autoencoder with its per-frame discriminator (§3.1)
    if "ae" in stages:
        lpips = lpips.to(dev) if lpips is not None else None
        train_stage(run, "ae", gan, torch.optim.Adam(gan.parameters(), lr=cfg.ae_lr, betas=(0.5, 0.9)),
                    lambda net, batch: net(batch["video"], cfg, lpips), data, steps=cfg.ae_steps,
                    batch_size=cfg.ae_batch_size, accumulate=cfg.ae_accumulate, find_unused_parameters=True,
                    grad_clip=cfg.grad_clip, **every_stage)
        held_out = fixed_batch(make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution,
                                            split="test", seed=cfg.seed), 8)["video"].to(dev)
        ae = load_autoencoder(run.dir, cfg, dev)
        with torch.no_grad():
            rec = ae.decode(ae.encode(held_out)[0])
        seen = " (trained on: --train-split all)" if cfg.train_split == "all" else ""
        run.print(f"autoencoder: reconstruction PSNR {psnr(rec, held_out).mean().item():.2f} dB on 8 test-split "
                  f"clips{seen}")
    if stages == ("ae",):
        return
    ae = load_autoencoder(run.dir, cfg, dev)

    def encode(unet, x):
        with torch.no_grad():
            return unet.to_diffusion(ae.sample(x))

    def diffusion_stage(name, unet, loss, dataset, steps, sample_fn=None, follows=()):
        return train_stage(run, name, unet, torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01),
                           loss, dataset, steps=steps, batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
                           grad_clip=cfg.grad_clip, sample_fn=sample_fn, sample_every=cfg.sample_every,
                           follows=follows, **every_stage)

    # stage 2: the unconditional model on short clips (§3.2)
    if "short" in stages:
        if not run.has("short"):
            shift, scale = set_latent_stats(short, ae, data, dev, seed=cfg.seed)
            run.print(f"short: latent shift {shift:.4f}, scale {scale:.4f} (from training latents)")

        def short_gif(ema, step):
            videos = generate_short(ema, ae, sched, cfg, n=8, steps=50, device=dev, dtype=run.dtype)
            write_gif(run.dir / "samples" / f"short_{step:07d}.gif", make_grid(videos))

        ema = diffusion_stage("short", short, lambda net, batch: short_loss(net, sched, encode(short, batch["video"]),
                                                                            cfg),
                              data, cfg.steps, short_gif, follows=("ae",))
        if run.dist.is_main:
            videos = generate_short(ema, ae, sched, cfg, n=8, steps=50, device=dev, dtype=run.dtype, progress=True)
            out = write_samples(run.dir / "samples" / "short", videos)
            run.print(f"short samples written to {out}/")

    # stages 3 and 4: prediction on keyframe (and dense) clips, interpolation between keyframes (§3.3)
    for name, steps in (("pred", cfg.pred_steps), ("interp", cfg.interp_steps)):
        if name not in stages:
            continue
        unet = UNet3D(cfg, conditional=True).to(dev)
        if not run.has(name):
            if not run.has("short"):
                raise UserError(f"the {name} model starts from the short one (§4.1): run `python {SCRIPT}.py train "
                                f"--stage short` first")
            init_from_short(unet, load_checkpoint(run.checkpoint("short"), SCRIPT, match, dev)["ema"]["model"])
            run.print(f"{name}: starting from the short model's EMA weights")

        def loss(net, batch, name=name, unet=unet):
            z = encode(unet, batch["video"])                   # (B, C, L, h, w): 16 latents (pred) or 5 (interp)
            B = z.shape[0]
            if name == "pred":   # half the examples keyframes (hierarchical), half consecutive (autoregressive)
                sparse = (torch.rand(B, device=z.device) < 0.5).long()
                return cond_loss(net, sched, key_clips(z, l, cfg.key_stride, sparse), cfg, "pred", sparse)
            return cond_loss(net, sched, z, cfg, "interp", torch.zeros(B, dtype=torch.long, device=z.device))

        diffusion_stage(name, unet, loss, long_clips[name], steps, follows=STAGES[:STAGES.index(name)])

    if "interp" in stages and run.has("pred") and run.dist.is_main:
        models = load_models(run.dir, dev, need=("pred", "interp"))[0]
        videos = generate_long(models, ae, sched, cfg, n=4, frames=4 * cfg.frames, mode="hierarchical", steps=50,
                               device=dev, dtype=run.dtype, progress=True)
        out = write_samples(run.dir / "samples" / "long", videos)
        run.print(f"long samples ({4 * cfg.frames} frames, hierarchical) written to {out}/")


# --- Sampling ---

@torch.no_grad()
def sample_clip(net: UNet3D, sched: Schedule, cfg: Config, shape, *, given=None, mask=None, sparse=0,
                guidance=0.0, cond_noise=100, sampler="ddim", steps=50, eta=1.0, generator=None, device="cpu",
                dtype=None):
    """One clip of diffused latents (B, C, l, h, w). The short model, or a conditional model with the latents
    `given` where `mask` (1, 1, l, 1, 1) is 1: the conditional pass sees them perturbed to z_s, s = cond_noise,
    drawn once per clip, and the sampler's state elsewhere. The unconditional pass (Eq. 9's eps_u: mask all zeros,
    level s_max, as unconditional training examples) sees the sampler's state at every latent and nothing of the
    given ones, neither clean nor perturbed, so that the errors they carry cannot reach it (§3.3). With guidance
    the state at the given latents follows eps_u alone (the conditional pass saw z_s there, not the state). Given
    latents are returned as they were given."""
    B = shape[0]

    def noise(x):
        return torch.randn(x.shape, generator=generator, device=device)

    def run(x, t, *args):
        with autocast(torch.device(device), dtype):
            return net(x, t, *args).float()

    if not net.conditional:
        def eps_fn(x, t):
            return run(x, t)
    else:
        stride = torch.full((B,), int(sparse), device=device, dtype=torch.long)
        s = torch.full((B,), cond_noise, device=device, dtype=torch.long)
        m = mask if mask is not None else torch.zeros(1, 1, shape[2], 1, 1, device=device)
        m = m.expand(B, -1, -1, -1, -1)
        z_s = perturb(sched, given, s, noise(given)) if given is not None else None    # drawn once per clip

        def eps_u(x, t):        # every mask zero: z~ = z_t, the sampler's own latents, no condition (§3.3, Eq. 8)
            inp, level = network_input(x, None, torch.zeros_like(m), s, net.s_max)
            return run(inp, t, level, stride)

        def eps_c(x, t):        # the first k (or the end) masks one: z~ = z_t (1 - m) + z_s m (Eq. 8)
            inp, level = network_input(x, z_s, m, s, net.s_max)
            return run(inp, t, level, stride)

        def eps_guided(x, t):
            e_c, e_u = eps_c(x, t), eps_u(x, t)
            # Eq. (9), (1 + w) eps_c - w eps_u, where the conditional pass saw the state; at the given latents it saw
            # z_s instead, so there the state follows eps_u alone: the unconditional pass sees at every latent a
            # latent it denoised itself, never the condition
            return torch.where(m.bool(), e_u, cfg_lvdm(e_c, e_u, guidance))

        eps_fn = eps_u if given is None else (eps_guided if guidance else eps_c)
    x_T = noise(torch.empty(shape))
    if sampler == "ddpm":
        z = ddpm_sample(eps_fn, x_T, sched, steps, noise_fn=noise)
    else:
        z = ddim_sample(eps_fn, x_T, sched, steps, eta=eta, noise_fn=noise)
    return z if given is None else torch.where(mask.bool(), given, z)


def decode_chunks(ae: Autoencoder3D, unet: UNet3D, z, frames, chunk=8, overlap=4):
    """Decode diffused latents (B, C, L, h, w) into the first `frames` frames as uint8 (B, frames, H, W, 3),
    `chunk` latents at a time with `overlap` latents of context on each side (official overlapped_decode), so
    that memory stays that of one chunk however long the video."""
    L, ft = z.shape[2], None
    out = []
    for a in range(0, L, chunk):
        lo, hi = max(0, a - overlap), min(L, a + chunk + overlap)
        x = ae.decode(unet.from_diffusion(z[:, :, lo:hi])).float()
        ft = ft or x.shape[2] // (hi - lo)
        out.append(to_uint8(x[:, :, (a - lo) * ft:(min(a + chunk, L) - lo) * ft]))
        if sum(v.shape[1] for v in out) >= frames:
            break
    return np.concatenate(out, axis=1)[:, :frames]


@torch.no_grad()
def generate_short(unet, ae, sched, cfg: Config, *, n, steps=50, sampler="ddim", eta=1.0, seed=0, frames=None,
                   device="cpu", dtype=None, progress=False):
    """n short clips from the unconditional model, uint8 (n, T, H, W, 3)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = cfg.resolution // cfg.ae_down_s
    z = sample_clip(unet, sched, cfg, (n, cfg.z_channels, latents_per_clip(cfg), h, h), sampler=sampler,
                    steps=steps, eta=eta, generator=g, device=device, dtype=dtype)
    return decode_chunks(ae, unet, z, frames or cfg.frames)


def plan(frames: int, cfg: Config, mode: str):
    """(latents L of the video, keyframes K, prediction clips, interpolation clips) for `frames` frames."""
    l, k = latents_per_clip(cfg), cfg.cond_latents
    L = math.ceil(frames / cfg.ae_down_t)
    K = L if mode == "autoregressive" else math.ceil((L - 1) / cfg.key_stride) + 1
    pred = 1 + max(0, math.ceil((K - l) / (l - k)))
    return L, K, pred, (K - 1 if mode == "hierarchical" else 0)


@torch.no_grad()
def generate_long(models: dict, ae, sched, cfg: Config, *, n, frames, mode="hierarchical", steps=50, sampler="ddim",
                  eta=1.0, guidance=0.1, cond_noise=100, seed=0, device="cpu", dtype=None, progress=False):
    """n videos of exactly `frames` frames, uint8 (n, frames, H, W, 3).
    autoregressive: the prediction model samples l consecutive latents unconditionally, then repeatedly l new
                    latents given the last k (dense stride).
    hierarchical:   the same on keyframes (sparse stride, key_stride latents apart) until the video is covered,
                    then the interpolation model fills every gap between consecutive keyframes (§3.3)."""
    pred, interp = models["pred"], models.get("interp")
    l, k, ks = latents_per_clip(cfg), cfg.cond_latents, cfg.key_stride
    L, K, n_pred, n_interp = plan(frames, cfg, mode)
    h = cfg.resolution // cfg.ae_down_s
    g = torch.Generator(device=device).manual_seed(seed)
    settings = dict(guidance=guidance, cond_noise=cond_noise, sampler=sampler, steps=steps, eta=eta, generator=g,
                    device=device, dtype=dtype)
    bar = tqdm(total=n_pred + n_interp, desc=f"{mode} clips", disable=not progress, leave=False)
    sparse = int(mode == "hierarchical")
    keys = sample_clip(pred, sched, cfg, (n, cfg.z_channels, l, h, h), sparse=sparse, **settings)
    bar.update(1)
    prev = torch.zeros(1, 1, l, 1, 1, device=device)
    prev[:, :, :k] = 1
    while keys.shape[2] < K:
        given = torch.cat([keys[:, :, -k:], torch.zeros_like(keys[:, :, :l - k])], dim=2)
        new = sample_clip(pred, sched, cfg, given.shape, given=given, mask=prev, sparse=sparse, **settings)
        keys = torch.cat([keys, new[:, :, k:]], dim=2)
        bar.update(1)
    keys = keys[:, :, :K]
    if mode == "autoregressive":
        z = keys
    else:
        ends = torch.zeros(1, 1, ks + 1, 1, 1, device=device)
        ends[:, :, 0] = ends[:, :, -1] = 1
        parts = [keys[:, :, :1]]
        for i in range(K - 1):                      # every gap (the official loop fills one in three)
            given = torch.zeros(n, cfg.z_channels, ks + 1, h, h, device=device)
            given[:, :, 0], given[:, :, -1] = keys[:, :, i], keys[:, :, i + 1]
            filled = sample_clip(interp, sched, cfg, given.shape, given=given, mask=ends, **settings)
            parts.append(filled[:, :, 1:])          # the ks - 1 new latents and the next keyframe
            bar.update(1)
        z = torch.cat(parts, dim=2)
    bar.close()
    return decode_chunks(ae, pred, z, frames)


def load_models(run_dir, device, need=("short",), files=None):
    """The EMA networks a sampling mode needs from a run directory, and the run's config; `files` ({stage: path})
    names a checkpoint to read for a stage instead of its file in the run directory. Checkpoints are mapped, not
    read: only the EMA weights leave the disk."""
    models, cfg = {}, None
    for name in need:
        path = (files or {}).get(name, Path(run_dir) / f"{name}.pt")
        if not path.exists():
            raise UserError(f"no {name} model in {run_dir} ({name}.pt): run `python {SCRIPT}.py train --stage {name}`"
                            f" (or `train` for every stage)")
        ckpt = load_checkpoint(path, SCRIPT, None if cfg is None else {k: getattr(cfg, k) for k in ARCH}, mmap=True,
                               entries=("ema",))
        if "ema" not in ckpt:
            raise UserError(f"{path} is not a diffusion checkpoint")
        cfg = cfg or config_from_checkpoint(Config, ckpt, path)
        unet = load_state_checked(UNet3D(cfg, conditional=name != "short"), ckpt["ema"]["model"], path)
        models[name] = unet.to(device).eval()
    return models, cfg


def sampling_setup(args, device):
    """The models, config and autoencoder for `sample`/`eval`: the short model for clips up to the training
    length, the prediction (and interpolation) model for longer ones. --ckpt names one of them, whose weights are
    that file's; the others, and the autoencoder, are the run's files beside it."""
    path = find_checkpoint(SCRIPT, args.run, args.ckpt, stage="short")
    run_dir = path.parent
    ckpt = load_checkpoint(path, SCRIPT, mmap=True, entries=())
    if ckpt.get("stage") not in STAGES[1:]:
        raise UserError(f"{path} is a {ckpt.get('stage')} checkpoint, not a diffusion one: pass short.pt, pred.pt "
                        f"or interp.pt")
    cfg = config_from_checkpoint(Config, ckpt, path)
    frames = args.frames or cfg.frames
    check_sample_memory(args.n or 1, frames, cfg.resolution, device)
    if not 0 <= args.cond_noise < cfg.cond_noise_max:
        raise UserError(f"--cond-noise must be below the s_max this run trained with ({cfg.cond_noise_max}), "
                        f"got {args.cond_noise}")
    need = ("short",) if frames <= cfg.frames else ("pred", "interp") if args.mode == "hierarchical" else ("pred",)
    if args.ckpt and ckpt["stage"] not in need:     # its weights would go unused: another model would sample
        how = f"{frames} frames" + (f" ({args.mode})" if frames > cfg.frames else "")
        raise UserError(f"{path} holds the {ckpt['stage']} model, but sampling {how} uses "
                        f"{' and '.join(n + '.pt' for n in need)}: pass {' or '.join(n + '.pt' for n in need)}, or "
                        f"other --frames/--mode")
    models, cfg = load_models(run_dir, device, need, {ckpt["stage"]: path} if args.ckpt else None)
    return run_dir, cfg, models, load_autoencoder(run_dir, cfg, device), frames


def generate(models, ae, sched, cfg, args, *, n, frames, seed, device, dtype, progress=False):
    common = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, seed=seed, device=device, dtype=dtype,
                  progress=progress)
    if frames <= cfg.frames:
        return generate_short(models["short"], ae, sched, cfg, n=n, frames=frames, **common)
    return generate_long(models, ae, sched, cfg, n=n, frames=frames, mode=args.mode, guidance=args.guidance,
                         cond_noise=args.cond_noise, **common)


def sample(args):
    device = pick_device(args.device)
    run_dir, cfg, models, ae, frames = sampling_setup(args, device)
    sched = Schedule.make(cfg.schedule, cfg.timesteps, beta_end=cfg.beta_end)
    check_steps(sched, ("--steps", args.steps))
    if args.label is not None:
        raise UserError("LVDM is unconditional on classes: --label does not apply")
    out = output_folder(args.out or run_dir / "samples" / ("sample" if frames <= cfg.frames else args.mode))
    videos = generate(models, ae, sched, cfg, args, n=args.n, frames=frames, seed=args.seed, device=device,
                      dtype=pick_precision(args.precision, device), progress=True)
    how = "short model" if frames <= cfg.frames else args.mode
    write_samples(out, videos)
    print(f"wrote {args.n} videos of {frames} frames ({how}) to {out}/ (grid.gif, samples.npz, video_*.mp4)")


# --- Evaluation ---

def evaluate(args):
    """FVD and KVD of samples against the training data, and PSNR, SSIM and R-FVD of the autoencoder. With --frames
    beyond the training clip, long videos are sampled (--mode) and the FVD of every training-length window is
    reported (the paper's Fig. 6/7 curves)."""
    device = pick_device(args.device)
    run_dir, cfg, models, ae, frames = sampling_setup(args, device)
    sched = Schedule.make(cfg.schedule, cfg.timesteps, beta_end=cfg.beta_end)
    check_steps(sched, ("--steps", args.steps))
    dtype = pick_precision(args.precision, device)

    def fake(n, frames, seed):
        return generate(models, ae, sched, cfg, args, n=n, frames=frames, seed=seed, device=device, dtype=dtype)

    sampler = {"sampler": args.sampler, "steps": args.steps, "eta": args.eta}
    if frames > cfg.frames:
        sampler.update(mode=args.mode, guidance=args.guidance, cond_noise=args.cond_noise)
    evaluate_run(SCRIPT, cfg, run_dir, fake, frames=frames, window=cfg.frames, device=device,
                 reconstruct=lambda x: ae.decode(ae.encode(x)[0]), sampler=sampler, **eval_settings(args, cfg))


# --- Command line ---

def cli(argv=None):
    parser, sub = build_parser(SCRIPT, __doc__, Config, PRESETS, stages=("all", *STAGES))
    for p in (sub["sample"], sub["eval"]):
        p.add_argument("--mode", default="hierarchical", choices=["hierarchical", "autoregressive"],
                       help="long videos (--frames beyond the training clip): keyframes then interpolation, or "
                            "prediction alone")
        p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (eta below) or DDPM")
        p.add_argument("--eta", type=number(float, 0, 1), default=1.0,
                       help="DDIM eta (1.0: the official long-video sampler)")
        p.add_argument("--cond-noise", type=number(int, lo=0), default=100,
                       help="s: the noise level given latents are perturbed to (§3.3; official 100)")
        p.set_defaults(steps=50, guidance=0.1)
    sub["eval"].add_argument("--guidance", type=number(float, 0, GUIDANCE_MAX), default=0.1,
                             help=f"unconditional guidance w (Eq. 9; 0 to {GUIDANCE_MAX})")
    sub["sample"].set_defaults(guidance=0.1)
    args = parser.parse_args(argv)
    run_command(args, train=train, sample=sample, eval=evaluate)


if __name__ == "__main__":
    main(cli)
