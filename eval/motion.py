"""Motion sanity of videos of one object on a plain background: a cheap check to run before FVD.

    python -m eval.motion --make balls/                       # 512 mp4s: one coloured ball bouncing on black
    python -m eval.motion --real balls/ --fake runs/X/samples/sample/samples.npz

FVD says how far two sets are apart, not what is wrong. On data as simple as one ball moving on a black
background, what is wrong can be named, video by video. Each frame is split into the background (the video's
per-channel median colour) and objects (8-connected regions that differ from it by more than 48 grey levels in some
channel, of at least `min_area` pixels; smaller regions are speckle). A generated video is *plausible* when it
passes all seven criteria; every range comes from the real videos, so a user's own one-object set sets its own:

    one_object        every frame holds exactly one object
    steady_size       the object's area varies over the video no more than the real videos' (and its median area
                      is within 0.5x-2x of theirs)
    object_colour     the object's colour (median of its pixels) stays within 24 levels, and it is as saturated as the
                      real objects (max - min channel at least half the real minimum; skipped for grey data)
    background_level  the background colour is within 10 grey levels of the real videos' median background
    background_noise  the background pixels (everything but the objects, dilated by one pixel) deviate from the
                      background colour no more than the real ones (1.5x their maximum + 2 levels): speckle fails
    speed             the object's median speed (centroid pixels per frame) is within the real range
                      (0.5x the slowest .. 1.5x the fastest + 0.5 pixel)
    smooth_motion     no more frames with a jolt (|second difference of the centroid| above max(1, R/50) pixels)
                      than any real video has (a bounce off a border is a jolt or two)

Prints one JSON line: the share of plausible videos, the share passing each criterion, the mean background error
(grey levels from the real background colour), the same for the real videos (a check of the measure itself: 1.0
on the real set), and the thresholds used. --real and --fake take what eval.fvd takes: a samples.npz, a folder of
videos or frame folders, or a dataset spec name[:root].
"""
import argparse
import colorsys
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.cli import SEED_MAX, Parser, main, number
from common.errors import UserError
from common.evaluate import report
from common.files import output_file
from common.sources import npz_shape, parse_source, video_batches
from common.video import write_mp4

CRITERIA = ("one_object", "steady_size", "object_colour", "background_level", "background_noise", "speed",
            "smooth_motion")
OBJECT_LEVEL = 48        # a pixel belongs to an object when some channel differs from the background by more
MIN_PIXELS = 3           # regions smaller than this are never objects, whatever the real data says
EIGHT = np.ones((3, 3), dtype=bool)


# --- The simple videos: one coloured ball on black, constant speed, bouncing off the borders ---

def ball_videos(n: int, frames: int = 16, resolution: int = 64, seed: int = 0, *, balls: int = 1,
                jitter: float = 0.0) -> np.ndarray:
    """(n, frames, R, R, 3) uint8, deterministic by (seed, index): `balls` balls of radius 0.08-0.14 R, each in a
    saturated colour (HSV saturation 1, value 0.8-1), moving 1-3 pixels per frame at R = 64 (scaled with R) in any
    direction, reflected at the borders, with a one-pixel antialiased edge. jitter > 0 shifts every frame's
    position by up to that many pixels at random (a shaking object, which the measure must call unsmooth)."""
    R = resolution
    ys, xs = np.meshgrid(np.arange(R) + 0.5, np.arange(R) + 0.5, indexing="ij")
    out = np.zeros((n, frames, R, R, 3), dtype=np.float64)
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        for _ in range(balls):
            r = rng.uniform(0.08, 0.14) * R
            speed, angle = rng.uniform(1.0, 3.0) * R / 64, rng.uniform(0, 2 * np.pi)
            start = rng.uniform(r, R - r, 2)
            colour = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), 1.0, rng.uniform(0.8, 1.0)))
            L = R - 2 * r             # the centre moves in [r, R - r]: reflect the straight path into it
            step = speed * np.array([np.cos(angle), np.sin(angle)])
            path = start[None] - r + np.arange(frames)[:, None] * step + rng.uniform(-jitter, jitter, (frames, 2))
            path = r + L - np.abs(np.mod(path, 2 * L) - L)                                      # (T, 2) as (x, y)
            dist = np.hypot(xs[None] - path[:, 0, None, None], ys[None] - path[:, 1, None, None])   # (T, R, R)
            alpha = np.clip(r + 0.5 - dist, 0, 1)[..., None]
            out[k] = out[k] * (1 - alpha) + alpha * colour * 255
    return np.round(out).astype(np.uint8)


# --- What one video shows ---

def analyse(video: np.ndarray) -> dict:
    """Per-frame facts of one (T, H, W, 3) uint8 video: its background colour, the areas of every region that
    differs from it, and the largest region's area, median colour (its antialiased edge does not shift it) and
    centroid."""
    v = video.astype(np.float32)
    background = np.median(v.reshape(-1, 3), axis=0)
    differs = np.abs(v - background).max(axis=-1) > OBJECT_LEVEL                       # (T, H, W)
    frames = []
    for t in range(len(v)):
        labels, count = ndimage.label(differs[t], structure=EIGHT)
        areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        frame = {"areas": areas, "labels": labels}
        if count:
            biggest = int(np.argmax(areas)) + 1
            ys, xs = np.nonzero(labels == biggest)
            frame.update(area=int(areas[biggest - 1]), colour=np.median(v[t, ys, xs], axis=0),
                         centroid=np.array([xs.mean(), ys.mean()]))
        frames.append(frame)
    return {"video": v, "background": background, "frames": frames, "resolution": video.shape[2]}


def objects_mask(facts: dict, min_area: float) -> np.ndarray:
    """(T, H, W) bool: the pixels of every object (region of at least min_area pixels), dilated by one pixel
    to leave out their antialiased edges."""
    masks = [np.isin(f["labels"], 1 + np.flatnonzero(f["areas"] >= min_area)) for f in facts["frames"]]
    return np.stack([ndimage.binary_dilation(m, structure=EIGHT) for m in masks])


def measures(facts: dict, min_area: float, background_ref=None) -> dict:
    """The numbers the criteria compare, for one analysed video."""
    frames = facts["frames"]
    counts = [int((f["areas"] >= min_area).sum()) for f in frames]
    whole = all(c >= 1 for c in counts)
    rest = ~objects_mask(facts, min_area)
    deviation = np.abs(facts["video"] - facts["background"]).max(axis=-1)
    m = {"counts": counts,
         "background": facts["background"],
         "background_noise": float(deviation[rest].mean()) if rest.any() else float("inf"),
         "background_error": (float(np.abs(facts["background"] - background_ref).max())
                              if background_ref is not None else 0.0)}
    if whole:       # the object's track, when there is an object in every frame
        areas = np.array([f["area"] for f in frames], dtype=np.float64)
        colours = np.stack([f["colour"] for f in frames])
        centres = np.stack([f["centroid"] for f in frames])
        median_colour = np.median(colours, axis=0)
        jolt = max(1.0, facts["resolution"] / 50)
        m.update(area=float(np.median(areas)), area_ratio=float(areas.max() / areas.min()),
                 colour_drift=float(np.abs(colours - median_colour).max()),
                 chroma=float(median_colour.max() - median_colour.min()),
                 speed=float(np.median(np.linalg.norm(np.diff(centres, axis=0), axis=1))) if len(frames) > 1
                 else 0.0,
                 jolts=int((np.linalg.norm(np.diff(centres, 2, axis=0), axis=1) > jolt).sum()))
    return m


# --- Ranges from the real videos, and the verdicts ---

def thresholds(real: list) -> tuple:
    """Every range a criterion uses, from the real videos' analyses (each must show one object throughout), and
    the real videos' measures against them."""
    areas = [f["area"] for facts in real for f in facts["frames"] if "area" in f]
    if not areas:
        raise UserError("no object found in the real videos: eval.motion expects videos of one object on a plain "
                        f"background (pixels differing from the background by more than {OBJECT_LEVEL} levels)")
    min_area = max(MIN_PIXELS, 0.3 * float(np.min(areas)))
    background = np.median(np.stack([facts["background"] for facts in real]), axis=0)
    ms = [measures(facts, min_area, background) for facts in real]
    tracked = [m for m in ms if "speed" in m]
    if not tracked:
        raise UserError("the real videos show no object in every frame: eval.motion expects one object that "
                        "stays in view")
    chroma = min(m["chroma"] for m in tracked)
    return {"min_area": min_area,
            "background": background,
            "background_level": 10.0,
            "background_noise": 1.5 * max(m["background_noise"] for m in ms) + 2.0,
            "area": [0.5 * min(m["area"] for m in tracked), 2.0 * max(m["area"] for m in tracked)],
            "area_ratio": max(1.5, 1.25 * max(m["area_ratio"] for m in tracked)),
            "colour_drift": 24.0,
            "chroma": 0.5 * chroma if chroma > 40 else 0.0,
            "speed": [0.5 * min(m["speed"] for m in tracked), 1.5 * max(m["speed"] for m in tracked) + 0.5],
            "jolts": max(m["jolts"] for m in tracked)}, ms


def verdict(m: dict, th: dict) -> dict:
    """criterion -> passed, for one video's measures. A criterion of the object's track fails where no object is
    tracked in every frame."""
    tracked = "speed" in m
    return {"one_object": all(c == 1 for c in m["counts"]),
            "steady_size": tracked and m["area_ratio"] <= th["area_ratio"]
            and th["area"][0] <= m["area"] <= th["area"][1],
            "object_colour": tracked and m["colour_drift"] <= th["colour_drift"] and m["chroma"] >= th["chroma"],
            "background_level": m["background_error"] <= th["background_level"],
            "background_noise": m["background_noise"] <= th["background_noise"],
            "speed": tracked and th["speed"][0] <= m["speed"] <= th["speed"][1],
            "smooth_motion": tracked and m["jolts"] <= th["jolts"]}


def score(real_videos: np.ndarray, fake_videos: np.ndarray) -> dict:
    """The report of eval.motion for two uint8 (N, T, H, W, 3) sets: shares of plausible videos and of each
    criterion, for the fake set and (as a check of the measure) for the real one."""
    th, real = thresholds([analyse(v) for v in real_videos])

    def summary(ms):
        verdicts = [verdict(m, th) for m in ms]
        return {"plausible": float(np.mean([all(v.values()) for v in verdicts])),
                "criteria": {c: float(np.mean([v[c] for v in verdicts])) for c in CRITERIA},
                "background_error": float(np.mean([m["background_error"] for m in ms])),
                "background_noise": float(np.mean([m["background_noise"] for m in ms]))}

    fake = summary([measures(analyse(v), th["min_area"], th["background"]) for v in fake_videos])
    shown = {**th, "background": [round(float(c), 2) for c in th["background"]]}
    return {**fake, "n_fake": len(fake_videos), "n_real": len(real_videos), "real": summary(real),
            "thresholds": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in shown.items()}}


# --- The command ---

def load(spec: str, n: int, frames: int, resolution: int, real: bool, seed: int) -> np.ndarray:
    count, batches = video_batches(spec, n, frames, resolution, real=real, seed=seed, workers=0)
    if count == 0:
        raise UserError(f"{spec} holds no video of {frames} frames")
    return np.concatenate(list(batches))


def write_folder(out: Path, n: int, frames: int, resolution: int, seed: int):
    videos = ball_videos(n, frames, resolution, seed)
    out.mkdir(parents=True, exist_ok=True)
    for k, video in enumerate(videos):
        write_mp4(out / f"ball_{k:05d}.mp4", video, fps=8)
    print(json.dumps({"wrote": str(out), "videos": n, "frames": frames, "resolution": resolution, "seed": seed}))


def parser():
    p = Parser(prog="python -m eval.motion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make", default=None, help="write the simple videos (one ball each) as mp4s into this folder")
    p.add_argument("--real", default=None, help="videos of one object: samples.npz, a folder, or name[:root]")
    p.add_argument("--fake", default=None, help="videos to judge: samples.npz, a folder, or name[:root]")
    p.add_argument("--n", type=number(int, lo=1), default=512,
                   help="videos to write (--make) or to read per side (default: 512)")
    p.add_argument("--frames", type=number(int, lo=2, hi=4096), default=None,
                   help="frames judged per video (default: 16, or the fake npz's if shorter)")
    p.add_argument("--resolution", type=number(int, lo=8, hi=1024), default=None,
                   help="side of the frames (default: the fake npz's, else 64)")
    p.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0,
                   help="seed of the written videos, and of the real clips' random starts (default: 0)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    return p


def run(argv=None):
    args = parser().parse_args(argv)
    if args.make:
        if args.real or args.fake:
            raise UserError("--make writes a folder of videos; judge them in a second command with --real/--fake")
        return write_folder(Path(args.make).expanduser(), args.n, args.frames or 16, args.resolution or 64,
                            args.seed)
    if not (args.real and args.fake):
        raise UserError("expected --real and --fake (videos to compare), or --make FOLDER (see --help)")
    kind, path = parse_source(args.fake)
    parse_source(args.real)                              # bad specs fail before anything is read
    shape = npz_shape(path) if kind == "npz" else None
    frames = args.frames or min(16, shape[1] if shape else 16)     # longer samples are judged on their start
    resolution = args.resolution or (shape[2] if shape else 64)
    if args.out:
        output_file(args.out)
    fake = load(args.fake, args.n, frames, resolution, real=False, seed=args.seed)
    real = load(args.real, args.n, frames, resolution, real=True, seed=args.seed)
    report({"real": args.real, "fake": args.fake, "frames": frames, "resolution": resolution, **score(real, fake)},
           args.out)


if __name__ == "__main__":
    main(run)
