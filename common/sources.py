"""Where evaluation videos come from: a samples.npz (the contract's `sample` output), a folder of video files or
frame folders, or a dataset spec `name[:root]` (`ucf101:/data/ucf`, `synthetic`).

Fake videos start at frame 0; real clips start at a seeded random frame, one clip per video, from the first N
videos in sorted order (StyleGAN-V's protocol, src/metrics/metric_main.py).
"""
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data import DATASETS, SyntheticVideos, make_dataset
from common.errors import UserError
from common.metrics import file_identity
from common.video import to_uint8


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
    if name in DATASETS:
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
