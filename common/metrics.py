"""The numbers papers report: FVD, KVD, IS, and PSNR / SSIM for autoencoders.

Features come from `common.i3d` (FVD, KVD) and `common.c3d` (IS); this file holds the maths on them, feature
extraction with a progress bar, and the on-disk cache of real-data features.
"""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import UserError
from common.files import atomic_write, cache_dir

# --- Distances between feature sets ---

def gaussian_stats(feats: np.ndarray):
    """Mean and biased covariance (divided by N) in float64, StyleGAN-V's convention
    (src/metrics/frechet_video_distance.py)."""
    x = np.asarray(feats, dtype=np.float64)
    mu = x.mean(axis=0)
    return mu, x.T @ x / len(x) - np.outer(mu, mu)


def frechet_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)      # the imaginary part from round-off is dropped below
    return float(np.real(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root)))


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FVD when the features are I3D logits of 16-frame clips."""
    return frechet_from_stats(*gaussian_stats(feats1), *gaussian_stats(feats2))


def kernel_distance(x: np.ndarray, y: np.ndarray) -> float:
    """KVD: the unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, over the full sets,
    no subsets and no x1000 (TATS tats/fvd/fvd.py, DIGAN src/scripts/compute_fvd_kvd.py, LVDM
    scripts/fvd_utils/fvd_utils.py)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    m, n, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def inception_score(probs: np.ndarray, splits: int = 10, seed: int = 42):
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` parts after a shuffle with RandomState(42)
    (StyleGAN-V's isv2048_ucf). 0 log 0 is taken as 0, so an underflowed probability cannot make it NaN."""
    p = np.asarray(probs, dtype=np.float64)
    p = p[np.random.RandomState(seed).permutation(len(p))]
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.where(part > 0, part, 1)) - np.log(np.maximum(marginal, 1e-300))), 0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --- Reconstruction (PVDM Table 4) ---

def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each video (B, C, T, H, W) in [-1, 1]: 10 log10(peak^2 / MSE) with peak-to-peak 2."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each video (B, C, T, H, W) in [-1, 1], averaged over frames and channels (Wang et al. 2004: an
    11x11 Gaussian window with sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2 on [0, 1] pixels, L = 1)."""
    B, C, T, H, W = x.shape
    x = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W).double()
    y = ((y.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).reshape(B * T * C, 1, H, W).double()
    window = min(window, H, W)
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :])[None, None]                           # (1, 1, k, k)

    def blur(a):
        return F.conv2d(a, kernel)                                            # 'valid', like skimage's default

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).reshape(B, T * C).mean(dim=1).float()


# --- Features ---

@torch.no_grad()
def extract(network, preprocess, videos, batch_size=8, device="cpu", desc="features") -> np.ndarray:
    """Run `network(preprocess(uint8 batch))` over uint8 videos (N, T, H, W, 3), an array or an iterable of
    batches; returns float64 (N, D)."""
    batches = videos
    if isinstance(videos, np.ndarray):
        batches = (videos[i:i + batch_size] for i in range(0, len(videos), batch_size))
    out = []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        x = preprocess(torch.as_tensor(np.ascontiguousarray(batch)).to(device))
        out.append(network(x).double().cpu().numpy())
    return np.concatenate(out)


def file_identity(path) -> dict:
    """What identifies a weight file or data root for the cache: absolute path, size and modification time."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime": st.st_mtime_ns}


def cached(key: dict, compute):
    """Features from the cache under a hash of `key` (everything that changes them), or computed and stored."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir() / "features" / f"{digest}.npy"
    try:
        if path.exists():
            return np.load(path)
    except OSError as e:      # a cache folder without read permission: computed again, as if it were empty
        warnings.warn(f"features cache not read: cannot read {path}: {e.strerror or e}")
    feats = compute()
    try:
        atomic_write(path, lambda p: np.save(p, feats))
        atomic_write(path.with_suffix(".json"), lambda p: p.write_text(json.dumps(key, sort_keys=True, default=str,
                                                                                     indent=1)))
    except UserError as e:   # an unwritable cache only costs the next evaluation its time
        warnings.warn(f"features not cached: {e}")
    return feats
