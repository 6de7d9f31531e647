"""VideoFusion: Decomposed Diffusion Models for High-Quality Video Generation.
Luo, Chen, Zhang, Huang, Wang, Shen, Zhao, Zhou, Tan. CVPR 2023, arXiv 2303.08320.

The idea: the frames of a video share most of their content, so their diffusion noise should too. Each frame's
noise is split into a base noise b, shared by every frame, and a residual noise r^i of its own:

    eps^i = sqrt(lam) b + sqrt(1 - lam) r^i     (i != k),     eps^k = b     for the key frame k

Two networks undo the two parts. The base generator, an image U-Net, predicts b from the key frame alone (the
key frame is an ordinary image-diffusion sample, so a pretrained image model fits). The residual generator, a
lighter U-Net with temporal attention, sees all frames with the estimated base part removed and predicts each r^i.

Implemented here, all of it:
  §3.1 decomposed forward process, lam as a flag (Table 5: 0.5 is the paper's setting)
  §3.2 base generator z_phi^b(z_t^k, t) and residual generator z_psi^r(z'_t, t, i) (ADM-style U-Nets with a
       norm-free linear read-out beside the output head, ours: see UNet.read_out)
  §3.3 the training loss with stop-gradient on the base prediction (Table 7), and `--joint full|fixed` for the
       two ablations; optional base pretraining on single frames (Table 6, `--stage base-pretrain`)
  Alg. 1 DDPM and Alg. 2 DDIM sampling (`sample --sampler ddpm|ddim`) with decomposed noise at every step
  class-conditional generation with classifier-free guidance (Table 1, class-conditioned rows)
  Figure 1 as a command: `sample --share base|residual`
  `--space latent`: the same decomposition on the latents of a small per-frame 2D autoencoder
What is simplified: the paper builds its base generator on DALL-E 2's decoder and publishes no architecture;
ours are ADM-style U-Nets whose sizes are set by the presets. The autoencoder trains on L1 + KL only (no
perceptual or adversarial loss).

    python videofusion.py train                                   # tiny demo on synthetic videos, CPU
    python videofusion.py sample                                  # 8 videos from that run, Alg. 1, 100 steps
    python videofusion.py sample --share base --n 16              # Figure 1: rows share their base noise
    python videofusion.py eval --n 64                             # FVD/KVD of that run against its data
    python videofusion.py train --data ucf101 --data-root DIR --preset ucf64
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from common.checkpoint import config_from_checkpoint, find_checkpoint, load_checkpoint, load_state_checked
from common.cli import SEED_MAX, build_parser, check_steps, config_from_args, eval_settings, flag, main, number
from common.data import DATASETS, LABELLED, fixed_batch, make_dataset
from common.diffusion import Schedule, ddim_sample, ddpm_sample, guided
from common.errors import UserError
from common.evaluate import evaluate_run
from common.files import output_folder
from common.metrics import psnr
from common.nn import norm, timestep_embedding, zero
from common.run import (autocast, check_memory, check_sample_memory, clip_floats, count_params, fmt_params,
                        pick_device, pick_precision)
from common.train import Run, run_command, train_stage
from common.video import grid_columns, make_grid, to_uint8, write_gif, write_samples

SCRIPT = "videofusion"


# --- Configuration ---

@dataclass
class Config:
    # data and optimisation (shared flags of every script)
    data: str = flag("synthetic", "dataset", choices=list(DATASETS))
    data_root: Optional[str] = flag(None, "dataset folder (see README, Data)")
    steps: int = flag(1000, "joint base + residual training steps", lo=1)
    ae_steps: int = flag(1000, "autoencoder steps (with --space latent)", lo=1)
    base_steps: int = flag(300, "base generator pretraining steps on single frames, 0 to skip (Table 6)", lo=0)
    batch_size: int = flag(8, "clips per step and process", lo=1)
    lr: float = flag(1e-3, "learning rate (AdamW)", lo=0, lo_open=True)
    seed: int = flag(0, "random seed", lo=0, hi=SEED_MAX)
    sample_every: int = flag(500, "write a sample GIF every N steps (0: never)", lo=0)
    save_every: int = flag(500, "checkpoint every N steps (0: only at the end)", lo=0)
    # the paper's method
    frames: int = flag(8, "frames per clip (N): a key frame and at least one residual frame", lo=2)
    resolution: int = flag(32, "frame height and width", lo=1)
    lam: float = flag(0.5, "lam, the share of the base noise in each frame's noise (Table 5)", lo=0, hi=1,
                      lo_open=True, hi_open=True)
    joint: str = flag("stop-grad", "how the base prediction enters the residual loss (Table 7)",
                      choices=["stop-grad", "full", "fixed"])
    space: str = flag("pixel", "diffuse pixels, or latents of a per-frame 2D autoencoder",
                      choices=["pixel", "latent"])
    class_cond: bool = flag(True, "condition on the class label, with classifier-free guidance")
    p_uncond: float = flag(0.1, "probability of dropping the label in training (joint cond./uncond.)", lo=0,
                           hi=1)
    schedule: str = flag("linear", "beta schedule", choices=["linear", "sqrt_linear", "cosine"])
    # architecture (presets only)
    base_ch: int = 32
    base_mult: tuple = (1, 2, 2)
    base_blocks: int = 1
    res_ch: int = 16
    res_mult: tuple = (1, 2, 2)
    res_blocks: int = 1
    attn_res: tuple = (8,)          # feature-map sizes with spatial attention
    temporal_res: tuple = (16, 8)   # feature-map sizes with temporal attention (residual generator)
    heads: int = 4
    dropout: float = 0.0
    ae_ch: int = 32
    ae_factor: int = 4              # spatial downsampling of the latent autoencoder
    z_channels: int = 4
    timesteps: int = 1000
    num_classes: int = 0            # set from the data by `train` (0 when unconditional): rebuilding the model needs it
    ema_decay: float = 0.999
    grad_clip: float = 1.0


PRESETS = {
    "tiny": Config(),
    # 16 x 64 x 64, the paper's unconditional UCF-101 setting (Table 1); sizes are ours (the paper gives none)
    "ucf64": Config(data="ucf101", frames=16, resolution=64, steps=400_000, base_steps=100_000, ae_steps=0,
                    batch_size=32, lr=1e-4, sample_every=5000, save_every=5000, class_cond=False,
                    base_ch=128, base_mult=(1, 2, 3, 4), base_blocks=2, res_ch=64, res_mult=(1, 2, 3, 4),
                    res_blocks=2, attn_res=(16, 8), heads=4, dropout=0.1, ema_decay=0.9999),
    # 16 x 128 x 128, the class-conditioned UCF-101 setting (Table 1)
    "ucf128": Config(data="ucf101", frames=16, resolution=128, steps=400_000, base_steps=100_000,
                     ae_steps=100_000, batch_size=16, lr=1e-4, sample_every=5000, save_every=5000,
                     class_cond=True, base_ch=128, base_mult=(1, 1, 2, 3, 4), base_blocks=2, res_ch=64,
                     res_mult=(1, 1, 2, 3, 4), res_blocks=2, attn_res=(16, 8), heads=4, dropout=0.1,
                     ema_decay=0.9999, ae_ch=64),
}

STAGES = ("ae", "base-pretrain", "diffusion")   # `train` runs them in this order; ae only with --space latent

# what a checkpoint's config must share with the current one to be loadable
ARCH = ("frames", "resolution", "space", "lam", "schedule", "timesteps", "class_cond", "num_classes", "base_ch",
        "base_mult", "base_blocks", "res_ch", "res_mult", "res_blocks", "attn_res", "temporal_res", "heads", "ae_ch",
        "ae_factor", "z_channels")


# --- §3.1 Decomposed noise ---

def key_frame(n_frames: int) -> int:
    """k = floor(N/2). The paper counts frames from 1; we count from 0, so k is the frame just after the middle
    for even N. Any fixed frame works as long as training and sampling agree."""
    return n_frames // 2


def frame_lams(n_frames: int, lam: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """lam^i per frame, shaped (1, 1, N, 1, 1): lam for every frame but the key frame, whose lam^k = 1."""
    lams = torch.full((n_frames,), lam, device=device, dtype=dtype)
    lams[key_frame(n_frames)] = 1.0
    return lams.reshape(1, 1, n_frames, 1, 1)


def decomposed_noise(shape, lam: float, generator=None, device=None, share: Optional[str] = None,
                     group: int = 1):
    """eps^i = sqrt(lam^i) b + sqrt(1 - lam^i) r^i, one b per video (§3.1). Returns (eps, b, r).

    shape is (B, C, N, H, W); b is (B, C, 1, H, W), r is (B, C, N, H, W). share="base" makes consecutive groups
    of `group` videos share b (Figure 1, top rows); share="residual" makes them share r (bottom rows).
    """
    B, C, N, H, W = shape
    b = torch.randn((B, C, 1, H, W), generator=generator, device=device)
    r = torch.randn((B, C, N, H, W), generator=generator, device=device)
    if share == "base":
        b = b[torch.arange(B, device=b.device) // group * group]
    elif share == "residual":
        r = r[torch.arange(B, device=r.device) // group * group]
    lams = frame_lams(N, lam, device)
    return lams.sqrt() * b + (1 - lams).sqrt() * r, b, r


# --- §3.2 Networks: ADM-style U-Nets, the residual one with temporal attention ---

class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as a scale and shift of the second norm (ADM)."""

    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, frames):          # x (N, C, H, W), emb (N, E)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[..., None, None].chunk(2, dim=1)
        h = self.conv2(self.drop(F.silu(self.norm2(h) * (1 + scale) + shift)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Self-attention over the H*W positions of each frame."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv, self.out = nn.Conv2d(ch, 3 * ch, 1), zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x, emb, frames):          # x (N, C, H, W)
        H, W = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "n (three h d) y x -> three n h (y x) d",
                            three=3, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(o, "n h (y x) d -> n (h d) y x", y=H, x=W))


class TemporalAttention(nn.Module):
    """Self-attention over the N frames at each pixel: what keeps the residuals of a video coherent (§3.2)."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv, self.out = nn.Linear(ch, 3 * ch), zero(nn.Linear(ch, ch))

    def forward(self, x, emb, frames):          # x (B*N, C, H, W)
        H, W = x.shape[-2:]
        h = rearrange(self.norm(x), "(b n) c y x -> (b y x) n c", n=frames)
        q, k, v = rearrange(self.qkv(h), "m n (three h d) -> three m h n d", three=3, h=self.heads)
        o = rearrange(F.scaled_dot_product_attention(q, k, v), "m h n d -> m n (h d)")
        return x + rearrange(self.out(o), "(b y x) n c -> (b n) c y x", y=H, x=W)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb, frames):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb, frames):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of layers that all take (x, emb, frames)."""

    def forward(self, x, emb, frames):
        for layer in self:
            x = layer(x, emb, frames)
        return x


class UNet(nn.Module):
    """2D U-Net on frames. temporal=False: an image model on (B, C, H, W), the base generator z_phi^b(z^k, t).
    temporal_res given: a video model on (B, C, N, H, W) run as B*N frames, with temporal attention after the
    blocks at those feature-map sizes and in the middle, and the frame index i added to the embedding: the
    residual generator z_psi^r(z', t, i)."""

    def __init__(self, in_ch, ch, mult, blocks, attn_res, resolution, heads, dropout, num_classes,
                 temporal_res=None):
        super().__init__()
        self.ch, self.temporal = ch, temporal_res is not None
        temporal = self.temporal
        emb = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.frame_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb)) if temporal else None
        # one embedding per class plus a last "no label" entry for the unconditional case (classifier-free)
        self.label_emb = nn.Embedding(num_classes + 1, emb) if num_classes else None
        self.num_classes = num_classes

        def block(cin, cout, res):
            layers = [ResBlock(cin, cout, emb, dropout)]
            if res in attn_res:
                layers.append(SpatialAttention(cout, heads))
            if temporal and res in temporal_res:
                layers.append(TemporalAttention(cout, heads))
            return Stage(layers)

        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, resolution
        for level, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(block(cur, ch * m, res))
                cur = ch * m
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(Stage([Downsample(cur)]))
                skips.append(cur)
                res //= 2
        self.mid = Stage([ResBlock(cur, cur, emb, dropout), SpatialAttention(cur, heads),
                          *([TemporalAttention(cur, heads)] if temporal else []), ResBlock(cur, cur, emb, dropout)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * m, res))
                cur = ch * m
                if level > 0 and i == blocks:
                    self.up[-1].append(Upsample(cur))
                    res *= 2
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(nn.Conv2d(cur, in_ch, 3, padding=1)))
        # A linear read-out of the first conv's features beside ADM's GN-SiLU-conv head (ours, as in vdm.py):
        # every GroupNorm takes the per-frame mean away, so the mean colour of z_t reached the prediction with a
        # gain of 0.36 (whole video) and 0.28 (one frame) at t > 900 where it should be ~1, which the sampler
        # turned into a tint per video and per frame. With it: background error 88.7 -> 55.3 grey levels (64
        # samples, defaults, a folder of one-ball videos).
        self.read_out = zero(nn.Conv2d(ch, in_ch, 1))

    def forward(self, x, t, label=None):
        """x (B, C, H, W) or (B, C, N, H, W); t (B,); label (B,) with num_classes meaning "no label"."""
        frames = x.shape[2] if self.temporal else 1
        emb = self.time_mlp(timestep_embedding(t, self.ch))                         # (B, E)
        if self.label_emb is not None:
            if label is None:
                label = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(label)
        if self.temporal:
            x = rearrange(x, "b c n h w -> (b n) c h w")
            emb = emb.repeat_interleave(frames, dim=0)                              # (B, E) -> (B*N, E)
            i = torch.arange(frames, device=x.device).repeat(x.shape[0] // frames)
            emb = emb + self.frame_mlp(timestep_embedding(i, self.ch))              # the frame index i
        h = first = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, frames)
            hs.append(h)
        h = self.mid(h, emb, frames)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, frames)
        h = self.out(h) + self.read_out(first)
        return rearrange(h, "(b n) c h w -> b c n h w", n=frames) if self.temporal else h


class VideoFusion(nn.Module):
    """The two generators and the latent scale, as one module so that DDP, EMA and checkpoints see one model."""

    def __init__(self, cfg: Config, sched: Schedule):
        super().__init__()
        ch_in = cfg.z_channels if cfg.space == "latent" else 3
        size = cfg.resolution // cfg.ae_factor if cfg.space == "latent" else cfg.resolution
        nc = cfg.num_classes if cfg.class_cond else 0
        self.base = UNet(ch_in, cfg.base_ch, cfg.base_mult, cfg.base_blocks, cfg.attn_res, size, cfg.heads,
                         cfg.dropout, nc)
        self.residual = UNet(ch_in, cfg.res_ch, cfg.res_mult, cfg.res_blocks, cfg.attn_res, size, cfg.heads,
                             cfg.dropout, nc, cfg.temporal_res)
        self.lam, self.joint, self.num_classes, self.sched = cfg.lam, cfg.joint, nc, sched
        self.register_buffer("latent_scale", torch.tensor(1.0))   # 1 / std of the latents (latent space only)

    def forward(self, z_t, t, label=None):
        """(b_hat, r_hat) for noisy frames z_t (B, C, N, H, W) at steps t (B,).  §3.2:

        b_hat = z_phi^b(z_t^k, t)
        z'^i  = z_t^i - sqrt(lam^i) sqrt(1 - alpha_bar_t) b_hat        (Alg. 1-2; the slides drop the b_hat)
        r_hat = z_psi^r(z', t, i)
        """
        N = z_t.shape[2]
        b_hat = self.base(z_t[:, :, key_frame(N)], t, label)[:, :, None]           # (B, C, 1, H, W)
        s = self.sched.noise_std(t, z_t)                                          # (B, 1, 1, 1, 1), float32+
        z_prime = z_t - frame_lams(N, self.lam, z_t.device, s.dtype).sqrt() * s * self.sg(b_hat)
        return b_hat, self.residual(z_prime, t, label)

    def train(self, mode: bool = True):
        """Table 7 "Fixed": the frozen, pretrained base generator always runs as at inference (no dropout)."""
        super().train(mode)
        if self.joint == "fixed":
            self.base.eval()
        return self

    def sg(self, b_hat):
        """The base prediction as the residual branch sees it: sg[b_hat] (Table 7's best), or b_hat itself with
        --joint full ('w/o stop gradient')."""
        return b_hat if self.joint == "full" else b_hat.detach()

    def compose(self, b_hat, r_hat):
        """eps_hat^i = sqrt(lam^i) b_hat + sqrt(1 - lam^i) r_hat^i, so eps_hat^k = b_hat.  §3.1 applied to the
        predictions."""
        lams = frame_lams(r_hat.shape[2], self.lam, r_hat.device, r_hat.dtype)
        return lams.sqrt() * b_hat + (1 - lams).sqrt() * r_hat

    def eps(self, z_t, t, label=None):
        b_hat, r_hat = self(z_t, t, label)
        return self.compose(b_hat, r_hat)


# --- Latent space: a small per-frame 2D autoencoder (--space latent) ---

class FrameAutoencoder(nn.Module):
    """Conv encoder/decoder with a diagonal-Gaussian latent (LDM's KL autoencoder, small), applied frame by frame:
    (B, 3, N, H, W) <-> (B, z, N, H/f, W/f)."""

    def __init__(self, ch, factor, z_channels):
        super().__init__()
        levels = int(math.log2(factor))
        enc, dec, c = [nn.Conv2d(3, ch, 3, padding=1)], [], ch
        for i in range(levels):
            enc += [ResBlock2(c, ch * 2 ** (i + 1)), nn.Conv2d(ch * 2 ** (i + 1), ch * 2 ** (i + 1), 3, 2, 1)]
            c = ch * 2 ** (i + 1)
        enc += [ResBlock2(c, c), norm(c), nn.SiLU(), nn.Conv2d(c, 2 * z_channels, 3, padding=1)]
        dec += [nn.Conv2d(z_channels, c, 3, padding=1), ResBlock2(c, c)]
        for i in reversed(range(levels)):
            dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1),
                    ResBlock2(c, ch * 2 ** i)]
            c = ch * 2 ** i
        dec += [norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def encode(self, x):
        """(B, 3, N, H, W) -> posterior mean and log-variance, each (B, z, N, h, w)."""
        n = x.shape[2]
        mean, logvar = self.encoder(rearrange(x, "b c n h w -> (b n) c h w")).chunk(2, dim=1)
        mean, logvar = (rearrange(y, "(b n) c h w -> b c n h w", n=n) for y in (mean, logvar))
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        n = z.shape[2]
        x = self.decoder(rearrange(z, "b c n h w -> (b n) c h w"))
        return rearrange(x, "(b n) c h w -> b c n h w", n=n)


class ResBlock2(nn.Module):
    """ResBlock without an embedding, for the autoencoder."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


def ae_loss(ae, batch, kl_weight=1e-6):
    """L1 reconstruction + a small KL to N(0, I) (LDM's KL-f autoencoder; the weight keeps latents near-free)."""
    x = batch["video"]
    mean, logvar = ae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
    rec = (ae.decode(z) - x).abs().mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return {"loss": rec + kl_weight * kl, "l1": rec, "kl": kl}


# --- §3.3 Losses ---

def drop_labels(label, num_classes, p_uncond):
    """Replace each label by the "no label" index with probability p_uncond (classifier-free joint training)."""
    if not num_classes:
        return None
    drop = torch.rand(label.shape, device=label.device) < p_uncond
    return torch.where(drop, torch.full_like(label, num_classes), label)


def diffusion_loss(net, model: VideoFusion, sched: Schedule, z0, label, p_uncond):
    """The §3.3 objective, L_t per frame:
        i = k:  ||b - z_phi^b(z_t^k, t)||^2
        i != k: ||eps^i - sqrt(lam) [z_phi^b(z_t^k, t)]_sg - sqrt(1 - lam) z_psi^r(z'^i, t, i)||^2
    `net` is the model as wrapped for training (DDP/compile); `model` the plain module, for its settings."""
    B, C, N, H, W = z0.shape
    t = torch.randint(0, sched.T, (B,), device=z0.device)
    eps, b, _ = decomposed_noise(z0.shape, model.lam, device=z0.device)
    z_t = sched.q_sample(z0, t, eps)                                     # §3.1, decomposed forward process
    b_hat, r_hat = net(z_t, t, drop_labels(label, model.num_classes, p_uncond))
    base = F.mse_loss(b_hat[:, :, 0].float(), b[:, :, 0])
    eps_hat = model.compose(model.sg(b_hat), r_hat)
    others = [i for i in range(N) if i != key_frame(N)]
    residual = F.mse_loss(eps_hat[:, :, others].float(), eps[:, :, others])
    if model.joint == "fixed":          # Table 7 "Fixed": the (pretrained) base generator is not trained
        return {"loss": residual, "base": base.detach(), "residual": residual}
    return {"loss": (base + (N - 1) * residual) / N, "base": base, "residual": residual}


def image_loss(net, sched: Schedule, x0, label):
    """Plain image diffusion on single frames, ||eps - z_phi^b(x_t, t)||^2, to pretrain the base generator
    (Table 6, 'w/ pretrain'). The key frame is exactly such an image sample, lam^k = 1."""
    t = torch.randint(0, sched.T, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return F.mse_loss(net(sched.q_sample(x0, t, eps), t, label).float(), eps)


# --- Training ---

def build(cfg: Config, device):
    sched = Schedule.make(cfg.schedule, cfg.timesteps)
    model = VideoFusion(cfg, sched).to(device)
    ae = FrameAutoencoder(cfg.ae_ch, cfg.ae_factor, cfg.z_channels).to(device) if cfg.space == "latent" else None
    return sched, model, ae


def load_frame_autoencoder(ae: "FrameAutoencoder", run_dir, cfg: Config) -> "FrameAutoencoder":
    """`ae` (as build() made it) with the run's trained weights (--space latent), frozen."""
    if not (run_dir / "ae.pt").exists():
        raise UserError(f"--space latent needs the autoencoder first: run `python {SCRIPT}.py train --stage ae`")
    device = next(ae.parameters()).device
    ckpt = load_checkpoint(run_dir / "ae.pt", SCRIPT, {k: getattr(cfg, k) for k in ARCH}, device)
    load_state_checked(ae, ckpt["model"], run_dir / "ae.pt")
    return ae.eval().requires_grad_(False)


def report_sizes(cfg, model, ae, print_fn=print):
    base, res = count_params(model.base), count_params(model.residual)
    msg = f"videofusion: base generator {fmt_params(base)}, residual generator {fmt_params(res)}"
    if ae is not None:
        msg += f", autoencoder {fmt_params(count_params(ae))}"
    print_fn(msg + f" parameters; clips {cfg.frames}x{cfg.resolution}x{cfg.resolution}, {cfg.space} space")


def check_config(cfg: Config, stage: str):
    """Mistakes the flags alone reveal, reported before any data is read."""
    if cfg.space == "latent" and cfg.resolution % cfg.ae_factor:
        raise UserError(f"--resolution {cfg.resolution} is not divisible by the autoencoder factor {cfg.ae_factor}")
    size = cfg.resolution // cfg.ae_factor if cfg.space == "latent" else cfg.resolution
    halvings = max(len(cfg.base_mult), len(cfg.res_mult)) - 1      # each U-Net level but the last halves H and W
    if size % 2 ** halvings:
        raise UserError(f"--resolution {cfg.resolution} gives {size}x{size} {cfg.space} frames, which the U-Nets halve "
                        f"{halvings} times: use a multiple of {cfg.resolution // size * 2 ** halvings}")
    if stage == "ae" and cfg.space != "latent":
        raise UserError("--stage ae trains the autoencoder of --space latent; pixel space has none")


def step_memory(cfg: Config) -> dict:
    """A floor of what one training step holds (common/run.py): the clips and the first layers' activations at
    full size (the U-Nets' in pixel space, the autoencoder's in latent space)."""
    width = cfg.ae_ch if cfg.space == "latent" else max(cfg.base_ch, cfg.res_ch)
    R = cfg.resolution
    return {f"a step on {cfg.batch_size} clips of {cfg.frames}x{R}x{R}":
            clip_floats(cfg.batch_size, cfg.frames, R, 3 + 2 * width)}


def frozen_autoencoder(run: Run, cfg: Config, model: "VideoFusion", ae: "FrameAutoencoder") -> "FrameAutoencoder":
    """The run's trained autoencoder for the diffusion stages, and the latent scale they use: 1 / std of held-out
    latents (LDM's scale_by_std), so that the diffused latents have unit variance. A resumed diffusion stage
    restores its own scale from its checkpoint."""
    ae = load_frame_autoencoder(ae, run.dir, cfg)
    held_out = fixed_batch(make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution,
                                        split="test", seed=cfg.seed), 8)["video"].to(run.device)
    with torch.no_grad():
        latents = ae.encode(held_out)[0]
        rec = ae.decode(latents)
    model.latent_scale.fill_(1.0 / latents.std().item())
    run.print(f"autoencoder: reconstruction PSNR {psnr(rec, held_out).mean().item():.2f} dB on 8 held-out clips; "
              f"latent scale {model.latent_scale.item():.4f}")
    return ae


def train(args):
    cfg = config_from_args(Config, PRESETS, args)
    check_config(cfg, args.stage)
    check_memory(step_memory(cfg), pick_device(args.device))
    # a class-conditional preset on unlabelled data trains unconditionally (known from the name, before any probe)
    unlabelled = cfg.class_cond and cfg.data not in LABELLED
    if unlabelled:
        cfg = replace(cfg, class_cond=False)
    data = make_dataset(cfg.data, cfg.data_root, frames=cfg.frames, resolution=cfg.resolution, seed=cfg.seed)
    cfg = replace(cfg, num_classes=getattr(data, "num_classes", 0) if cfg.class_cond else 0)
    match = {k: getattr(cfg, k) for k in ARCH}   # what the run's checkpoints must share with this config
    run = Run.start(SCRIPT, cfg, preset=args.preset, run_dir=args.run, device=args.device,
                    precision=args.precision, compile=args.compile, must_match=match)
    if unlabelled:
        run.print(f"--data {cfg.data} has no class labels: training without class conditioning (--no-class-cond)")
    sched, model, ae = build(cfg, run.device)
    report_sizes(cfg, model, ae, run.print)
    every_stage = dict(config=cfg, must_match=match, seed=cfg.seed, grad_clip=cfg.grad_clip,
                       save_every=cfg.save_every, batch_size=cfg.batch_size)
    stages = STAGES if args.stage == "all" else (args.stage,)
    pretraining = "base-pretrain" in stages and cfg.base_steps > 0
    if cfg.joint == "fixed" and "diffusion" in stages and not (pretraining or run.has("base-pretrain")):
        raise UserError("--joint fixed keeps the base generator frozen, so it needs --base-steps > 0")

    # stage 1 (--space latent only): the per-frame autoencoder, frozen for the stages after it
    if ae is not None:
        if "ae" in stages:
            train_stage(run, "ae", ae, torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.5, 0.9)), ae_loss,
                        data, steps=cfg.ae_steps, **every_stage)
        if stages == ("ae",):
            return
        ae = frozen_autoencoder(run, cfg, model, ae)

    def to_z0(batch):
        x = batch["video"]
        if ae is None:
            return x
        with torch.no_grad():
            return (ae.encode(x)[0] * model.latent_scale).float()   # posterior mean, unit variance, float32

    def label_of(batch):
        return batch["label"] if model.num_classes else None

    # stage 2 (optional): pretrain the base generator as an image model on single frames (Table 6)
    if pretraining:
        def base_loss(net, batch):
            z0 = to_z0(batch)
            frame = torch.randint(0, z0.shape[2], (z0.shape[0],), device=z0.device)
            x0 = z0[torch.arange(z0.shape[0]), :, frame]                       # one random frame per clip
            return image_loss(net, sched, x0, drop_labels(label_of(batch), model.num_classes, cfg.p_uncond))

        train_stage(run, "base-pretrain", model.base, torch.optim.AdamW(model.base.parameters(), lr=cfg.lr),
                    base_loss, data, steps=cfg.base_steps, follows=("ae",), **every_stage)

    # stage 3: joint training of base and residual generators on the decomposed objective (§3.3)
    if "diffusion" in stages:
        if cfg.joint == "fixed":   # Table 7 "Fixed": the pretrained base generator is not trained
            model.base.requires_grad_(False)
        # Table 6 "w/ pretrain": a new diffusion stage starts its base generator from the pretrained image model,
        # whether that stage ran in this command or an earlier one (a resumed stage has its own weights)
        if run.has("base-pretrain") and not run.has("diffusion"):
            pretrained = load_checkpoint(run.checkpoint("base-pretrain"), SCRIPT, match, run.device)
            load_state_checked(model.base, pretrained["model"], run.checkpoint("base-pretrain"))
            run.print("diffusion: starting the base generator from base-pretrain.pt")
        params = [p for p in model.parameters() if p.requires_grad]

        labels = torch.arange(8) % model.num_classes if model.num_classes else None

        def sample_gif(ema_model, step):
            videos = generate(ema_model, ae, sched, cfg, n=8, steps=50, labels=labels, device=run.device,
                              dtype=run.dtype)
            write_gif(run.dir / "samples" / f"step_{step:07d}.gif", make_grid(to_uint8(videos)))

        ema = train_stage(run, "diffusion", model, torch.optim.AdamW(params, lr=cfg.lr),
                          lambda net, batch: diffusion_loss(net, model, sched, to_z0(batch), label_of(batch),
                                                            cfg.p_uncond),
                          data, steps=cfg.steps, ema_decay=cfg.ema_decay, sample_fn=sample_gif,
                          sample_every=cfg.sample_every, follows=("ae", "base-pretrain"),
                          **{**every_stage, "must_match": {**match, "joint": cfg.joint}})   # --joint: the ablation
        if run.dist.is_main:
            videos = generate(ema, ae, sched, cfg, n=8, steps=100, labels=labels, device=run.device,
                              dtype=run.dtype, progress=True)
            out = write_samples(run.dir / "samples" / "final", to_uint8(videos),
                                None if labels is None else labels.numpy())
            run.print(f"samples written to {out}/ (grid.gif, samples.npz, one mp4 per video)")


# --- Sampling: Alg. 1 (DDPM) and Alg. 2 (DDIM) ---

@torch.no_grad()
def generate(model: VideoFusion, ae, sched: Schedule, cfg: Config, *, n, steps, frames=None, sampler="ddpm",
             eta=0.0, labels=None, guidance=0.0, share=None, seed=0, device="cpu", dtype=None, progress=False):
    """n videos (n, 3, N, H, W) in [-1, 1]. Both algorithms start from decomposed noise (b shared by the frames,
    z^k = b) and, where a step adds noise, draw it decomposed too, one shared b per step."""
    N = frames or cfg.frames
    size = cfg.resolution // cfg.ae_factor if ae is not None else cfg.resolution
    C = cfg.z_channels if ae is not None else 3
    g = torch.Generator(device=device).manual_seed(seed)
    group = grid_columns(n)                  # a row of make_grid: Figure 1's rows share base or residual noise

    def noise_fn(x):
        return decomposed_noise(x.shape, model.lam, g, device, share, group)[0]

    if labels is not None:
        labels = labels.to(device)
        null = torch.full_like(labels, model.num_classes)

        def cond(z, t):
            return model.eps(z, t, labels)

        def uncond(z, t):
            return model.eps(z, t, null)

        eps_fn = guided(cond, uncond, guidance) if guidance else cond   # Eq. (9) of LVDM's convention
    else:
        def eps_fn(z, t):
            return model.eps(z, t, None)

    def eps_fp32(z, t):
        with autocast(torch.device(device), dtype):
            return eps_fn(z, t).float()

    z_T = noise_fn(torch.empty(n, C, N, size, size, device=device))
    # Pixels live in [-1, 1], so x0_hat is clipped there (DDPM's clip_denoised): at t near T, x0_hat from eps
    # is divided by sqrt(alpha_bar_t) ~ 0.006 and any eps error would blow up. Latents are left unclipped.
    clip = 1.0 if ae is None else None
    if sampler == "ddpm":
        # Alg. 1. The slides write sigma = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (1 - alpha_t), a variance;
        # the step uses its square root, as DDPM does.
        z = ddpm_sample(eps_fp32, z_T, sched, steps, clip_x0=clip, noise_fn=noise_fn, progress=progress)
    else:
        z = ddim_sample(eps_fp32, z_T, sched, steps, eta=eta, clip_x0=clip, noise_fn=noise_fn,
                        progress=progress)   # Alg. 2 as written is eta = 0
    if ae is not None:
        z = ae.decode(z / model.latent_scale)
    return z.clamp(-1, 1)


def check_frames(frames, cfg: Config):
    """A run samples clips of the length it was trained on: the key frame k = N // 2 and the frame indices the
    residual generator learned are tied to N, so another N is outside the training distribution."""
    if frames is not None and frames != cfg.frames:
        raise UserError(f"--frames {frames}: this run was trained on {cfg.frames}-frame clips, and VideoFusion's key "
                        f"frame (N // 2) and frame indices depend on N; sample {cfg.frames} frames or train a run with "
                        f"--frames {frames}")


def load_for_sampling(args, device):
    """The EMA diffusion model (and the autoencoder in latent space) of a run or checkpoint file."""
    path = find_checkpoint(SCRIPT, args.run, args.ckpt)
    ckpt = load_checkpoint(path, SCRIPT, map_location=device)
    if "ema" not in ckpt:
        raise UserError(f"{path} is a {ckpt.get('stage')} checkpoint, not a diffusion one: pass diffusion.pt")
    cfg = config_from_checkpoint(Config, ckpt, path)
    sched, model, ae = build(cfg, device)
    load_state_checked(model, ckpt["ema"]["model"], path)
    if ae is not None:
        ae = load_frame_autoencoder(ae, path.parent, cfg)
    return cfg, sched, model.eval(), ae, path


def sample(args):
    device = pick_device(args.device)
    cfg, sched, model, ae, path = load_for_sampling(args, device)
    check_steps(sched, ("--steps", args.steps))
    labels = None
    if model.num_classes:
        if args.label is not None and not 0 <= args.label < model.num_classes:
            raise UserError(f"--label must be in 0..{model.num_classes - 1} for this run, got {args.label}")
        index = torch.arange(args.n)
        if args.share:   # Figure 1: a grid row differs only in its unshared noise, so it keeps one label
            index = index // grid_columns(args.n)
        labels = torch.full((args.n,), args.label) if args.label is not None else index % model.num_classes
    elif args.label is not None:
        raise UserError(f"{path} is unconditional: --label needs a run trained with --class-cond")
    check_frames(args.frames, cfg)
    check_sample_memory(args.n, args.frames or cfg.frames, cfg.resolution, device)
    out = output_folder(args.out or path.parent / "samples" / (f"share-{args.share}" if args.share else "sample"))
    videos = generate(model, ae, sched, cfg, n=args.n, steps=args.steps, frames=args.frames, sampler=args.sampler,
                      eta=args.eta, labels=labels, guidance=args.guidance, share=args.share, seed=args.seed,
                      device=device, dtype=pick_precision(args.precision, device), progress=True)
    write_samples(out, to_uint8(videos), None if labels is None else labels.numpy())
    print(f"wrote {args.n} videos to {out}/ (grid.gif, samples.npz, video_*.mp4)")


# --- Evaluation ---

def evaluate(args):
    """FVD and KVD of sampled videos against the training data (IS with --c3d; PSNR, SSIM and R-FVD of the
    autoencoder in latent space)."""
    device = pick_device(args.device)
    cfg, sched, model, ae, path = load_for_sampling(args, device)
    dtype = pick_precision(args.precision, device)
    steps = args.steps or 100
    check_steps(sched, ("--steps", steps))
    check_frames(args.frames, cfg)

    def fake(n, frames, seed):
        labels = torch.arange(seed, seed + n) % model.num_classes if model.num_classes else None
        return to_uint8(generate(model, ae, sched, cfg, n=n, steps=steps, frames=frames, labels=labels, seed=seed,
                                 device=device, dtype=dtype))

    reconstruct = (lambda x: ae.decode(ae.encode(x)[0])) if ae is not None else None
    evaluate_run(SCRIPT, cfg, path.parent, fake, frames=cfg.frames, device=device, reconstruct=reconstruct,
                 sampler={"sampler": "ddpm", "steps": steps}, **eval_settings(args, cfg))


# --- Command line ---

def cli(argv=None):
    parser, sub = build_parser(SCRIPT, __doc__, Config, PRESETS, stages=("all", *STAGES))
    s = sub["sample"]
    s.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="Alg. 1 (DDPM; --steps below T respaces it) or Alg. 2 (DDIM)")
    s.set_defaults(steps=100)
    s.add_argument("--eta", type=number(float, 0, 1), default=0.0, help="DDIM stochasticity (0: Alg. 2 as written)")
    s.add_argument("--share", default=None, choices=["base", "residual"],
                   help="Figure 1: videos in a grid row share their base (or residual) noise")
    args = parser.parse_args(argv)
    run_command(args, train=train, sample=sample, eval=evaluate)


if __name__ == "__main__":
    main(cli)
