"""PVDM: Video Probabilistic Diffusion Models in Projected Latent Space.
Yu, Sohn, Kim, Shin. CVPR 2023, arXiv 2302.07685.

The idea: a video is a cube (T x H x W) with a lot of redundancy, so encode it as three 2D "image-like" latents
instead of one 3D latent. z_s (H' x W') carries the content shared over time; z_h (T x W') and z_w (T x H') carry
the motion. A 2D U-Net, shared over the three planes, then does the diffusion, so no 3D convolution is needed
anywhere. Long videos are generated clip by clip, each clip conditioned on the previous clip's latent.

Implemented here, all of it:
  §3.1 the projected autoencoder: a factorized space-time transformer encoder over patch tokens, three
       projections (small transformers that attend along the axis they remove), tanh-bounded latents; a decoder
       that broadcasts each plane back along its missing axis, sums them, and decodes with a transformer and a
       per-frame un-patching layer. Any T, H, W divisible by the patch size.
       Losses: L1 + LPIPS (when its weights are on disk; the tiny demo uses MSE, which skips a long plateau),
       then an optional adversarial stage with a 2D frame and a 3D clip discriminator, hinge loss and feature
       matching (`--gan-steps`).
  §3.2 the denoiser: a 2D U-Net shared by the planes, with attention over the tokens of all three planes after
       every block; the previous clip's latent enters by channel concatenation, zeros meaning unconditional.
  §3.3 joint training of unconditional and conditional generation with weight lam (Eq. (3)).
  Alg. 1 clip-autoregressive sampling with DDIM: `--steps` for the first clip, `--cond-steps` for the others
       ("100/20-s" is `--steps 100 --cond-steps 20`), `--eta`, `--frames 128` for long videos.
What differs from the official code (github.com/sihyun-yu/PVDM), each on purpose: no hard-coded 32/16 latent
sizes; the projections read their learnable token (the official code appends it and reads index 0); sinusoidal
instead of rotary/learned position codes, one per axis, so any size works; the 3D discriminator keeps the time axis
(kernel 3, stride 1), so short clips work; EMA updated every step instead of every 25; batch sizes are per process
(the official ones are global). The GAN stage matches the official trainer: 3 batches accumulated per optimizer
step, autoencoder and discriminator steps alternating 1:1, only the discriminators' gradients clipped.

    python pvdm.py train                                   # tiny demo on synthetic videos, CPU, < 10 minutes
    python pvdm.py sample --frames 64                      # 64 frames, clip by clip (Alg. 1)
    python pvdm.py eval --n 64                             # FVD/KVD, and PSNR/SSIM/R-FVD of the autoencoder
    python pvdm.py train --data ucf101 --data-root DIR --preset ucf256
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from common.checkpoint import config_from_checkpoint, find_checkpoint, load_checkpoint, load_state_checked
from common.cli import SEED_MAX, build_parser, check_steps, config_from_args, eval_settings, flag, main, number
from common.data import DATASETS, fixed_batch, make_dataset
from common.diffusion import Schedule, ddim_sample
from common.errors import UserError
from common.evaluate import evaluate_run
from common.files import output_folder
from common.gan import PatchGAN, feature_matching, frozen, generator_turn, hinge_d_loss, hinge_g_loss
from common.lpips import perceptual_loss_or_none
from common.metrics import psnr
from common.nn import norm, timestep_embedding, zero
from common.run import (autocast, check_memory, check_sample_memory, clip_floats, count_params, fmt_params,
                        pick_device, pick_precision)
from common.train import Run, continue_rng, run_command, train_stage
from common.video import make_grid, to_uint8, write_gif, write_samples

SCRIPT = "pvdm"


# --- Configuration ---

@dataclass
class Config:
    # data and optimisation (shared flags of every script)
    data: str = flag("synthetic", "dataset", choices=list(DATASETS))
    data_root: Optional[str] = flag(None, "dataset folder (see README, Data)")
    steps: int = flag(1000, "diffusion training steps", lo=1)
    ae_steps: int = flag(1600, "autoencoder steps (L1 or MSE, + LPIPS)", lo=1)
    gan_steps: int = flag(0, "adversarial autoencoder optimizer steps after --ae-steps (each accumulates 3 "
                              "batches; autoencoder and discriminator steps alternate), 0 to skip", lo=0)
    batch_size: int = flag(8, "clip pairs per diffusion step and process", lo=1)
    ae_batch_size: int = flag(8, "clips per autoencoder step and process", lo=1)
    lr: float = flag(1e-3, "diffusion learning rate (AdamW, constant)", lo=0, lo_open=True)
    ae_lr: float = flag(1e-3, "autoencoder and discriminator learning rate (AdamW, betas 0.5, 0.9)",
                        lo=0, lo_open=True)
    seed: int = flag(0, "random seed", lo=0, hi=SEED_MAX)
    sample_every: int = flag(500, "write a sample GIF every N diffusion steps (0: never)", lo=0)
    save_every: int = flag(500, "checkpoint every N steps (0: only at the end)", lo=0)
    # the paper's method
    frames: int = flag(8, "frames per clip", lo=1)
    resolution: int = flag(32, "frame height and width", lo=1)
    patch: int = flag(4, "patch size of the autoencoder's tokens", lo=1)
    lam: float = flag(0.3, "lam of Eq. (3): the share of conditional training examples (0.3 UCF, 0.2 Sky)",
                      lo=0, hi=1)
    # architecture (presets only)
    ae_dim: int = 64
    ae_depth: int = 2                # encoder and decoder layers each
    ae_heads: int = 4
    ae_dim_head: int = 16
    proj_depth: int = 1
    proj_heads: int = 4
    proj_dim_head: int = 16
    proj_mlp: int = 128
    z_channels: int = 8
    disc_ch: int = 32
    disc_layers: int = 2
    ch: int = 48
    mult: tuple = (1, 2)
    blocks: int = 1
    attn_ds: tuple = (2,)            # downsample rates with 2D attention inside each plane
    heads: int = 4
    schedule: str = "sqrt_linear"    # LDM's "linear": sqrt(beta) from sqrt(0.0015) to sqrt(0.0195)
    timesteps: int = 1000
    ema_decay: float = 0.999
    grad_clip: float = 1.0           # ours, for tiny's lr 1e-3: the official code clips no autoencoder/U-Net step
    disc_grad_clip: float = 1.0      # the discriminators' gradient-norm clip (official trainer)
    l1_weight: float = 4.0           # the official reconstruction loss: 4 L1 + 4 LPIPS
    l2_weight: float = 0.0           # an MSE term beside it (ours: tiny uses MSE alone, see PRESETS)
    lpips_weight: float = 4.0
    fm_weight: float = 4.0


PRESETS = {
    # tiny trains on MSE instead of L1. With L1 the broadcast-sum decoder sits for ~2000 steps on the "static"
    # solution (each pixel's mean over time, ~20.5 dB): an additive z_h or z_w correction paints a streak along a
    # whole row or column, which barely lowers L1 but lowers MSE at once (held-out PSNR after 1500 steps: 26.7 dB
    # with MSE, 20.6 with L1). ucf256 keeps the official L1.
    "tiny": Config(l1_weight=0.0, l2_weight=4.0),
    # the official UCF-101 configuration (official configs/ and README): 16 x 256^2, patch 8, C = 4, dim(z) = 8192.
    # The official batch sizes (48 diffusion, 8 autoencoder) are global, split over the GPUs; ours are per
    # process, so on N GPUs pass --batch-size 48/N --ae-batch-size 8/N. Its GAN stage stops after 8k-14k batches:
    # 14k batches are about 4.7k of our accumulated optimizer steps.
    "ucf256": Config(data="ucf101", frames=16, resolution=256, patch=8, z_channels=4, steps=850_000, ae_steps=250_000,
                     gan_steps=4_700, batch_size=48, ae_batch_size=8, lr=1e-4, ae_lr=1e-4, lam=0.3, grad_clip=0.0,
                     sample_every=10_000, save_every=10_000, ae_dim=384, ae_depth=8, ae_heads=8, ae_dim_head=64,
                     proj_depth=4, proj_heads=4, proj_dim_head=48, proj_mlp=512, disc_ch=64, disc_layers=3,
                     ch=256, mult=(1, 2, 4, 4), blocks=2, attn_ds=(1, 2, 4), heads=8, ema_decay=0.9999),
}
# SkyTimelapse: the same networks, conditional examples with probability 0.2 (official exps/diffusion.py)
PRESETS["sky256"] = dataclasses.replace(PRESETS["ucf256"], data="sky", lam=0.2)

STAGES = ("ae", "gan", "diffusion")   # `train` runs them in this order; gan only with --gan-steps > 0

AE_ARCH = ("frames", "resolution", "patch", "ae_dim", "ae_depth", "ae_heads", "ae_dim_head", "proj_depth",
           "proj_heads", "proj_dim_head", "proj_mlp", "z_channels")
ARCH = AE_ARCH + ("disc_ch", "disc_layers", "ch", "mult", "blocks", "attn_ds", "heads", "schedule", "timesteps")


# --- Transformer pieces ---

def sincos(n: int, dim: int, device) -> torch.Tensor:
    """Sinusoidal codes of positions 0..n-1, (n, dim): any length works, unlike a learned table."""
    return timestep_embedding(torch.arange(n, device=device), dim)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over the second axis of (N, L, D)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(self.norm(x)), "n l (three h d) -> three n h l d", three=3, h=self.heads)
        return self.out(rearrange(F.scaled_dot_product_attention(q, k, v), "n h l d -> n l (h d)"))


class GEGLU(nn.Module):
    """Pre-norm feed-forward with a gated GELU (Shazeer 2020), hidden width `hidden`."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm, self.proj, self.out = nn.LayerNorm(dim), nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, gate = self.proj(self.norm(x)).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class MLP(nn.Module):
    """Pre-norm feed-forward with a plain GELU, hidden width `hidden` (the official projections' FeedForward)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class DividedBlock(nn.Module):
    """TimeSformer's divided space-time attention (Bertasius et al. 2021): time, then space, then feed-forward."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.time, self.space = Attention(dim, heads, dim_head), Attention(dim, heads, dim_head)
        self.ff = GEGLU(dim, 4 * dim)

    def forward(self, x):                                         # x (B, T, h, w, D)
        B, T, h, w, D = x.shape
        x = x + rearrange(self.time(rearrange(x, "b t h w d -> (b h w) t d")), "(b h w) t d -> b t h w d", b=B, h=h)
        x = x + rearrange(self.space(rearrange(x, "b t h w d -> (b t) (h w) d")), "(b t) (h w) d -> b t h w d",
                          b=B, h=h)
        return x + self.ff(x)


def position_codes(T, h, w, dim, device):
    """(T, h, w, D): a sinusoidal code per axis in its own channels (t, then h, then w), so that a token and its
    transpose, or any permutation of (t, h, w), get different codes (a sum of one table per axis would not)."""
    d_space = dim // 3 // 2 * 2                                     # even widths; time takes the remainder
    t_code = sincos(T, dim - 2 * d_space, device)[:, None, None].expand(T, h, w, -1)
    h_code = sincos(h, d_space, device)[None, :, None].expand(T, h, w, -1)
    w_code = sincos(w, d_space, device)[None, None, :].expand(T, h, w, -1)
    return torch.cat([t_code, h_code, w_code], dim=-1)


# --- §3.1 The projected autoencoder ---

class Projection(nn.Module):
    """One of f_phi^s, f_phi^h, f_phi^w: a small transformer over the axis a plane removes, read at a learnable
    token, then a 1x1 map to C channels and tanh. (The official code appends the token but reads index 0; the
    maths pools with the token, so we prepend it and read it.)"""

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.ae_dim
        self.token = nn.Parameter(torch.randn(D) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleList([Attention(D, cfg.proj_heads, cfg.proj_dim_head),
                                                   MLP(D, cfg.proj_mlp)]) for _ in range(cfg.proj_depth))
        self.norm = nn.LayerNorm(D)
        self.to_z = nn.Linear(D, cfg.z_channels)

    def forward(self, seq):                                        # seq (N, L, D): L along the removed axis
        seq = seq + sincos(seq.shape[1], seq.shape[2], seq.device)
        x = torch.cat([self.token.expand(seq.shape[0], 1, -1), seq], dim=1)
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return torch.tanh(self.to_z(self.norm(x[:, 0])))          # (N, C) in (-1, 1)


class ProjectedAutoencoder(nn.Module):
    """x (B, 3, T, H, W) in [-1, 1] <-> z = (z_s (B, C, h, w), z_h (B, C, T, w), z_w (B, C, T, h)), h = H/p,
    w = W/p. For 16 x 256^2, p = 8, C = 4: dim(z) = 4 (32*32 + 16*32 + 16*32) = 8192 (Table 7)."""

    def __init__(self, cfg: Config):
        super().__init__()
        D, p = cfg.ae_dim, cfg.patch
        self.patch = p
        self.embed = nn.Conv2d(3, D, p, stride=p)                                    # per-frame patches
        self.encoder = nn.ModuleList(DividedBlock(D, cfg.ae_heads, cfg.ae_dim_head) for _ in range(cfg.ae_depth))
        self.enc_norm = nn.LayerNorm(D)
        self.proj_s, self.proj_h, self.proj_w = Projection(cfg), Projection(cfg), Projection(cfg)
        self.from_s, self.from_h, self.from_w = (nn.Linear(cfg.z_channels, D) for _ in range(3))
        self.decoder = nn.ModuleList(DividedBlock(D, cfg.ae_heads, cfg.ae_dim_head) for _ in range(cfg.ae_depth))
        self.dec_norm = nn.LayerNorm(D)
        self.unpatch = nn.ConvTranspose2d(D, 3, p, stride=p)                          # per-frame pixels

    def check(self, x):
        T, H, W = x.shape[2:]
        if H % self.patch or W % self.patch:
            raise UserError(f"frames of {H}x{W} are not divisible by the patch size {self.patch}: "
                            f"pass a --resolution that is a multiple of --patch")

    def encode(self, x):
        self.check(x)
        B, _, T, H, W = x.shape
        tokens = self.embed(rearrange(x, "b c t h w -> (b t) c h w"))                 # (B*T, D, h, w)
        u = rearrange(tokens, "(b t) d h w -> b t h w d", b=B)
        u = u + position_codes(*u.shape[1:4], u.shape[-1], x.device)
        for block in self.encoder:
            u = block(u)
        u = self.enc_norm(u)                                                            # (B, T, h, w, D)
        h, w = u.shape[2:4]
        # z_s = f_s(u): attend over time at each (h, w);  z_h: over height at each (t, w);  z_w: over width
        z_s = rearrange(self.proj_s(rearrange(u, "b t h w d -> (b h w) t d")), "(b h w) c -> b c h w", b=B, h=h)
        z_h = rearrange(self.proj_h(rearrange(u, "b t h w d -> (b t w) h d")), "(b t w) c -> b c t w", b=B, t=T)
        z_w = rearrange(self.proj_w(rearrange(u, "b t h w d -> (b t h) w d")), "(b t h) c -> b c t h", b=B, t=T)
        return z_s, z_h, z_w

    def decode(self, z):
        z_s, z_h, z_w = z
        B, _, h, w = z_s.shape
        T = z_h.shape[2]
        # broadcast each plane along the axis it lacks and sum (= concatenation followed by a linear map)
        e = (repeat(self.from_s(rearrange(z_s, "b c h w -> b h w c")), "b h w d -> b t h w d", t=T)
             + repeat(self.from_h(rearrange(z_h, "b c t w -> b t w c")), "b t w d -> b t h w d", h=h)
             + repeat(self.from_w(rearrange(z_w, "b c t h -> b t h c")), "b t h d -> b t h w d", w=w))
        e = e + position_codes(T, h, w, e.shape[-1], e.device)
        for block in self.decoder:
            e = block(e)
        e = self.dec_norm(e)
        x = self.unpatch(rearrange(e, "b t h w d -> (b t) d h w"))                     # (B*T, 3, H, W)
        return 2 * torch.sigmoid(rearrange(x, "(b t) c h w -> b c t h w", b=B)) - 1

    def forward(self, x):
        return self.decode(self.encode(x))


def latent_size(z) -> int:
    """dim(z): the number of latent values per clip."""
    return sum(p[0].numel() for p in z)


# --- Autoencoder losses: L1 + LPIPS, then hinge GAN with a 2D and a 3D PatchGAN (common/gan.py) ---

class AdversarialAE(nn.Module):
    """The autoencoder with its two discriminators: one module, so one checkpoint holds the whole GAN stage, and
    its forward is one step's loss, so under DDP every step goes through the wrapper and is synchronised."""

    def __init__(self, ae: ProjectedAutoencoder, cfg: Config):
        super().__init__()
        self.ae = ae
        # the official discriminators: kernel 4, padding 2; the 3D one keeps the time axis (kernel 3, stride 1:
        # the official one strides time too, which needs 16+ frames)
        self.d2 = PatchGAN(2, cfg.disc_ch, cfg.disc_layers, kernel=4, stride=2, padding=2)
        self.d3 = PatchGAN(3, cfg.disc_ch, cfg.disc_layers, kernel=(3, 4, 4), stride=(1, 2, 2), padding=(1, 2, 2))
        # batches seen, in the checkpoint so that a resumed run keeps its phase (see gan_loss)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x, cfg: Config, lpips=None):
        return gan_loss(self, x, cfg, lpips)


def random_frame(x, index):
    """(B, C, T, H, W) -> (B, C, H, W), frame index[b] of clip b."""
    return x[torch.arange(x.shape[0]), :, index]


def ae_loss(ae, x, cfg: Config, lpips=None):
    """4 L1(x, x_hat) on the clip + 4 LPIPS on one random frame per clip (official losses/perceptual.py), plus
    l2_weight MSE (tiny). Returns the losses and x_hat (which the GAN stage reuses)."""
    x_hat = ae(x)
    l1, l2 = (x_hat - x).abs().mean(), (x_hat - x).pow(2).mean()
    out = {"loss": cfg.l1_weight * l1 + cfg.l2_weight * l2, "l1": l1, "l2": l2}
    if lpips is not None:
        frame = torch.randint(0, x.shape[2], (x.shape[0],), device=x.device)
        p = lpips(random_frame(x_hat, frame).float(), random_frame(x, frame).float()).mean()
        out["loss"], out["lpips"] = out["loss"] + cfg.lpips_weight * p, p
    return out, x_hat


GAN_ACCUMULATE = 3   # batches per optimizer step in the GAN stage (the official trainer's accum_iter)


def gan_loss(model: AdversarialAE, x, cfg: Config, lpips=None):
    """One batch of the GAN stage (official losses/perceptual.py). Each optimizer step accumulates
    GAN_ACCUMULATE batches and the steps alternate 1:1 between the autoencoder and the discriminators:
    autoencoder:    reconstruction - mean D2(frame) - mean D3(clip) + 4 sum_layers L1(D_l(x_hat), D_l(x)),
                    feature matching over every intermediate layer of both discriminators;
    discriminators: hinge, 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), for D2 plus D3.
    Each step leaves the other side's parameters without a gradient, so the optimizer does not move them."""
    train_ae = generator_turn(int(model.calls), GAN_ACCUMULATE)
    model.calls += 1
    frame = torch.randint(0, x.shape[2], (x.shape[0],), device=x.device)
    if train_ae:
        out, x_hat = ae_loss(model.ae, x, cfg, lpips)
        fake2, f2 = frozen(model.d2, random_frame(x_hat, frame))
        fake3, f3 = frozen(model.d3, x_hat)
        with torch.no_grad():
            _, r2 = model.d2(random_frame(x, frame))
            _, r3 = model.d3(x)
        fm = feature_matching(f2 + f3, r2 + r3, "l1")
        g = hinge_g_loss(fake2) + hinge_g_loss(fake3)
        out["loss"] = out["loss"] + g + cfg.fm_weight * fm
        return {**out, "g": g, "fm": fm}
    with torch.no_grad():
        x_hat = model.ae(x)
    d = (hinge_d_loss(model.d2(random_frame(x, frame))[0], model.d2(random_frame(x_hat, frame))[0])
         + hinge_d_loss(model.d3(x)[0], model.d3(x_hat)[0]))
    return {"loss": d, "d": d}


def discriminator_params(model: AdversarialAE):
    """What the GAN stage clips: the official trainer clips the discriminators' gradients only."""
    return [*model.d2.parameters(), *model.d3.parameters()]


# --- §3.2 The denoiser: a 2D U-Net shared by the three planes, with cross-plane attention ---

class ResBlock(nn.Module):
    """ADM's residual block with scale-shift norm, h = GN(h) * (1 + scale(t)) + shift(t); with resample
    "down" or "up" it also halves or doubles the plane (ADM's resblock_updown, as the official config)."""

    def __init__(self, cin, cout, emb_dim, resample=None):
        super().__init__()
        self.resample = resample
        self.in_act = nn.Sequential(norm(cin), nn.SiLU())
        self.in_conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = norm(cout)
        self.out = nn.Sequential(nn.SiLU(), zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def scale(self, x):
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.resample == "up" else x

    def forward(self, x, emb):                                    # x (N, C, h, w), emb (N, E)
        h = self.in_conv(self.scale(self.in_act(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        return self.skip(self.scale(x)) + self.out(self.out_norm(h) * (1 + scale) + shift)


class Attention2D(nn.Module):
    """Self-attention over the h*w positions of one plane."""

    def __init__(self, ch, heads):
        super().__init__()
        self.norm, self.heads = norm(ch), heads
        self.qkv, self.out = nn.Conv1d(ch, 3 * ch, 1), zero(nn.Conv1d(ch, ch, 1))

    def attend(self, x):                                          # x (N, C, L)
        q, k, v = rearrange(self.qkv(self.norm(x)), "n (three h d) l -> three n h l d", three=3, h=self.heads)
        return x + self.out(rearrange(F.scaled_dot_product_attention(q, k, v), "n h l d -> n (h d) l"))

    def forward(self, x, emb):
        return self.attend(x.flatten(2)).view_as(x)


class CrossPlaneAttention(Attention2D):
    """The planes talk: the tokens of z_s, z_h and z_w are concatenated into one sequence for a 1D
    self-attention, then split back (the official AttentionBlock1D after every U-Net block)."""

    def forward(self, planes):                                    # [(B, C, h_i, w_i)] * 3
        sizes = [p.shape[2] * p.shape[3] for p in planes]
        joint = self.attend(torch.cat([p.flatten(2) for p in planes], dim=2))      # (B, C, sum h_i w_i)
        return [part.view_as(p) for part, p in zip(joint.split(sizes, dim=2), planes)]


class Block(nn.Module):
    """Layers applied to each plane with shared weights, then one cross-plane attention over the three planes
    together. (The layers sit in their own list: iterating a list that also held `cross` ran it on each plane.)"""

    def __init__(self, layers, ch, heads):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.cross = CrossPlaneAttention(ch, heads)

    def forward(self, planes, emb):
        out = []
        for x in planes:
            for layer in self.layers:
                x = layer(x, emb)
            out.append(x)
        return self.cross(out)


class PlaneUNet(nn.Module):
    """eps_theta(z_t, c, t): planes of 2C channels (noisy latent ++ condition) -> planes of C channels."""

    def __init__(self, cfg: Config):
        super().__init__()
        C, ch, E = cfg.z_channels, cfg.ch, 4 * cfg.ch
        self.ch = ch
        self.levels = len(cfg.mult)
        self.time = nn.Sequential(nn.Linear(ch, E), nn.SiLU(), nn.Linear(E, E))
        self.inp = nn.Conv2d(2 * C, ch, 3, padding=1)
        self.down, chans, c, ds = nn.ModuleList(), [ch], ch, 1
        for level, m in enumerate(cfg.mult):
            for _ in range(cfg.blocks):
                layers = [ResBlock(c, ch * m, E)] + ([Attention2D(ch * m, cfg.heads)] if ds in cfg.attn_ds else [])
                c = ch * m
                self.down.append(Block(layers, c, cfg.heads))
                chans.append(c)
            if level < self.levels - 1:
                self.down.append(Block([ResBlock(c, c, E, resample="down")], c, cfg.heads))
                chans.append(c)
                ds *= 2
        self.mid = Block([ResBlock(c, c, E), Attention2D(c, cfg.heads), ResBlock(c, c, E)], c, cfg.heads)
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(cfg.mult))):
            for i in range(cfg.blocks + 1):
                layers = [ResBlock(c + chans.pop(), ch * m, E)]
                c = ch * m
                if ds in cfg.attn_ds:
                    layers.append(Attention2D(c, cfg.heads))
                if level and i == cfg.blocks:
                    layers.append(ResBlock(c, c, E, resample="up"))
                    ds //= 2
                self.up.append(Block(layers, c, cfg.heads))
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, C, 3, padding=1)))

    def forward(self, z_t, cond, t):
        """z_t, cond: triples of planes (B, C, ., .); t (B,). Returns the predicted noise as a triple."""
        k = 2 ** (self.levels - 1)
        if any(s % k for p in z_t for s in p.shape[2:]):
            raise UserError(f"latent planes {[tuple(p.shape[2:]) for p in z_t]} must be divisible by {k} for "
                            f"this U-Net's {self.levels} levels: use more frames or a larger resolution")
        emb = self.time(timestep_embedding(t, self.ch))
        hs = [[self.inp(torch.cat([z, c], dim=1)) for z, c in zip(z_t, cond)]]
        for block in self.down:
            hs.append(block(hs[-1], emb))
        h = self.mid(hs[-1], emb)
        for block in self.up:
            h = block([torch.cat([a, b], dim=1) for a, b in zip(h, hs.pop())], emb)
        return tuple(self.out(x) for x in h)


# --- §3.3 Joint unconditional / conditional training, Eq. (3) ---

def flat(z):
    """Triple of planes -> (B, C, h*w + T*w + T*h), the packed latent the samplers treat as one tensor."""
    return torch.cat([p.flatten(2) for p in z], dim=2)


def unflat(x, like_shapes):
    """Inverse of flat, given the three plane shapes (C, ., .)."""
    sizes = [s[1] * s[2] for s in like_shapes]
    return tuple(p.reshape(x.shape[0], *s) for p, s in zip(x.split(sizes, dim=2), like_shapes))


def diffusion_loss(net, sched: Schedule, ae: ProjectedAutoencoder, pair, lam: float):
    """Eq. (3): lam ||eps - eps_theta(z_t^2, z_0^1, t)||^2 + (1 - lam) ||eps - eps_theta(z_t^2, 0, t)||^2,
    as the official code does it: each pair of clips is a conditional example with probability lam, else an
    unconditional example on a random window of the pair (so every frame position is a first clip too)."""
    B, _, T2, H, W = pair.shape
    T = T2 // 2
    conditional = torch.rand(B, device=pair.device) < lam
    start = torch.randint(0, T + 1, (B,), device=pair.device)
    start = torch.where(conditional, torch.full_like(start, T), start)                # clip 2 when conditional
    idx = start[:, None] + torch.arange(T, device=pair.device)[None]                  # (B, T)
    target = torch.gather(pair, 2, idx[:, None, :, None, None].expand(B, 3, T, H, W))
    with torch.no_grad():
        z0 = ae.encode(target)
        c = tuple(torch.zeros_like(p) for p in z0)                                      # zeros: unconditional
        if conditional.any():                           # encode only the first clips that condition something
            for p, q in zip(c, ae.encode(pair[conditional, :, :T])):
                p[conditional] = q
    shapes = [p.shape[1:] for p in z0]
    x0 = flat(z0).float()                            # the schedule's maths in float32 (bf16 under autocast)
    t = torch.randint(0, sched.T, (B,), device=pair.device)
    eps = torch.randn_like(x0)
    z_t = unflat(sched.q_sample(x0, t, eps), shapes)
    eps_hat = flat(net(z_t, c, t))
    return {"loss": F.mse_loss(eps_hat.float(), eps), "cond_share": conditional.float().mean()}


# --- Training ---

def report_sizes(cfg, ae, unet, print_fn=print):
    shapes = (f"z_s {cfg.resolution // cfg.patch}x{cfg.resolution // cfg.patch}, z_h {cfg.frames}x"
              f"{cfg.resolution // cfg.patch}, z_w {cfg.frames}x{cfg.resolution // cfg.patch}")
    h = cfg.resolution // cfg.patch
    dim_z = cfg.z_channels * (h * h + 2 * cfg.frames * h)
    print_fn(f"pvdm: autoencoder {fmt_params(count_params(ae))}, denoiser {fmt_params(count_params(unet))} "
             f"parameters; clips {cfg.frames}x{cfg.resolution}x{cfg.resolution}, latent {shapes} x "
             f"{cfg.z_channels} channels, dim(z) = {dim_z}")


def load_ae(run_dir, cfg, device):
    """The autoencoder of a run: from gan.pt when the adversarial stage ran, else ae.pt."""
    ae = ProjectedAutoencoder(cfg).to(device)
    match = {k: getattr(cfg, k) for k in AE_ARCH}
    if (run_dir / "gan.pt").exists():
        state = load_checkpoint(run_dir / "gan.pt", SCRIPT, match, device)["model"]
        load_state_checked(ae, {k[3:]: v for k, v in state.items() if k.startswith("ae.")}, run_dir / "gan.pt")
    elif (run_dir / "ae.pt").exists():
        load_state_checked(ae, load_checkpoint(run_dir / "ae.pt", SCRIPT, match, device)["model"], run_dir / "ae.pt")
    else:
        raise UserError(f"no autoencoder in {run_dir}: run `python {SCRIPT}.py train --stage ae` first")
    return ae.eval().requires_grad_(False)


def check_config(cfg: Config):
    """Mistakes the flags alone reveal, reported before any data is read."""
    if cfg.resolution % cfg.patch:
        raise UserError(f"--resolution {cfg.resolution} is not divisible by --patch {cfg.patch}")
    h, k = cfg.resolution // cfg.patch, 2 ** (len(cfg.mult) - 1)    # planes h x h, T x h, T x h; U-Net halves k
    if h % k or cfg.frames % k:
        raise UserError(f"latent planes {h}x{h} and {cfg.frames}x{h} (--resolution / --patch, --frames) must be "
                        f"divisible by {k} for this U-Net's {len(cfg.mult)} levels: use more frames or a larger "
                        f"resolution")


def step_memory(cfg: Config) -> dict:
    """A floor of what one step of each stage holds (common/run.py): the clips, the reconstruction and the
    autoencoder's tokens (ae_dim numbers per patch of patch x patch pixels)."""
    R, per_pixel = cfg.resolution, cfg.ae_dim / cfg.patch ** 2
    return {f"an autoencoder step on {cfg.ae_batch_size} clips of {cfg.frames}x{R}x{R}":
            clip_floats(cfg.ae_batch_size, cfg.frames, R, 6 + 2 * per_pixel),
            f"a diffusion step on {cfg.batch_size} pairs of clips of {cfg.frames}x{R}x{R}":
            clip_floats(cfg.batch_size, 2 * cfg.frames, R, 3 + 2 * per_pixel)}


def report_reconstruction(run: Run, cfg: Config):
    """The held-out PSNR of the autoencoder that the diffusion stage will use: a quick check before it starts."""
    held_out = fixed_batch(make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution,
                                        split="test", seed=cfg.seed), 16)["video"].to(run.device)
    with torch.no_grad():
        rec = load_ae(run.dir, cfg, run.device)(held_out)
    run.print(f"autoencoder: reconstruction PSNR {psnr(rec, held_out).mean().item():.2f} dB on 16 held-out clips")


def train(args):
    cfg = config_from_args(Config, PRESETS, args)
    check_config(cfg)
    check_memory(step_memory(cfg), pick_device(args.device))
    data = make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution, seed=cfg.seed)
    match = {k: getattr(cfg, k) for k in ARCH}   # what the run's checkpoints must share with this config
    run = Run.start(SCRIPT, cfg, preset=args.preset, run_dir=args.run, device=args.device,
                    precision=args.precision, compile=args.compile, must_match=match)
    ae, unet = ProjectedAutoencoder(cfg).to(run.device), PlaneUNet(cfg).to(run.device)
    report_sizes(cfg, ae, unet, run.print)
    every_stage = dict(config=cfg, must_match=match, seed=cfg.seed,
                       grad_clip=cfg.grad_clip, save_every=cfg.save_every)
    stages = STAGES if args.stage == "all" else (args.stage,)
    adam = dict(lr=cfg.ae_lr, betas=(0.5, 0.9))
    lpips = perceptual_loss_or_none(run.device) if "ae" in stages or "gan" in stages else None

    # stage 1: the projected autoencoder, 4 L1 + 4 LPIPS (official configs/autoencoder/base.yaml)
    if "ae" in stages:
        train_stage(run, "ae", ae, torch.optim.AdamW(ae.parameters(), **adam),
                    lambda net, batch: ae_loss(net, batch["video"], cfg, lpips)[0],
                    data, steps=cfg.ae_steps, batch_size=cfg.ae_batch_size, **every_stage)

    # stage 1b (--gan-steps): adversarial fine-tuning from the stage-1 weights (official base_gan.yaml)
    if "gan" in stages and cfg.gan_steps > 0:
        continue_rng(run, ("ae",), cfg.seed)    # the discriminators start as in one `train`, whoever ran the ae stage
        model = AdversarialAE(load_ae(run.dir, cfg, run.device).train().requires_grad_(True), cfg).to(run.device)
        train_stage(run, "gan", model, torch.optim.AdamW(model.parameters(), **adam),
                    lambda net, batch: net(batch["video"], cfg, lpips),
                    data, steps=cfg.gan_steps, batch_size=cfg.ae_batch_size, find_unused_parameters=True,
                    accumulate=GAN_ACCUMULATE, clip_params=discriminator_params, follows=("ae",),
                    **{**every_stage, "grad_clip": cfg.disc_grad_clip})

    if "ae" in stages or "gan" in stages:
        report_reconstruction(run, cfg)

    # stage 2: the diffusion model on pairs of consecutive clips
    if "diffusion" in stages:
        ae = load_ae(run.dir, cfg, run.device)          # frozen: gan.pt when the adversarial stage ran, else ae.pt
        pairs = make_dataset(cfg.data, cfg.data_root, frames=2 * cfg.frames, resolution=cfg.resolution,
                             seed=cfg.seed)
        sched = Schedule.make(cfg.schedule, cfg.timesteps)

        def sample_gif(ema_unet, step):
            videos, _ = generate(ema_unet, ae, sched, cfg, n=4, frames=2 * cfg.frames, steps=50, cond_steps=20,
                                 device=run.device, dtype=run.dtype)
            write_gif(run.dir / "samples" / f"step_{step:07d}.gif", make_grid(to_uint8(videos)))

        ema = train_stage(run, "diffusion", unet, torch.optim.AdamW(unet.parameters(), lr=cfg.lr),
                          lambda net, batch: diffusion_loss(net, sched, ae, batch["video"], cfg.lam),
                          pairs, steps=cfg.steps, batch_size=cfg.batch_size, ema_decay=cfg.ema_decay,
                          sample_fn=sample_gif, sample_every=cfg.sample_every, follows=("ae", "gan"),
                          **every_stage)
        if run.dist.is_main:
            videos, _ = generate(ema, ae, sched, cfg, n=8, frames=2 * cfg.frames, steps=100, cond_steps=20,
                                 device=run.device, dtype=run.dtype, progress=True)
            out = write_samples(run.dir / "samples" / "final", to_uint8(videos))
            run.print(f"samples written to {out}/ (grid.gif, samples.npz, one mp4 per video); "
                      f"each video is 2 clips, the second conditioned on the first")


# --- Alg. 1: clip-autoregressive sampling ---

@torch.no_grad()
def generate(unet: PlaneUNet, ae: ProjectedAutoencoder, sched: Schedule, cfg: Config, *, n, frames, steps=100,
             cond_steps=20, eta=1.0, seed=0, device="cpu", dtype=None, progress=False):
    """Alg. 1: clip 1 from noise with the zero condition (`steps` DDIM steps); clip l > 1 conditioned on clip
    l-1's sampled latent z_0^{l-1} (`cond_steps`), no decode / re-encode in between; each clip decoded on its
    own. Returns videos (n, 3, frames, H, W) in [-1, 1] and the list of clip latents (flat)."""
    T, h = cfg.frames, cfg.resolution // cfg.patch
    shapes = [(cfg.z_channels, h, h), (cfg.z_channels, T, h), (cfg.z_channels, T, h)]
    g = torch.Generator(device=device).manual_seed(seed)

    def noise(x):
        return torch.randn(x.shape, generator=g, device=device)

    cond = torch.zeros(n, cfg.z_channels, sum(a * b for _, a, b in shapes), device=device)
    clips, latents = [], []
    for clip in range(math.ceil(frames / T)):
        c = unflat(cond, shapes)

        def eps_fn(z, t):
            with autocast(torch.device(device), dtype):
                return flat(unet(unflat(z, shapes), c, t)).float()

        z0 = ddim_sample(eps_fn, noise(cond), sched, steps if clip == 0 else cond_steps, eta=eta, clip_x0=1.0,
                         noise_fn=noise, progress=progress)        # latents live in (-1, 1) (tanh)
        latents.append(z0)
        clips.append(ae.decode(unflat(z0, shapes)).float())
        cond = z0
    return torch.cat(clips, dim=2)[:, :, :frames].clamp(-1, 1), latents


def load_for_sampling(args, device):
    path = find_checkpoint(SCRIPT, args.run, args.ckpt)
    ckpt = load_checkpoint(path, SCRIPT, map_location=device)
    if "ema" not in ckpt:
        raise UserError(f"{path} is a {ckpt.get('stage')} checkpoint, not a diffusion one: pass diffusion.pt")
    cfg = config_from_checkpoint(Config, ckpt, path)
    unet = load_state_checked(PlaneUNet(cfg).to(device), ckpt["ema"]["model"], path)
    return cfg, Schedule.make(cfg.schedule, cfg.timesteps), unet.eval(), load_ae(path.parent, cfg, device), path


def sample(args):
    device = pick_device(args.device)
    cfg, sched, unet, ae, path = load_for_sampling(args, device)
    frames = args.frames or 2 * cfg.frames
    check_steps(sched, ("--steps", args.steps), ("--cond-steps", args.cond_steps))
    check_sample_memory(args.n, frames, cfg.resolution, device)
    if args.label is not None or args.guidance:
        raise UserError("PVDM is unconditional on classes: --label and --guidance do not apply")
    out = output_folder(args.out or path.parent / "samples" / "sample")
    videos, _ = generate(unet, ae, sched, cfg, n=args.n, frames=frames, steps=args.steps,
                         cond_steps=args.cond_steps, eta=args.eta, seed=args.seed, device=device,
                         dtype=pick_precision(args.precision, device), progress=True)
    write_samples(out, to_uint8(videos))
    print(f"wrote {args.n} videos of {frames} frames ({math.ceil(frames / cfg.frames)} clips of {cfg.frames}) "
          f"to {out}/ (grid.gif, samples.npz, video_*.mp4)")


def evaluate(args):
    """FVD and KVD of sampled videos against the training data, and PSNR, SSIM and R-FVD of the autoencoder. The
    sampler flags are those of `sample` (Table 5's N/M-s is --steps N --cond-steps M) and go into eval.json."""
    device = pick_device(args.device)
    cfg, sched, unet, ae, path = load_for_sampling(args, device)
    steps, frames = args.steps or 100, args.frames or 16
    check_steps(sched, ("--steps", steps), ("--cond-steps", args.cond_steps))
    dtype = pick_precision(args.precision, device)

    def fake(n, frames, seed):
        return to_uint8(generate(unet, ae, sched, cfg, n=n, frames=frames, steps=steps, cond_steps=args.cond_steps,
                                 eta=args.eta, seed=seed, device=device, dtype=dtype)[0])

    sampler = {"steps": steps, "cond_steps": args.cond_steps, "eta": args.eta}
    evaluate_run(SCRIPT, cfg, path.parent, fake, frames=frames, device=device, reconstruct=ae, sampler=sampler,
                 **eval_settings(args, cfg))


# --- Command line ---

def cli(argv=None):
    parser, sub = build_parser(SCRIPT, __doc__, Config, PRESETS, stages=("all", *STAGES))
    sub["sample"].set_defaults(steps=100)
    for p in (sub["sample"], sub["eval"]):
        p.add_argument("--cond-steps", type=number(int, lo=1), default=20,
                       help="DDIM steps for every clip after the first (Table 5's 100/20-s is --steps 100 "
                            "--cond-steps 20)")
        p.add_argument("--eta", type=number(float, 0, 1), default=1.0, help="DDIM eta (1.0 as the official sampler)")
    args = parser.parse_args(argv)
    run_command(args, train=train, sample=sample, eval=evaluate)


if __name__ == "__main__":
    main(cli)
