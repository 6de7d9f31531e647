"""How fast real video data loads: probe and clip-decode times per format, ours against PyAV used directly, and
clips per second through the training DataLoader.

    python -m eval.data_speed --out /tmp/speed
    python -m eval.data_speed --out /tmp/speed --videos 8 --frames 150 --resolution 240   # UCF-101-like lengths

Writes --videos synthetic videos (moving shapes) of --frames frames at --resolution in each format: H.264 mp4,
mpeg4 avi in UCF-101's layout, VP9 webm (where the av wheel has the encoder), GIF and folders of PNG frames. Then
prints one JSON line per format:
  probe_ms, decode_ms       common.video.probe (no cache) and read_frames of a --clip-frame clip from a random
                            start, per file
  pyav_probe_ms, _decode_ms the same by PyAV used directly, as its documentation shows it: open, read the stream's
                            frame count, or decode from the first frame to the clip's last one and convert the frames
                            kept (a frame folder: each kept image opened and decoded by PyAV)
  probe_ratio, decode_ratio ours / PyAV; below 1 is faster
  clips_per_s               clips at --resolution/2 (decode, crop, resize, batches of 8) through make_loader with
                            0, 1 and 2 worker processes, after the first batch. With 0 the main process decodes,
                            between PyTorch ops whose OpenMP threads keep spinning: on 2 cores that can slow it
                            several times (OMP_WAIT_POLICY=PASSIVE avoids it); training decodes in workers.
Ours and PyAV are timed alternately, file by file, three times each, and the fastest time of each counts: a
machine busy with other work slows both alike, so the ratios hold better than the absolute times.
"""
import argparse
import json
import os
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np

from common.cli import Parser, main
from common.data import SyntheticVideos, make_dataset, make_loader
from common.errors import UserError
from common.video import list_frames, probe, pyav, read_frames

av = None       # PyAV, imported by run(): this module imports without it, as every other does
CODECS = {".mp4": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9"}


def parser():
    p = Parser(prog="python -m eval.data_speed", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the test videos (one sub-folder per format)")
    p.add_argument("--videos", type=int, default=24, help="videos per format (default: 24)")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default: 16)")
    p.add_argument("--resolution", type=int, default=64, help="frame height and width (default: 64)")
    p.add_argument("--clip", type=int, default=8, help="frames per decoded clip (default: 8)")
    p.add_argument("--fps", type=int, default=25, help="frames per second of the videos (default: 25)")
    return p


# --- Writing the test videos ---

def write_videos(out: Path, fmt: str, videos: np.ndarray, fps: int) -> list:
    """Each (T, H, W, 3) uint8 video of `videos` as a file (or frame folder) of format fmt; their paths."""
    paths = []
    for k, video in enumerate(videos):
        if fmt == ".avi":     # UCF-101: UCF-101/<Class>/v_<Class>_gXX_cYY.avi
            path = out / "UCF-101" / "Balls" / f"v_Balls_g{k // 4 + 1:02d}_c{k % 4 + 1:02d}.avi"
        else:
            path = out / (f"v{k:04d}" + ("" if fmt == ".png" else fmt))
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == ".png":
            path.mkdir(exist_ok=True)
            for t, frame in enumerate(video):
                iio.imwrite(path / f"{t:05d}.png", frame)
        elif fmt == ".gif":
            iio.imwrite(path, video, duration=1000 / fps, loop=0)
        else:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(CODECS[fmt], rate=fps)
                stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
                for frame in video:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        paths.append(path)
    if fmt == ".avi":
        lists = out / "ucfTrainTestlist"
        lists.mkdir(exist_ok=True)
        (lists / "classInd.txt").write_text("1 Balls\n")
        rel = [p.relative_to(out / "UCF-101").as_posix() for p in paths]
        (lists / "trainlist01.txt").write_text("".join(f"{r} 1\n" for r in rel))
        (lists / "testlist01.txt").write_text(f"{rel[0]}\n")
    return paths


# --- PyAV used directly: the reference ---

def pyav_probe(path: Path) -> int:
    if path.is_dir():
        return len(list_frames(path))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.frames or round(container.duration / av.time_base * stream.average_rate)


def pyav_clip(path: Path, indices: list) -> list:
    if path.is_dir():
        files = list_frames(path)
        out = []
        for i in indices:
            with av.open(str(files[i])) as container:
                out.append(next(container.decode(video=0)).to_ndarray(format="rgb24"))
        return out
    wanted, out = set(indices), []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    return out


# --- Timing ---

def side_by_side(paths, ours, reference, repeats=3) -> tuple:
    """Milliseconds per file of ours(path) and reference(path): each called `repeats` times on each path, the two
    alternating and which one goes first changing from call to call; the fastest of a file's calls counts (other
    work on the machine only ever adds time), averaged over the files."""
    ours(paths[0]), reference(paths[0])     # warm-up: imports, codec tables, the disk cache
    best = np.full((len(paths), 2), np.inf)
    for n, path in enumerate(paths):
        for r in range(repeats):
            for k in (0, 1) if (n + r) % 2 == 0 else (1, 0):
                start = time.perf_counter()
                (ours, reference)[k](path)
                best[n, k] = min(best[n, k], time.perf_counter() - start)
    return tuple(1000 * best.mean(axis=0))


def loader_rate(dataset, workers: int, batches=6, batch_size=8) -> float:
    """Clips per second through make_loader, after its first batch (worker start-up excluded)."""
    loader = make_loader(dataset, batch_size, workers=workers)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * batch_size / (time.perf_counter() - start)
    del loader          # stops its workers before the next setting starts its own
    return rate


def measure(out: Path, fmt: str, videos: np.ndarray, fps: int, resolution: int, span: int) -> dict:
    paths = write_videos(out / fmt.lstrip("."), fmt, videos, fps)
    T = videos.shape[1]
    rng = np.random.default_rng(0)
    clips = {p: list(range(s, s + span)) for p, s in zip(paths, rng.integers(0, T - span + 1, len(paths)))}
    probe_ms, pyav_probe_ms = side_by_side(paths, probe, pyav_probe)
    decode_ms, pyav_decode_ms = side_by_side(paths, lambda p: read_frames(p, clips[p]),
                                             lambda p: pyav_clip(p, clips[p]))
    name, root = ("ucf101", out / "avi") if fmt == ".avi" else ("folder", out / fmt.lstrip("."))
    dataset = make_dataset(name, root, frames=span, resolution=resolution // 2)
    rates = {str(w): round(loader_rate(dataset, w), 1) for w in (0, 1, 2)}
    return {"format": {".png": "png frames"}.get(fmt, fmt.lstrip(".")), "videos": len(paths),
            "probe_ms": round(probe_ms, 2), "decode_ms": round(decode_ms, 2),
            "pyav_probe_ms": round(pyav_probe_ms, 2), "pyav_decode_ms": round(pyav_decode_ms, 2),
            "probe_ratio": round(probe_ms / pyav_probe_ms, 2), "decode_ratio": round(decode_ms / pyav_decode_ms, 2),
            "clips_per_s": rates}


def run(argv=None):
    global av
    args = parser().parse_args(argv)
    av = pyav()         # every measurement writes or decodes video files: without PyAV, one error line first
    if args.videos < 1 or args.resolution < 2 or not 1 <= args.clip <= args.frames:
        raise UserError("expected --videos >= 1, --resolution >= 2 and 1 <= --clip <= --frames")
    out = Path(args.out).expanduser()
    os.environ["VIDIFF_CACHE"] = str(out / "cache")      # probe results of these files stay with them
    rendered = SyntheticVideos(args.frames, args.resolution, length=args.videos, seed=0)
    videos = np.stack([(rendered.render(k) * 255).round().astype(np.uint8) for k in range(args.videos)])
    for fmt in (".mp4", ".avi", ".webm", ".gif", ".png"):
        if fmt in CODECS and CODECS[fmt] not in av.codecs_available:
            print(json.dumps({"format": fmt.lstrip("."), "skipped": f"this av wheel has no {CODECS[fmt]} encoder"}))
            continue
        print(json.dumps(measure(out, fmt, videos, args.fps, args.resolution, args.clip)), flush=True)


if __name__ == "__main__":
    main(run)
