"""Reading and writing real video files.

Video files (.mp4 .avi .webm .mkv .mov .gif) are read with PyAV (FFmpeg's libraries inside the `av` wheel) used
directly; frame folders (SkyTimelapse, TaiChi) with Pillow, only the images a clip needs.
- probe: the frame count and fps from the container's metadata (mp4's sample table, avi's header, GIF, the duration
  x fps of webm/mkv); only a file that states neither is decoded to count its frames.
- read_frames: open once, seek to the key frame before the clip's first frame (containers with an index; each frame's
  index comes from its timestamp, and decoding restarts at frame 0 when timestamps do not count frames one by one),
  decode forward to the clip's last frame, and convert to RGB only the frames kept. One decoding thread per file:
  DataLoader workers decode files in parallel, and on small frames FFmpeg's thread pool costs more than it saves.

Why, measured side by side on a shared 2-core Xeon (README, "Data speed"): imageio's pyav plugin, used before,
decoded a whole file to probe it, 267 ms per 16-frame 64x64 H.264 file against 1.6 ms now, and read an 8-frame clip
in 114 ms against 4.5 ms. Probing now costs under 1 ms per file in every format, and a clip decodes in 0.6 to 1.1x
the time of PyAV used as its documentation shows (decode from the first frame, default threads).

Everything returns uint8 arrays (T, H, W, 3): grey, grey+alpha, palette and RGBA frames are converted to RGB (alpha
dropped), 16-bit frames keep their high byte, and a frame whose size differs from the clip's first frame is resized
to it.

PyAV is imported where a video file is read or written (pyav()), not with this module: synthetic data, frame
folders, training and the benchmarks run on a Python without it (the CUDA machines' may lack it).
"""
import warnings
from fractions import Fraction
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image

from common.errors import UserError
from common.files import atomic_write

VIDEO_EXTS = (".mp4", ".avi", ".webm", ".gif", ".mov", ".mkv")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
SEEKABLE = (".mp4", ".avi", ".webm", ".mov", ".mkv")   # containers with an index of key frames


def pyav():
    """The `av` module, or one sentence saying how to get it."""
    try:
        import av
    except ImportError:
        raise UserError("video files (.mp4 .avi .webm .gif .mov .mkv) are read and written with PyAV, which this "
                        "Python lacks: pip install av") from None
    return av


def list_frames(folder) -> list:
    """Sorted image files directly inside `folder` (regular files: a FIFO named 0001.png would block a read)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def probe(path) -> tuple:
    """(number of frames, fps) of a video file or frame folder, from metadata where the container has it.
    Raises av.FFmpegError, or IndexError for a file without a video stream, when the file is unreadable (and
    Pillow's error for a frame folder whose first image is)."""
    path = Path(path)
    if path.is_dir():
        files = list_frames(path)
        if files:
            read_image(files[0])     # a folder of unreadable images is unreadable now, not at its first clip
        return len(files), float("nan")
    av = pyav()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        n = stream.frames                          # mp4, mov, avi and gif state it
        if not n and rate and container.duration:  # webm and mkv state a duration instead (a longer audio
            n = round(Fraction(container.duration, av.time_base) * rate)   # track overstates it: see read_frames)
        if not n:                                  # neither: count the frames, the one slow case
            n = sum(1 for _ in container.decode(stream))
    return int(n), (float(rate) if rate else float("nan"))


def read_frames(path, indices) -> np.ndarray:
    """The frames at the given increasing indices, (len(indices), H, W, 3) uint8.
    Raises EOFError if the video ends before the last index (container frame counts can overstate)."""
    path, indices = Path(path), list(indices)
    if path.is_dir():
        files = list_frames(path)
        if indices[-1] >= len(files):
            raise EOFError(f"{path} has {len(files)} frames, needed {indices[-1] + 1}")
        return _same_size([read_image(files[i]) for i in indices])
    with pyav().open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"   # one thread per file: workers decode files in parallel (module docstring)
        frames = None
        if path.suffix.lower() in SEEKABLE and indices[0] > 0:
            frames = _read_after_seek(container, stream, indices, path)
            if frames is None:        # the seek was unreliable: back to the start
                container.seek(0)
        if frames is None:
            frames = _take(enumerate(container.decode(stream)), indices, path)
        return _same_size([f.to_ndarray(format="rgb24") for f in frames])   # only the kept frames become RGB


def read_image(path) -> np.ndarray:
    """One frame file as (H, W, 3) uint8. A 16-bit grey PNG (Pillow's modes I;16 and I) keeps the high byte of each
    value, 0..65535 -> 0..255, as Pillow itself reads 16-bit colour PNGs; its conversion to RGB would instead clip
    every value above 255 to white."""
    with Image.open(path) as im:
        if im.mode.startswith("I"):
            grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)   # (H, W)
            return np.repeat(grey[..., None], 3, axis=-1)                                    # -> (H, W, 3)
        return np.asarray(im.convert("RGB"))


def _take(numbered, indices, path) -> list:
    """The items of an iterator of (frame index, frame) at `indices`, stopping after the last one."""
    wanted, out, last = set(indices), {}, -1
    for last, frame in numbered:
        if last in wanted:
            out[last] = frame
        if last >= indices[-1]:
            return [out[i] for i in indices]
    raise EOFError(f"{path} ended after {last + 1} frames, needed {indices[-1] + 1}")


def _read_after_seek(container, stream, indices, path):
    """The frames at `indices`, decoded from the key frame before the first: each frame's index is its
    presentation time x the frame rate. None when the timestamps do not count frames one by one (a variable frame
    rate, missing timestamps, or a seek that landed after the clip's start): the caller decodes from frame 0."""
    rate, start = stream.average_rate or stream.guessed_rate, stream.start_time or 0
    if not rate:
        return None
    container.seek(start + int(indices[0] / rate / stream.time_base), stream=stream)   # backward, to a key frame

    def numbered():   # frames are counted from the first one decoded; each timestamp must agree with the count
        first = None
        for n, frame in enumerate(container.decode(stream)):
            if frame.pts is None:
                raise LookupError
            at = round((frame.pts - start) * stream.time_base * rate)
            first = at if first is None else first
            if at != first + n or first > indices[0]:
                raise LookupError
            yield first + n, frame

    try:
        return _take(numbered(), indices, path)
    except LookupError:
        return None


def _same_size(frames: list) -> np.ndarray:
    """Stack (H, W, 3) uint8 frames, resizing any whose size differs from the first frame's (antialiased
    bilinear): a frame folder can mix sizes, and a stream can change size mid-way."""
    H, W = frames[0].shape[:2]
    for k, f in enumerate(frames):
        if f.shape[:2] != (H, W):
            x = torch.from_numpy(f).permute(2, 0, 1)[None].float()                   # (H', W', 3) -> (1, 3, H', W')
            x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
            frames[k] = x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.stack(frames)


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
    conditional), grid.gif of up to 16 videos, and one mp4 per video. Without PyAV the mp4s are left out with a
    warning: the npz and the GIF hold the same videos, and sampling took minutes that an error would throw away."""
    out_dir = Path(out_dir)
    arrays = {"videos": videos} if labels is None else {"videos": videos, "labels": np.asarray(labels)}
    atomic_write(out_dir / "samples.npz", lambda p: np.savez(p, **arrays))
    write_gif(out_dir / "grid.gif", make_grid(videos), fps)
    try:
        pyav()
    except UserError as e:
        warnings.warn(f"no .mp4 files written to {out_dir} (samples.npz and grid.gif are): {e}")
        return out_dir
    for k, v in enumerate(videos):
        write_mp4(out_dir / f"video_{k:04d}.mp4", v, fps)
    return out_dir
