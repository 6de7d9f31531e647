"""Reading and writing real video files.

Decoding goes through imageio's pyav plugin (FFmpeg's libraries inside the `av` wheel): it reads the frame count
and fps from the container without decoding, and stops decoding once a clip's last frame is reached. Frame folders
(SkyTimelapse, TaiChi) are read with imageio's image plugins. Everything returns uint8 arrays (T, H, W, 3).
"""
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from common.files import atomic_write

VIDEO_EXTS = (".mp4", ".avi", ".webm", ".gif", ".mov", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")


def _rgb(frame: np.ndarray) -> np.ndarray:
    """Grey or RGBA frame -> (H, W, 3) uint8."""
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    return np.ascontiguousarray(frame[..., :3])


def list_frames(folder) -> list:
    """Sorted image files directly inside `folder`."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)


def probe(path) -> tuple:
    """(number of frames, fps) of a video file or frame folder, read from metadata where the container has it.
    Raises OSError/ValueError for an unreadable file."""
    path = Path(path)
    if path.is_dir():
        return len(list_frames(path)), float("nan")
    if path.suffix.lower() == ".gif":
        n = iio.improps(path).shape[0]
        duration = iio.immeta(path).get("duration", 0) or 0   # milliseconds per frame
        return n, (1000.0 / duration if duration else float("nan"))
    n = iio.improps(path, plugin="pyav").shape[0]
    fps = iio.immeta(path, plugin="pyav").get("fps", float("nan"))
    return int(n), float(fps)


def read_frames(path, indices) -> np.ndarray:
    """The frames at the given increasing indices, (len(indices), H, W, 3) uint8.
    Raises EOFError if the video ends before the last index (container frame counts can overstate)."""
    path, indices = Path(path), list(indices)
    if path.is_dir():
        files = list_frames(path)
        if indices[-1] >= len(files):
            raise EOFError(f"{path} has {len(files)} frames, needed {indices[-1] + 1}")
        return np.stack([_rgb(iio.imread(files[i])) for i in indices])
    wanted, out = set(indices), {}
    frames = iio.imiter(path) if path.suffix.lower() == ".gif" else iio.imiter(path, plugin="pyav")
    for i, frame in enumerate(frames):
        if i in wanted:
            out[i] = _rgb(frame)
        if i >= indices[-1]:
            break
    if len(out) < len(wanted):
        raise EOFError(f"{path} ended after {i + 1} frames, needed {indices[-1] + 1}")
    return np.stack([out[i] for i in indices])


# --- writing ---

def to_uint8(videos: torch.Tensor) -> np.ndarray:
    """(B, C, T, H, W) in [-1, 1] -> (B, T, H, W, 3) uint8, the contract's samples.npz layout."""
    x = ((videos.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 4, 1).cpu().numpy()   # (B, C, T, H, W) -> (B, T, H, W, C)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def grid_columns(n: int) -> int:
    """Videos per row of make_grid's near-square grid of n videos."""
    return int(np.ceil(np.sqrt(n)))


def make_grid(videos: np.ndarray, max_videos: int = 16, pad: int = 2) -> np.ndarray:
    """(N, T, H, W, 3) uint8 -> one (T, H', W', 3) video with up to `max_videos` tiled in a near-square grid."""
    v = videos[:max_videos]
    n, T, H, W, _ = v.shape
    cols = grid_columns(n)
    rows = int(np.ceil(n / cols))
    grid = np.zeros((T, rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y:y + H, x:x + W] = v[k]
    return grid


def write_gif(path, video: np.ndarray, fps: float = 8):
    """(T, H, W, 3) uint8 -> looping GIF."""
    atomic_write(path, lambda p: iio.imwrite(p, video, duration=1000 / fps, loop=0))


def write_mp4(path, video: np.ndarray, fps: float = 8):
    """(T, H, W, 3) uint8 -> H.264 mp4 (sides padded to even sizes, which yuv420p requires)."""
    T, H, W, _ = video.shape
    video = np.pad(video, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    atomic_write(path, lambda p: iio.imwrite(p, video, plugin="pyav", codec="libx264", fps=fps))


def write_samples(out_dir, videos: np.ndarray, labels=None, fps: float = 8) -> Path:
    """The contract's sample outputs: samples.npz (`videos` uint8 (N, T, H, W, 3) and `labels` where
    conditional), grid.gif of up to 16 videos, and one mp4 per video."""
    out_dir = Path(out_dir)
    arrays = {"videos": videos} if labels is None else {"videos": videos, "labels": np.asarray(labels)}
    atomic_write(out_dir / "samples.npz", lambda p: np.savez(p, **arrays))
    write_gif(out_dir / "grid.gif", make_grid(videos), fps)
    for k, v in enumerate(videos):
        write_mp4(out_dir / f"video_{k:04d}.mp4", v, fps)
    return out_dir
