"""Video datasets of the contract: synthetic, ucf101, sky, taichi, folder.

Every dataset yields dicts {"video": (C, T, H, W) float32 in [-1, 1], "label": int (-1 = unlabelled),
"fps": float (frames per second of the clip, i.e. the file's fps divided by the frame stride)}.

A dataset is indexed either by an int (evaluation: the clip starts at frame 0) or by a key (index, item_seed)
from `StreamSampler` (training: a random start drawn from item_seed). Because the random start depends only on
the key, and the key stream only on (seed, samples seen), a resumed run reads exactly the clips it would have read.
"""
import json
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import TooShort, UserError
from common.files import atomic_write, cache_dir
from common.video import IMAGE_EXTS, VIDEO_EXTS, probe, pyav, read_frames

DATASETS = ("synthetic", "ucf101", "sky", "taichi", "folder")
LABELLED = ("synthetic", "ucf101")     # the datasets whose clips carry a class label


def clip_from_frames(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, R, R) float32 in [-1, 1]: centre square crop, antialiased bilinear resize.
    The crop comes first, and the resize runs on uint8 frames laid out channels-last, which PyTorch resizes with a
    vectorised kernel 6x faster than on floats (within one grey level of it): decoding, not resizing, sets the pace."""
    H, W = frames.shape[1:3]
    s = min(H, W)
    crop = frames[:, (H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2)   # (T, s, s, 3) -> (T, 3, s, s), channels-last
    if s != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    x = x.permute(1, 0, 2, 3).contiguous()        # (T, 3, R, R) -> (3, T, R, R), still uint8: a quarter of the bytes
    return x.float().div_(127.5).sub_(1)           # 0..255 -> [-1, 1]


# --- Synthetic moving objects ---

SHAPES = ("square", "disc", "diamond", "ring")


class SyntheticVideos(Dataset):
    """Moving shapes on a dark background, generated on the fly and deterministic by (seed, index).

    label = the shape class (square, disc, diamond, ring); fps is drawn from `fps_choices` and sets how far the
    objects move per frame (a constant speed in image widths per second), so class and fps conditioning both
    have something to learn. One or two objects per video bounce off the borders.
    """
    num_classes = len(SHAPES)
    fps_choices = (8.0, 16.0, 32.0)

    def __init__(self, frames=16, resolution=32, length=10_000, seed=0, split="train"):
        self.frames, self.resolution, self.length = frames, resolution, length
        self.seed = seed + (0 if split == "train" else 1_000_003)   # held-out clips for evaluation
        self.name = "synthetic"

    def __len__(self):
        return self.length

    def meta(self, index: int) -> dict:
        """Label and fps of video `index`, without rendering it."""
        rng = np.random.default_rng([self.seed, index])
        return {"label": int(rng.integers(len(SHAPES))), "fps": float(rng.choice(self.fps_choices))}

    def render(self, index: int) -> np.ndarray:
        """(T, R, R, 3) float in [0, 1]."""
        rng = np.random.default_rng([self.seed, index])
        label, fps = int(rng.integers(len(SHAPES))), float(rng.choice(self.fps_choices))
        R, T = self.resolution, self.frames
        ys, xs = np.meshgrid((np.arange(R) + 0.5) / R, (np.arange(R) + 0.5) / R, indexing="ij")   # (R, R)
        video = np.broadcast_to(rng.uniform(0.0, 0.25, 3), (T, R, R, 3)).copy()
        time = np.arange(T)[:, None, None] / fps                                                   # seconds
        for _ in range(rng.integers(1, 3)):
            r = rng.uniform(0.12, 0.2)                       # radius in image widths
            p0, speed = rng.uniform(r, 1 - r, 2), rng.uniform(0.6, 1.2)
            angle = rng.uniform(0, 2 * np.pi)
            # bounce: reflect the straight path into [r, 1 - r] (a triangle wave of period 2 (1 - 2r))
            path = p0[None] - r + speed * np.array([np.cos(angle), np.sin(angle)])[None] * time[:, :, 0]
            L = 1 - 2 * r
            path = r + L - np.abs(np.mod(path, 2 * L) - L)                                         # (T, 2)
            dx, dy = xs[None] - path[:, 0, None, None], ys[None] - path[:, 1, None, None]          # (T, R, R)
            sdf = {"square": np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r,
                   "disc": np.hypot(dx, dy) - r,
                   "diamond": np.abs(dx) + np.abs(dy) - 1.2 * r,
                   "ring": np.abs(np.hypot(dx, dy) - 0.7 * r) - 0.3 * r}[SHAPES[label]]
            alpha = np.clip(0.5 - sdf * R, 0, 1)[..., None]                                        # 1-pixel soft edge
            colour = rng.uniform(0.5, 1.0, 3) * (rng.permutation(3) != 0)  # saturated: one channel off
            video = video * (1 - alpha) + colour * alpha
        return video

    def __getitem__(self, key):
        index = key[0] if isinstance(key, (tuple, list)) else key
        video = torch.from_numpy(self.render(index)).float().permute(3, 0, 1, 2) * 2 - 1  # (T,R,R,3)->(3,T,R,R)
        return {"video": video.contiguous(), **self.meta(index)}


# --- Datasets of files ---

def _not_readable_kind(p: Path):
    """'a FIFO', 'a socket', 'a device' for a path that is neither a regular file nor a folder (reading one would
    block for ever, or never end), 'missing' for a path that does not exist; None for a file or folder."""
    try:
        mode = p.stat().st_mode
    except OSError:
        return "missing"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def _probe_all(paths: list) -> dict:
    """{path: (frames, fps)} for every readable path; unreadable ones, and paths that are no file or folder (a
    FIFO would block the probe for ever), are warned about and left out. Results are cached on disk, keyed by path,
    size and modification time, so a second run starts at once."""
    for p in paths:
        kind = _not_readable_kind(p)
        if kind:
            warnings.warn(f"skipping {p}: it is {kind}, not a video file or frame folder")
    paths = [p for p in paths if not _not_readable_kind(p)]
    if any(not p.is_dir() for p in paths):
        pyav()      # video files need it: one error now, not a warning per file that leaves none to train on
    cache_file = cache_dir() / "probe.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}

    def key(p):
        st = p.stat()
        return f"2|{p}|{st.st_size}|{st.st_mtime_ns}"     # 2: frame folders' first image is read too

    def one(p):
        k = key(p)
        if k in cache:
            return p, k, cache[k]
        try:
            return p, k, list(probe(p))
        except Exception as e:   # any decoder failure means "unreadable": warn, skip, go on
            warnings.warn(f"skipping unreadable video {p}: {type(e).__name__}: {e}")
            return p, k, None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, paths))
    fresh = {k: v for _, k, v in results if v is not None and k not in cache}
    if fresh:
        cache.update(fresh)
        try:
            atomic_write(cache_file, lambda p: p.write_text(json.dumps(cache)))
        except UserError:
            pass   # a read-only home only costs the next run its start-up time
    return {p: tuple(v) for p, _, v in results if v is not None}


class VideoClips(Dataset):
    """Clips of `frames` frames at `stride` from a list of (path, label) videos (files or frame folders)."""

    def __init__(self, name, items, frames=16, resolution=64, stride=1, num_classes=0):
        self.name, self.frames, self.resolution, self.stride = name, frames, resolution, stride
        self.num_classes = num_classes
        need = (frames - 1) * stride + 1
        info = _probe_all([p for p, _ in items])
        self.videos = [(p, label, *info[p]) for p, label in items if p in info and info[p][0] >= need]
        self.left_out = len(items) - len(self.videos)
        if items and not info:
            raise UserError(f"none of the {len(items)} videos found in {name} can be read (the warnings above say "
                            f"why): check the files, or re-encode them with ffmpeg")
        if not self.videos:
            raise TooShort(f"no video in {name} has the {need} frames a clip needs ({frames} frames at stride "
                           f"{stride}); {len(items)} found: pass a smaller --frames or use longer videos",
                           max((v[0] for v in info.values()), default=0))
        self._bad = set()

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, key):
        index, item_seed = key if isinstance(key, (tuple, list)) else (key, None)
        for attempt in range(len(self.videos)):
            i = (index + attempt) % len(self.videos)
            if i in self._bad:
                continue
            path, label, n, fps = self.videos[i]
            span = (self.frames - 1) * self.stride + 1
            start = 0 if item_seed is None else int(np.random.default_rng(item_seed).integers(n - span + 1))
            try:
                frames = read_frames(path, range(start, start + span, self.stride))
            except EOFError:
                try:   # the container overstated its length: fall back to the start of the video
                    frames = read_frames(path, range(0, span, self.stride))
                except Exception as e:
                    self._skip(i, path, e)
                    continue
            except Exception as e:
                self._skip(i, path, e)
                continue
            clip_fps = fps / self.stride if np.isfinite(fps) else float("nan")
            return {"video": clip_from_frames(frames, self.resolution), "label": label, "fps": clip_fps}
        raise UserError(f"every video in {self.name} failed to decode (the warnings above name each one): check "
                        f"the files, or re-encode them with ffmpeg")

    def _skip(self, i, path, err):
        self._bad.add(i)
        warnings.warn(f"skipping unreadable video {path}: {type(err).__name__}: {err}")


def _missing(name, root, layout, source):
    return UserError(f"{name} not found at {root}: expected {layout}; it is published at {source}")


def _lines(path: Path) -> list:
    """(line number, whitespace-separated fields) of each non-empty line of a UCF-101 split or class file."""
    try:
        text = path.read_text(encoding="utf-8-sig")   # tolerates a byte-order mark
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): expected the plain-text file of "
                        f"UCF101TrainTestSplits-RecognitionTask.zip") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def ucf101_items(root: Path, split="train", fold=1):
    """UCF-101: root/UCF-101/<Class>/v_*.avi with root/ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt."""
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    if not videos.is_dir() or not (lists / "classInd.txt").is_file():
        raise _missing("UCF-101", root, "UCF-101/<Class>/v_*.avi and ucfTrainTestlist/ (classInd.txt, "
                       "trainlist01.txt, testlist01.txt)", "https://www.crcv.ucf.edu/data/UCF101.php "
                       "(UCF101.rar and UCF101TrainTestSplits-RecognitionTask.zip)")
    classes = {}
    for n, fields in _lines(lists / "classInd.txt"):
        if len(fields) != 2 or not fields[0].isdigit():
            raise UserError(f"{lists / 'classInd.txt'} line {n} reads {' '.join(fields)!r}: expected "
                            f"'<index> <ClassName>' such as '1 ApplyEyeMakeup'")
        classes[fields[1]] = int(fields[0]) - 1      # classInd is 1-based
    splits = {"train": ["train"], "test": ["test"], "all": ["train", "test"]}[split]
    items = []
    for s in splits:
        list_file = lists / f"{s}list0{fold}.txt"
        if not list_file.is_file():
            raise UserError(f"missing split file {list_file}: expected fold {fold} of ucfTrainTestlist")
        for n, fields in _lines(list_file):
            name, _, file = fields[0].partition("/")
            if name not in classes or not file:
                raise UserError(f"{list_file} line {n} reads {' '.join(fields)!r}: expected "
                                f"<Class>/v_<Class>_gXX_cYY.avi with a class that classInd.txt lists")
            items.append((videos / fields[0], classes[name]))
    missing = [p for p, _ in items if not p.exists()]
    if missing:
        warnings.warn(f"{len(missing)} videos named in the UCF-101 split files are missing, e.g. {missing[0]}")
    return [(p, c) for p, c in items if p.exists()], len(classes)


def sky_items(root: Path, split="train"):
    """SkyTimelapse: root/sky_{train,test}/<video>/<clip>/<frame>.jpg; each clip folder is one video."""
    base = root / f"sky_{split}"
    if not base.is_dir():
        raise _missing("SkyTimelapse", root, "sky_train/ and sky_test/, each <video>/<clip>/<frame>.jpg",
                       "https://github.com/weixiong-ur/mdgan")
    return [(clip, -1) for video in _subfolders(base) for clip in _subfolders(video)]


def _unreadable_folder(error: OSError):
    """A folder that cannot be listed is named in one warning, as an unreadable file is, and left out: its videos
    must not vanish without a word (os.walk's default is to skip it silently)."""
    warnings.warn(f"skipping unreadable folder {error.filename}: {error.strerror or error}")


def _subfolders(folder: Path) -> list:
    """The folders directly inside `folder`, sorted; none, with a warning, when it cannot be listed."""
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError as e:
        _unreadable_folder(e)
        return []


def _scan(root: Path):
    """Video files and folders that directly hold image frames, anywhere below root, sorted; a folder that cannot be
    listed is named in a warning."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_unreadable_folder):
        dirnames.sort()
        if any(Path(f).suffix.lower() in IMAGE_EXTS for f in filenames):
            items.append(Path(dirpath))
        items += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in VIDEO_EXTS]
    return sorted(items)


def taichi_items(root: Path, split="train"):
    """TaiChi-HD: root/{train,test}/ holding <video>.mp4 files or <video>/ frame folders."""
    base = root / split
    found = _scan(base) if base.is_dir() else []
    if not found:
        raise _missing("TaiChi-HD", root, "train/ and test/, each with <video>.mp4 files or <video>/ frame "
                       "folders", "https://github.com/AliaksandrSiarohin/first-order-model (data/taichi-loading)")
    return [(p, -1) for p in found]


def folder_items(root: Path):
    found = _scan(root) if root.is_dir() else []
    if not found:
        raise UserError(f"no videos found under {root}: expected .mp4/.avi/.webm/.gif files or folders of "
                        f".png/.jpg frames, searched recursively")
    return [(p, -1) for p in found]


def make_dataset(name: str, root=None, *, frames=16, resolution=64, stride=None, split="train", fold=1, seed=0):
    """Build one of the contract's datasets. stride=None takes the dataset's usual stride (4 for TaiChi, as in
    LVDM §4.1 and the papers it follows; 1 elsewhere)."""
    if name == "synthetic":
        return SyntheticVideos(frames, resolution, seed=seed, split=split)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
    if root is None:
        raise UserError(f"--data {name} needs --data-root PATH pointing at the dataset")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-root {root} is {_not_readable_kind(root) or 'a file'}, not a folder: pass the "
                        f"folder of the {name} data")
    if split not in ("train", "test", "all"):
        raise UserError(f"unknown split {split!r}: expected train or test")
    stride = stride or (4 if name == "taichi" else 1)
    num_classes = 0
    if name == "ucf101":
        items, num_classes = ucf101_items(root, split, fold)
    elif name == "sky":
        items = sky_items(root, split)
    elif name == "taichi":
        items = taichi_items(root, split)
    else:
        items = folder_items(root)
    ds = VideoClips(name, items, frames, resolution, stride, num_classes)
    if ds.left_out:
        warnings.warn(f"{name}: {ds.left_out} of {len(items)} videos left out (unreadable or shorter than "
                      f"{(frames - 1) * stride + 1} frames)")
    return ds


# --- Loading ---

class StreamSampler(Sampler):
    """An endless, resumable stream of keys (index, item_seed).

    Global sample k of the stream is permutation_{k // N}[k % N] of epoch k // N, with item_seed (seed, k).
    Each optimizer step consumes batch_size * world samples; rank r takes its contiguous share of them. Starting
    at `start` samples reproduces the stream exactly, whatever the world size was before.
    """

    def __init__(self, n, batch_size, seed=0, start=0, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start, rank, world

    def __iter__(self):
        pos, perm, epoch = self.start, None, -1
        while True:
            for k in range(pos + self.rank * self.batch_size, pos + (self.rank + 1) * self.batch_size):
                if k // self.n != epoch:
                    epoch = k // self.n
                    perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                yield int(perm[k % self.n]), (self.seed, k)
            pos += self.batch_size * self.world


def make_loader(dataset, batch_size, *, seed=0, start=0, rank=0, world=1, workers=None):
    """An endless iterator of training batches that resumes at `start` samples. Synthetic data is rendered in
    the main process (it is cheaper than shipping it between processes); files are decoded by workers."""
    if workers is None:
        workers = 0 if isinstance(dataset, SyntheticVideos) else min(8, os.cpu_count() or 1)
    sampler = StreamSampler(len(dataset), batch_size, seed, start, rank, world)
    return iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                           pin_memory=torch.cuda.is_available(), drop_last=True,
                           persistent_workers=workers > 0))


def fixed_batch(dataset, n, start=0):
    """The first n clips from `start` with fixed (evaluation) starts, stacked: for held-out checks and tests."""
    items = [dataset[i % len(dataset)] for i in range(start, start + n)]
    return {k: torch.utils.data.default_collate([it[k] for it in items]) for k in items[0]}

