"""VDM: Video Diffusion Models, the pixel-space baseline every paper here measures itself against.
Ho, Salimans, Gritsenko, Chan, Norouzi, Fleet. arXiv 2204.03458 (2022).

The idea: run diffusion directly on the pixels of a clip with a 3D U-Net whose convolutions are space-only
(1x3x3) and whose attention is factorized: spatial attention over the H*W positions of each frame, then
temporal attention over the T frames at each position, with relative positions so that nothing ties a frame to
an absolute time. Higher resolutions come from a cascade: a second U-Net of the same kind denoises the 256^2
video while it sees the base model's 64^2 output upsampled (the cascade of CDM, Ho et al. 2022, with which LVDM
§4.2 builds its 256^2 VDM baseline, "397+48M").

Implemented here:
  the factorized space-time U-Net: ADM ResBlocks on 1x3x3 convolutions with the timestep in adaptive group norm,
       spatial self-attention at the levels in `spatial_ds`, temporal self-attention with Shaw et al.'s learned
       relative positions at the levels in `temporal_ds` (no causal mask: every frame sees every frame), both in
       the middle; the base presets put temporal attention at every level (ours, as lucidrains' layout); ADM's
       GN-SiLU-conv output head plus a norm-free linear read-out of the first conv (ours, see UNet3D.read_out)
  the denoising objective: eps-prediction with the plain L2 loss on the cosine schedule (v-prediction for the
       SR model, ours: see Config.sr_prediction), EMA weights
  the super-resolution stage as LVDM §4.2 builds its baseline, after Cascaded Diffusion Models (CDM, Ho et al.
       2022): the noisy high-resolution clip concatenated with the bilinearly upsampled low-resolution one (6 input
       channels), Gaussian conditioning augmentation of the low-resolution input with its level s embedded
  sampling: ancestral DDPM (Ho et al. §2; respaced below T steps) or DDIM per stage, x0_hat clipped to [-1, 1]
Not implemented, on purpose: joint image-video training (Ho et al. §3: extra independent frames with the
temporal attention masked) and reconstruction-guided sampling (§3.1), which is also how Ho et al. themselves
condition on a low-resolution video; the other papers' tables compare against fixed-length unconditional
generation, which is what this script gives. Simplified: Ho et al. train in continuous time, conditioned on the
log-SNR; here time is discrete (T = 1000) and the network sees the integer t. Widths and depths are ours: the
papers that measure against VDM do not publish theirs (see README, Efficiency).

    python vdm.py train                                     # tiny demo on synthetic videos, CPU, < 10 minutes
    python vdm.py sample                                    # 8 videos: base model, then super-resolution
    python vdm.py eval                                      # FVD/KVD against the training data
    python vdm.py train --data ucf101 --data-root DIR --preset ucf64     # the ~400M base model at 16x64^2
    python vdm.py train --data ucf101 --data-root DIR --preset ucf256    # the same, then SR 64^2 -> 256^2
"""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from common.checkpoint import config_from_checkpoint, find_checkpoint, load_checkpoint, load_state_checked
from common.cli import SEED_MAX, build_parser, check_steps, config_from_args, eval_settings, flag, main, number
from common.data import DATASETS, make_dataset
from common.diffusion import Schedule, ddim_sample, ddpm_sample
from common.errors import UserError
from common.evaluate import evaluate_run
from common.files import output_folder
from common.nn import norm, timestep_embedding, zero
from common.run import (autocast, check_memory, check_sample_memory, clip_floats, count_params, fmt_params,
                        pick_device, pick_precision)
from common.train import Run, run_command, train_stage
from common.video import make_grid, to_uint8, write_gif, write_samples

SCRIPT = "vdm"


# --- Configuration ---

@dataclass
class Config:
    # data and optimisation (shared flags of every script)
    data: str = flag("synthetic", "dataset", choices=list(DATASETS))
    data_root: Optional[str] = flag(None, "dataset folder (see README, Data)")
    steps: int = flag(800, "steps of the base model", lo=1)
    sr_steps: int = flag(400, "steps of the super-resolution model (with --sr-resolution)", lo=1)
    batch_size: int = flag(8, "clips per base step and process", lo=1)
    sr_batch_size: int = flag(4, "clips per super-resolution step and process", lo=1)
    lr: float = flag(1e-3, "learning rate of both models (AdamW, constant)", lo=0, lo_open=True)
    seed: int = flag(0, "random seed", lo=0, hi=SEED_MAX)
    sample_every: int = flag(0, "write a sample GIF every N base steps (0: never)", lo=0)
    save_every: int = flag(200, "checkpoint every N steps (0: only at the end)", lo=0)
    sample_steps: int = flag(50, "sampling steps per stage (ancestral DDPM) of the samples written during and after training", lo=1)
    # the method
    frames: int = flag(16, "frames per clip", lo=1)
    resolution: int = flag(16, "frame height and width of the base model", lo=1)
    sr_resolution: int = flag(32, "frame size of the super-resolution stage (0: no such stage)", lo=0)
    sr_aug_max: int = flag(250, "the SR model's low-resolution input is noised to a random level s < this in "
                           "training (CDM's conditioning augmentation)", lo=1)
    # architecture and fixed training settings (presets only)
    ch: int = 24
    mult: tuple = (1, 2)
    blocks: int = 1
    spatial_ds: tuple = (2,)        # downsampling factors with spatial attention (and the middle block)
    temporal_ds: tuple = (1, 2)     # downsampling factors with temporal attention (and the middle block)
    heads: int = 4
    max_dist: int = 16              # relative positions clip at +-this many frames: 16 tells all of T = 16 apart
    sr_ch: int = 12
    sr_mult: tuple = (1, 2)
    sr_blocks: int = 1
    sr_spatial_ds: tuple = ()
    sr_temporal_ds: tuple = (2,)
    sr_heads: int = 4
    # v-prediction for the SR model (ours; Salimans & Ho 2022, §4): with eps-prediction the tiny SR model learned
    # eps_hat = x_t at high noise, which the loss barely sees, and ignored its condition (DDIM from the true
    # low-resolution clip: mean error 0.69 against 0.17 with v after the same 400 steps)
    sr_prediction: str = "v"
    dropout: float = 0.0
    checkpointing: bool = False     # gradient checkpointing of the ResBlocks
    schedule: str = "cosine"        # Ho et al. use the cosine schedule of Nichol & Dhariwal
    timesteps: int = 1000
    ema_decay: float = 0.999
    grad_clip: float = 1.0


PRESETS = {
    "tiny": Config(),
    # the base model LVDM's Table 2 compares against: 16x64^2 pixels ("197k dims"), 399.0M parameters (its "397M");
    # 4 levels x 2 ResBlocks, spatial attention at 16^2 and 8^2, temporal attention everywhere (ours: the widths
    # of LVDM's and VQ-VDM's VDMs are not published). Step counts and batch sizes are ours.
    "ucf64": Config(data="ucf101", frames=16, resolution=64, sr_resolution=0, steps=400_000, batch_size=2,
                    lr=1e-4, sample_every=10_000, save_every=5_000, ch=150, mult=(1, 2, 4, 8), blocks=2,
                    spatial_ds=(4, 8), temporal_ds=(1, 2, 4, 8), heads=6, max_dist=16, dropout=0.1,
                    checkpointing=True, ema_decay=0.9999, grad_clip=1.0),
}
# the same base model, then the super-resolution stage 64^2 -> 256^2: 48.2M (LVDM's "397+48M" VDM), five levels
# from 32 channels at 256^2, so that its step costs about half the base's (1371 against 2309 GFLOP forward; LVDM's
# Table 2 times them 1.6 s and 3.3 s); spatial attention only at 16^2, temporal attention from 64^2 down (ours)
PRESETS["ucf256"] = dataclasses.replace(PRESETS["ucf64"], sr_resolution=256, sr_steps=200_000, sr_batch_size=1,
                                        sr_ch=32, sr_mult=(1, 2, 4, 8, 16), sr_blocks=1, sr_spatial_ds=(16,),
                                        sr_temporal_ds=(4, 8, 16))
PRESETS["sky256"] = dataclasses.replace(PRESETS["ucf256"], data="sky")

STAGES = ("base", "sr")   # `train` runs them in this order
BASE_ARCH = ("frames", "resolution", "ch", "mult", "blocks", "spatial_ds", "temporal_ds", "heads", "max_dist",
             "schedule", "timesteps")
# sr_aug_max too: sampling reads it (from base.pt's config) to pick and check the SR input's level
ARCH = BASE_ARCH + ("sr_resolution", "sr_ch", "sr_mult", "sr_blocks", "sr_spatial_ds", "sr_temporal_ds", "sr_heads",
                    "sr_aug_max", "sr_prediction")


# --- The factorized space-time U-Net (Ho et al. §3, Fig. 1) ---

def conv133(cin, cout, stride=1):
    """Space-only 1x3x3 conv: the U-Net mixes frames only in its temporal attention (Ho et al. §3; the same as
    lvdm.py's, whose U-Net follows this one)."""
    return nn.Conv3d(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1))


# Copied from lvdm.py::ResBlock
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


# Copied from lvdm.py::SpatialAttention
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


# (the "official code" in its docstring is LVDM's; here, as there, the formula of Shaw et al. is what runs)
# Copied from lvdm.py::relative_attention
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


# Copied from lvdm.py::TemporalAttention
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


class Factorized(nn.Module):
    """Spatial attention (where the level has it), then temporal attention: Ho et al.'s factorized space-time
    attention block."""

    def __init__(self, ch, heads, max_dist, spatial: bool, temporal: bool):
        super().__init__()
        self.spatial = SpatialAttention(ch, heads) if spatial else nn.Identity()
        self.temporal = TemporalAttention(ch, heads, max_dist) if temporal else nn.Identity()

    def forward(self, x, emb):
        return self.temporal(self.spatial(x))


# Copied from lvdm.py::Downsample
class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = conv133(ch, ch, stride=2)

    def forward(self, x, emb):
        return self.conv(x)


# Copied from lvdm.py::Upsample
class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = conv133(ch, ch)

    def forward(self, x, emb):
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))


# Copied from lvdm.py::Stage
class Stage(nn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


@dataclass
class UNetShape:
    """What tells one U-Net of this file from another: the base model and the SR model are two of these."""
    cin: int                        # 3 for the base model; 6 for SR (noisy clip + upsampled low-resolution clip)
    ch: int
    mult: tuple
    blocks: int
    spatial_ds: tuple
    temporal_ds: tuple
    heads: int
    max_dist: int
    dropout: float = 0.0
    checkpointing: bool = False
    aug_level: bool = False         # SR: embed the conditioning augmentation's noise level s


def base_shape(cfg: Config) -> UNetShape:
    return UNetShape(3, cfg.ch, cfg.mult, cfg.blocks, cfg.spatial_ds, cfg.temporal_ds, cfg.heads, cfg.max_dist,
                     cfg.dropout, cfg.checkpointing)


def sr_shape(cfg: Config) -> UNetShape:
    return UNetShape(6, cfg.sr_ch, cfg.sr_mult, cfg.sr_blocks, cfg.sr_spatial_ds, cfg.sr_temporal_ds, cfg.sr_heads,
                     cfg.max_dist, cfg.dropout, cfg.checkpointing, aug_level=True)


class UNet3D(nn.Module):
    """eps_theta(x_t, t) on pixels (B, 3, T, H, W); the SR model is eps_theta([x_t, up(y_s)], t, s) with y_s the
    low-resolution clip noised to level s (conditioning augmentation) and s embedded like t."""

    def __init__(self, shape: UNetShape):
        super().__init__()
        self.ch, emb = shape.ch, 4 * shape.ch
        self.time_mlp = nn.Sequential(nn.Linear(shape.ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        if shape.aug_level:
            self.aug_mlp = nn.Sequential(nn.Linear(shape.ch, emb), nn.SiLU(), nn.Linear(emb, emb))

        def block(cin, cout, ds):
            layers = [ResBlock(cin, cout, emb, shape.dropout, shape.checkpointing)]
            if ds in shape.spatial_ds or ds in shape.temporal_ds:
                layers.append(Factorized(cout, shape.heads, shape.max_dist, ds in shape.spatial_ds,
                                         ds in shape.temporal_ds))
            return Stage(layers)

        ch, mult = shape.ch, shape.mult
        self.inp = conv133(shape.cin, ch)
        self.down, skips, cur, ds = nn.ModuleList(), [ch], ch, 1
        for level, m in enumerate(mult):
            for _ in range(shape.blocks):
                self.down.append(block(cur, ch * m, ds))
                cur = ch * m
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(Stage([Downsample(cur)]))
                skips.append(cur)
                ds *= 2
        self.mid = Stage([ResBlock(cur, cur, emb, shape.dropout, shape.checkpointing),
                          Factorized(cur, shape.heads, shape.max_dist, True, True),
                          ResBlock(cur, cur, emb, shape.dropout, shape.checkpointing)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(shape.blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * m, ds))
                cur = ch * m
                if level > 0 and i == shape.blocks:
                    self.up[-1].append(Upsample(cur))
                    ds //= 2
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(conv133(cur, 3)))
        # A linear read-out of the first conv's features beside ADM's GN-SiLU-conv head (ours; lucidrains'
        # video_diffusion_pytorch.py reads its output through a residual block's norm-free identity path too).
        # Every GroupNorm here pools over T x H x W, so the video's mean colour of x_t reaches eps_hat only
        # weakly: trained without this path, d(mean eps_hat)/d(mean x_t) was 0.21 at t > 900 where it should be
        # ~1, and x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab) turns that error into a per-video tint.
        self.read_out = zero(nn.Conv3d(ch, 3, 1))

    def forward(self, x, t, s=None):
        """x (B, 3 or 6, T, H, W); t (B,); s (B,) the SR input's noise level -> eps (B, 3, T, H, W)."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        if s is not None:
            emb = emb + self.aug_mlp(timestep_embedding(s, self.ch))
        h = first = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h) + self.read_out(first)


# --- The objective: eps-prediction (Ho et al. §2, Eq. 4 of DDPM) and the SR stage's conditioning ---

def downsample(x, size: int):
    """(B, C, T, H, W) -> (B, C, T, size, size), antialiased per frame: how the SR stage's input is made."""
    B = x.shape[0]
    y = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    return rearrange(y, "(b t) c h w -> b c t h w", b=B)


def upsample(x, size: int):
    """(B, C, T, h, w) -> (B, C, T, size, size), bilinear per frame: the SR model's view of the base output."""
    B = x.shape[0]
    y = F.interpolate(rearrange(x, "b c t h w -> (b t) c h w"), size=(size, size), mode="bilinear",
                      align_corners=False)
    return rearrange(y, "(b t) c h w -> b c t h w", b=B)


def base_loss(net, sched: Schedule, x0):
    """||eps - eps_theta(x_t, t)||^2 with x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return F.mse_loss(net(sched.q_sample(x0, t, eps), t).float(), eps)


def sr_condition(sched: Schedule, low, size: int, s, noise):
    """The SR model's second input: the low-resolution clip (B, 3, T, h, w) noised to level s, s = 0 clean and
    s >= 1 the forward process's step s - 1 (CDM's Gaussian conditioning augmentation), then upsampled to
    `size`: s is a noise level of the low-resolution clip (the upsampling blurs its noise), in training and
    sampling alike."""
    noisy = sched.q_sample(low, (s - 1).clamp_min(0), noise)
    return upsample(torch.where((s > 0).view(-1, 1, 1, 1, 1), noisy, low), size)


def sr_loss(net, sched: Schedule, x0, resolution: int, aug_max: int, prediction: str = "v"):
    """The loss on the high-resolution clip x0, given its low-resolution version at a random level s; the target
    is eps, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, §4), which at high noise
    is about -x0 and so cannot be met without the condition."""
    B = x0.shape[0]
    s = torch.randint(0, aug_max, (B,), device=x0.device)
    low = downsample(x0, resolution)
    cond = sr_condition(sched, low, x0.shape[-1], s, torch.randn_like(low))
    t = torch.randint(0, sched.T, (B,), device=x0.device)
    eps = torch.randn_like(x0)
    target = eps if prediction == "eps" else sched.v_from_eps(x0, t, eps).float()
    return F.mse_loss(net(torch.cat([sched.q_sample(x0, t, eps), cond], dim=1), t, s).float(), target)


# --- Training ---

def check_config(cfg: Config, stage: str):
    """Mistakes the flags alone reveal, reported before any data is read."""
    for name, size, mult in (("resolution", cfg.resolution, cfg.mult), ("sr_resolution", cfg.sr_resolution,
                                                                        cfg.sr_mult)):
        halvings = 2 ** (len(mult) - 1)
        if size % halvings:
            raise UserError(f"--{name.replace('_', '-')} {size} must be divisible by {halvings} (the U-Net's "
                            f"{len(mult) - 1} halvings)")
    if cfg.sr_resolution and cfg.sr_resolution <= cfg.resolution:
        raise UserError(f"--sr-resolution {cfg.sr_resolution} must be above --resolution {cfg.resolution} (or 0: "
                        f"no super-resolution stage)")
    if cfg.sr_aug_max > cfg.timesteps:
        raise UserError(f"--sr-aug-max must be at most the schedule's {cfg.timesteps} steps, got {cfg.sr_aug_max}")
    if cfg.sample_steps > cfg.timesteps:
        raise UserError(f"--sample-steps must be at most the schedule's {cfg.timesteps} steps, got "
                        f"{cfg.sample_steps}")
    if stage == "sr" and not cfg.sr_resolution:
        raise UserError("--stage sr needs a super-resolution stage: pass --sr-resolution (e.g. "
                        f"{4 * cfg.resolution}) or use --preset ucf256")


def step_memory(cfg: Config) -> dict:
    """A floor of what one step of each stage holds (common/run.py): the clips and the U-Net's first
    activations at full size (the SR model's input holds the upsampled low-resolution clip as well)."""
    R, S = cfg.resolution, cfg.sr_resolution
    needs = {f"a base step on {cfg.batch_size} clips of {cfg.frames}x{R}x{R}":
             clip_floats(cfg.batch_size, cfg.frames, R, 3 + 2 * cfg.ch)}
    if S:
        needs[f"a super-resolution step on {cfg.sr_batch_size} clips of {cfg.frames}x{S}x{S}"] = \
            clip_floats(cfg.sr_batch_size, cfg.frames, S, 6 + 2 * cfg.sr_ch)
    return needs


def output_resolution(cfg: Config) -> int:
    return cfg.sr_resolution or cfg.resolution


def report_sizes(cfg: Config, base: UNet3D, sr: Optional[UNet3D], print_fn=print):
    cascade = (f", then SR U-Net {fmt_params(count_params(sr))} to {cfg.frames}x{cfg.sr_resolution}x"
               f"{cfg.sr_resolution}" if sr is not None else "")
    print_fn(f"vdm: base U-Net {fmt_params(count_params(base))} parameters on {cfg.frames}x{cfg.resolution}x"
             f"{cfg.resolution} pixels{cascade}")


def train(args):
    cfg = config_from_args(Config, PRESETS, args)
    check_config(cfg, args.stage)
    check_memory(step_memory(cfg), pick_device(args.device))
    stages = tuple(s for s in STAGES if s == "base" or cfg.sr_resolution) if args.stage == "all" else (args.stage,)
    data = {}
    if "base" in stages:
        data["base"] = make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution,
                                    seed=cfg.seed)
    if "sr" in stages:          # the same videos at the output size; the SR stage makes its own low resolution
        data["sr"] = make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.sr_resolution,
                                  seed=cfg.seed)
    match = {k: getattr(cfg, k) for k in ARCH}     # what the run's checkpoints must share with this config
    run = Run.start(SCRIPT, cfg, preset=args.preset, run_dir=args.run, device=args.device,
                    precision=args.precision, compile=args.compile, must_match=match)
    dev = run.device
    base = UNet3D(base_shape(cfg)).to(dev)
    sr = UNet3D(sr_shape(cfg)).to(dev) if cfg.sr_resolution else None
    report_sizes(cfg, base, sr, run.print)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    every_stage = dict(config=cfg, must_match=match, seed=cfg.seed, save_every=cfg.save_every,
                       grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay)

    def sample_gif(ema, step):
        videos = generate(ema, None, sched, cfg, n=8, steps=cfg.sample_steps, device=dev, dtype=run.dtype)
        write_gif(run.dir / "samples" / f"step_{step:07d}.gif", make_grid(videos))

    # stage 1: the base model at --resolution
    if "base" in stages:
        train_stage(run, "base", base, torch.optim.AdamW(base.parameters(), lr=cfg.lr),
                    lambda net, batch: base_loss(net, sched, batch["video"]), data["base"], steps=cfg.steps,
                    batch_size=cfg.batch_size, sample_fn=sample_gif, sample_every=cfg.sample_every, **every_stage)
    # stage 2: super-resolution to --sr-resolution, on its own clips (it never needs the base model to train)
    if "sr" in stages:
        train_stage(run, "sr", sr, torch.optim.AdamW(sr.parameters(), lr=cfg.lr),
                    lambda net, batch: sr_loss(net, sched, batch["video"], cfg.resolution, cfg.sr_aug_max,
                                               cfg.sr_prediction),
                    data["sr"], steps=cfg.sr_steps, batch_size=cfg.sr_batch_size, follows=("base",), **every_stage)
    if run.dist.is_main:
        if not all(run.has(s) for s in STAGES[:1 + bool(cfg.sr_resolution)]):
            run.print(f"no final samples: train every stage first (`python {SCRIPT}.py train --run {run.dir}`)")
            return
        cfg, base, sr, _ = load_models(run.dir, dev)
        videos = generate(base, sr, sched, cfg, n=8, steps=cfg.sample_steps, device=dev, dtype=run.dtype,
                          progress=True)
        out = write_samples(run.dir / "samples" / "final", videos)
        run.print(f"samples written to {out}/ (grid.gif, samples.npz, one mp4 per video)")


# --- Sampling: the base model, then the super-resolution model ---

def eps_function(net, sched: Schedule, *, cond=None, s=None, prediction="eps", dtype=None):
    """One stage's eps(x_t, t) for the samplers: the network under autocast, fed [x_t, cond] and s for SR, its
    output in float32, a v-predicting network's turned into eps."""
    def eps_fn(x, t):
        with autocast(x.device, dtype):
            inp = x if cond is None else torch.cat([x, cond], dim=1)
            out = net(inp, t, s).float()
        return out if prediction == "eps" else sched.eps_from_v(x, t, out).float()
    return eps_fn


@torch.no_grad()
def denoise(net: UNet3D, sched: Schedule, x_T, *, cond=None, s=None, prediction="eps", steps=50, sampler="ddpm",
            eta=0.0, noise_fn=torch.randn_like, dtype=None, progress=False):
    """One stage's reverse process from x_T; cond (the SR model's upsampled input) and s are held fixed."""
    eps_fn = eps_function(net, sched, cond=cond, s=s, prediction=prediction, dtype=dtype)

    # x0_hat clipped to [-1, 1], the pixel range, as DDPM does
    if sampler == "ddpm":
        return ddpm_sample(eps_fn, x_T, sched, steps, clip_x0=1.0, noise_fn=noise_fn, progress=progress)
    return ddim_sample(eps_fn, x_T, sched, steps, eta=eta, clip_x0=1.0, noise_fn=noise_fn, progress=progress)


@torch.no_grad()
def generate(base: UNet3D, sr: Optional[UNet3D], sched: Schedule, cfg: Config, *, n, frames=None, steps=50,
             sampler="ddpm", eta=0.0, sr_noise=None, seed=0, device="cpu", dtype=None, progress=False):
    """n videos, uint8 (n, T, H, W, 3): the base model's clip at --resolution, then, with an SR model, that clip
    noised to level sr_noise (default: a fifth of sr_aug_max, ours) and upsampled as the SR model's condition."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def noise(shape):
        return torch.randn(shape, generator=g, device=device)

    T = frames or cfg.frames
    x = denoise(base, sched, noise((n, 3, T, cfg.resolution, cfg.resolution)), steps=steps, sampler=sampler,
                eta=eta, noise_fn=lambda x: noise(x.shape), dtype=dtype, progress=progress)
    if sr is not None:
        s = torch.full((n,), sr_level(sr_noise, cfg), device=device, dtype=torch.long)
        cond = sr_condition(sched, x, cfg.sr_resolution, s, noise(x.shape))
        x = denoise(sr, sched, noise((n, 3, T, cfg.sr_resolution, cfg.sr_resolution)), cond=cond, s=s,
                    prediction=cfg.sr_prediction, steps=steps, sampler=sampler, eta=eta,
                    noise_fn=lambda x: noise(x.shape), dtype=dtype, progress=progress)
    return to_uint8(x.float())


def load_models(run_dir, device, ckpt=None):
    """The EMA base model and (in a cascade) the EMA SR model of a run, for sampling, and the base checkpoint's
    path (--ckpt names the base model's file; the SR model is the sr.pt beside it)."""
    path = find_checkpoint(SCRIPT, run_dir, ckpt, stage="base")
    ckpt = load_checkpoint(path, SCRIPT, mmap=True, entries=("ema",))
    if ckpt.get("stage") != "base":
        raise UserError(f"{path} is a {ckpt.get('stage')} checkpoint: pass the base model's, base.pt")
    cfg = config_from_checkpoint(Config, ckpt, path)
    base = load_state_checked(UNet3D(base_shape(cfg)), ckpt["ema"]["model"], path).to(device).eval()
    sr = None
    if cfg.sr_resolution:
        sr_path = path.parent / "sr.pt"
        if not sr_path.exists():
            raise UserError(f"{path.parent} has no super-resolution model (sr.pt): run `python {SCRIPT}.py train "
                            f"--run {path.parent} --stage sr` first")
        arch = {k: getattr(cfg, k) for k in ARCH}
        sr_state = load_checkpoint(sr_path, SCRIPT, arch, mmap=True, entries=("ema",))["ema"]["model"]
        sr = load_state_checked(UNet3D(sr_shape(cfg)), sr_state, sr_path).to(device).eval()
    return cfg, base, sr, path


def check_unconditional(args):
    if args.label is not None or args.guidance:
        raise UserError("vdm.py's models are unconditional: --label and --guidance do not apply")


def sr_level(sr_noise, cfg: Config) -> int:
    """The SR input's noise level at sampling time: --sr-noise, or a fifth of the training range (ours)."""
    return cfg.sr_aug_max // 5 if sr_noise is None else sr_noise


def check_sr_noise(sr_noise, cfg: Config):
    if sr_noise is not None and not cfg.sr_resolution:
        raise UserError("--sr-noise applies to a cascade: this run has no super-resolution stage")
    if sr_noise is not None and sr_noise >= cfg.sr_aug_max:
        raise UserError(f"--sr-noise must be below the run's --sr-aug-max {cfg.sr_aug_max}, the levels its SR model "
                        f"was trained on, got {sr_noise}")


def sample(args):
    device = pick_device(args.device)
    check_unconditional(args)
    cfg, base, sr, path = load_models(args.run, device, args.ckpt)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    check_steps(sched, ("--steps", args.steps))
    check_sr_noise(args.sr_noise, cfg)
    check_sample_memory(args.n, args.frames or cfg.frames, output_resolution(cfg), device)
    out = output_folder(args.out or path.parent / "samples" / "sample")
    videos = generate(base, sr, sched, cfg, n=args.n, frames=args.frames, steps=args.steps, sampler=args.sampler,
                      eta=args.eta, sr_noise=args.sr_noise, seed=args.seed, device=device,
                      dtype=pick_precision(args.precision, device), progress=True)
    write_samples(out, videos)
    print(f"wrote {args.n} videos ({videos.shape[1]}x{videos.shape[2]}x{videos.shape[3]}) to {out}/ (grid.gif, "
          f"samples.npz, video_*.mp4)")


# --- Evaluation ---

def evaluate(args):
    """FVD and KVD (IS with --c3d) of the cascade's videos against the training data at the output size."""
    device = pick_device(args.device)
    cfg, base, sr, path = load_models(args.run, device, args.ckpt)
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    steps = args.steps or 50
    check_steps(sched, ("--steps", steps))
    check_sr_noise(args.sr_noise, cfg)
    dtype = pick_precision(args.precision, device)

    def fake(n, frames, seed):
        return generate(base, sr, sched, cfg, n=n, frames=frames, steps=steps, sampler=args.sampler, eta=args.eta,
                        sr_noise=args.sr_noise, seed=seed, device=device, dtype=dtype)

    how = {"sampler": args.sampler, "steps": steps, "eta": args.eta,
           **({"sr_noise": sr_level(args.sr_noise, cfg)} if sr is not None else {})}
    evaluate_run(SCRIPT, dataclasses.replace(cfg, resolution=output_resolution(cfg)), path.parent, fake,
                 frames=args.frames or cfg.frames, device=device, sampler=how, **eval_settings(args, cfg))


# --- Command line ---

def cli(argv=None):
    parser, sub = build_parser(SCRIPT, __doc__, Config, PRESETS, stages=("all", *STAGES))
    for p in (sub["sample"], sub["eval"]):
        # Ho et al. §2 sample with the ancestral sampler. Measured on a folder of one-ball videos (800 base
        # steps, 50 sampling steps): the background was 55 grey levels off with DDPM against 87 with DDIM, whose
        # deterministic steps keep the tint x0_hat's first, worst estimates give each video
        p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"], help="ancestral DDPM, respaced when "
                       "--steps is below T (Ho et al. §2), or DDIM; for each stage")
        p.add_argument("--eta", type=number(float, 0, 1), default=0.0, help="DDIM stochasticity")
        p.add_argument("--sr-noise", type=number(int, lo=0), default=None,
                       help="noise level s of the SR model's low-resolution input, 0 = clean (default: the run's "
                            "sr_aug_max / 5, ours)")
    args = parser.parse_args(argv)
    run_command(args, train=train, sample=sample, eval=evaluate)


if __name__ == "__main__":
    main(cli)
