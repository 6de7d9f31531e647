"""Where evaluation videos come from: a samples.npz (the contract's `sample` output), a folder of video files or
frame folders, or a dataset spec `name[:root]` (`ucf101:/data/ucf`, `synthetic`).

Fake videos start at frame 0; real clips start at a seeded random frame, one clip per video, from the first N
videos in sorted order (StyleGAN-V's protocol, src/metrics/metric_main.py).

A samples.npz is checked when its spec is parsed, from the header of its `videos` array alone: anything but uint8
(N, T, H, W, 3) with N >= 1 is one sentence saying what was found, before any network is loaded.
"""
import zipfile
import zlib
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
        if not path.is_file():
            raise UserError(f"{spec} does not exist: expected a samples.npz written by `X.py sample`")
        npz_shape(path)
        return "npz", path
    if path.is_dir():
        return "folder", path
    name, _, root = spec.partition(":")
    if name in DATASETS:
        root = Path(root).expanduser() if root else None
        if root is not None and not root.is_dir():
            raise UserError(f"{spec!r}: {root} {'is not a folder' if root.exists() else 'does not exist'}: pass the "
                            f"folder of the {name} data (README, Data)")
        return name, root
    raise UserError(f"{spec!r} is neither a .npz file, an existing folder nor a dataset spec such as "
                    f"ucf101:/path/to/ucf or synthetic")


# what np.load raises on a damaged archive: a bad zip or CRC, a cut-short member, a corrupt compressed stream
READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error)


def npz_shape(path: Path) -> tuple:
    """The shape of `videos` in a samples.npz, read from the array's header without reading the videos."""
    try:
        with zipfile.ZipFile(path) as z:
            arrays = [name[:-4] for name in z.namelist() if name.endswith(".npy")]
            if "videos" not in arrays:
                raise UserError(f"{path} has no `videos` array (it holds {', '.join(arrays) or 'none'}): expected "
                                f"a samples.npz written by `X.py sample`")
            with z.open("videos.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
    except READ_ERRORS as e:
        what = "an empty file" if path.stat().st_size == 0 else f"{type(e).__name__}: {e}"
        raise UserError(f"{path} is not a readable npz archive ({what}): expected a samples.npz written by "
                        f"`X.py sample`") from None
    if dtype != np.uint8 or len(shape) != 5 or shape[-1] != 3:
        raise UserError(f"{path}: `videos` should be uint8 (N, T, H, W, 3) RGB videos, found {dtype} {shape}")
    if shape[0] < 1:
        raise UserError(f"{path} holds no videos (`videos` has shape {shape})")
    return shape


def npz_videos(path: Path) -> np.ndarray:
    """`videos` of a samples.npz whose header npz_shape has checked; a damaged array is one sentence."""
    try:
        with np.load(path) as f:
            return f["videos"]
    except READ_ERRORS as e:
        raise UserError(f"{path} is damaged: its `videos` array cannot be read ({type(e).__name__}: {e})") from None


def npz_resolution(spec: str):
    kind, path = parse_source(spec)
    return int(npz_shape(path)[2]) if kind == "npz" else None


def video_batches(spec: str, n: int, frames: int, resolution: int, *, real: bool, seed=0, split="train",
                  batch_size=8, workers=2):
    """(count, iterator of uint8 (B, frames, H, W, 3) batches): the first n videos of the source."""
    kind, path = parse_source(spec)
    if kind == "npz":
        videos = npz_videos(path)
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
