"""Datasets through the real decoders, on small files the tests write in each real layout."""
import errno
import json
import os
import warnings
from fractions import Fraction

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

import common.data
import common.video
from common.data import StreamSampler, SyntheticVideos, clip_from_frames, fixed_batch, make_dataset, make_loader
from common.errors import UserError
from common.video import make_grid, probe, read_frames, to_uint8, write_samples
from tests import toy_script
from tests.fixtures import (LEVEL, frames, make_gif_folder, make_sky, make_ucf101, permissions_apply, write_overstated,
                            write_video)


def frame_levels(clip):
    """Grey level of each frame of a (3, T, H, W) clip in [-1, 1], read from its top-left corner, in 0..255."""
    return ((clip[:, :, :3, :3].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def test_ucf101_loads_clips_with_labels_fps_and_stride(tmp_path):
    root = make_ucf101(tmp_path / "ucf")
    with pytest.warns(UserWarning, match="1 of 4 videos left out"):
        ds = make_dataset("ucf101", root, frames=8, resolution=32, stride=2, split="train")
    assert len(ds) == 3 and ds.num_classes == 2
    item = ds[1]
    clip = item["video"]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    assert item["label"] == 1 and item["fps"] == pytest.approx(10 / 2)
    assert np.allclose(frame_levels(clip), LEVEL * 2 * np.arange(8), atol=2.5)   # frames 0, 2, 4, ...
    # the red marker sits in the middle: the crop is centred
    centre = clip[:, 0, 14:18, 14:18].mean(dim=(1, 2))
    assert centre[0] > 0.8 and centre[1] < -0.6


def test_random_start_is_a_function_of_the_key(tmp_path):
    ds = make_dataset("ucf101", make_ucf101(tmp_path / "ucf"), frames=4, resolution=16, stride=3, split="train")
    starts = set()
    for seed in range(8):
        levels = frame_levels(ds[(0, (1, seed))]["video"])
        assert np.allclose(np.diff(levels), LEVEL * 3, atol=2.5)
        starts.add(round(levels[0] / LEVEL))
        assert np.array_equal(levels, frame_levels(ds[(0, (1, seed))]["video"]))
    assert len(starts) > 1 and all(0 <= s <= 30 - 10 for s in starts)


def test_ucf101_test_split_and_fold_files(tmp_path):
    root = make_ucf101(tmp_path / "ucf")
    assert len(make_dataset("ucf101", root, frames=8, resolution=16, split="test")) == 1
    with pytest.raises(UserError, match="testlist02"):
        make_dataset("ucf101", root, frames=8, resolution=16, split="test", fold=2)


def test_sky_reads_two_level_frame_folders(tmp_path):
    root = make_sky(tmp_path / "sky")
    ds = make_dataset("sky", root, frames=16, resolution=24, split="train")
    assert len(ds) == 4
    item = ds[0]
    assert item["video"].shape == (3, 16, 24, 24) and item["label"] == -1
    assert np.allclose(frame_levels(item["video"]), LEVEL * np.arange(16), atol=2.5)


def test_taichi_takes_every_fourth_frame_by_default(tmp_path):
    write_video(tmp_path / "taichi" / "train" / "a.mp4", 40)
    ds = make_dataset("taichi", tmp_path / "taichi", frames=8, resolution=16)
    assert ds.stride == 4
    assert np.allclose(frame_levels(ds[0]["video"]), LEVEL * 4 * np.arange(8), atol=2.5)


def test_folder_finds_gifs_recursively_and_skips_a_corrupt_file(tmp_path):
    root = make_gif_folder(tmp_path / "gifs")
    (root / "broken.avi").write_bytes(b"not a video" * 100)
    with pytest.warns(UserWarning, match="broken.avi"):
        ds = make_dataset("folder", root, frames=8, resolution=16)
    assert len(ds) == 3
    assert ds[2]["video"].shape == (3, 8, 16, 16)


def test_a_file_that_fails_to_decode_later_is_skipped_with_a_warning(tmp_path):
    root = tmp_path / "videos"
    write_video(root / "a.mp4", 20)
    write_video(root / "b.mp4", 20)
    ds = make_dataset("folder", root, frames=8, resolution=16)
    (root / "a.mp4").write_bytes(b"\0" * 500)   # damaged after indexing
    with pytest.warns(UserWarning, match="a.mp4"):
        item = ds[0]
    assert item["video"].shape == (3, 8, 16, 16)   # the next video stands in


@pytest.mark.parametrize("name,layout", [("ucf101", "UCF-101/<Class>"), ("sky", "sky_train/"),
                                         ("taichi", "train/ and test/"), ("folder", ".mp4/.avi")])
def test_a_missing_root_names_the_path_and_the_layout(tmp_path, name, layout):
    with pytest.raises(UserError) as err:
        make_dataset(name, tmp_path / "nowhere", frames=8, resolution=16)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and layout in msg and "\n" not in msg


def write_any(path, n, fps=25, gop=None):
    """n frames of `frames` in the format the path names: a video file, a .gif, or a folder (`png`, `jpg`)."""
    if path.suffix == ".gif":
        iio.imwrite(path, frames(n), duration=1000 / fps, loop=0)
    elif path.suffix in (".png", ".jpg"):
        path.mkdir(parents=True)
        for k, frame in enumerate(frames(n)):
            iio.imwrite(path / f"{k:05d}{path.suffix}", frame, **({"quality": 95} if path.suffix == ".jpg" else {}))
    else:
        write_video(path, n, fps=fps, gop=gop)
    return path


FORMATS = [".mp4", ".avi", ".webm", ".mkv", ".gif", ".png", ".jpg"]   # .png, .jpg: folders of frames


@pytest.mark.parametrize("ext", FORMATS)
def test_probe_reads_frame_count_and_fps_of_every_format(tmp_path, ext):
    n, fps = probe(write_any(tmp_path / f"v{ext}", 17, fps=10))
    assert n == 17
    assert fps == 10.0 if ext not in (".png", ".jpg") else np.isnan(fps)   # a frame folder has no fps


def test_probe_counts_the_frames_of_a_file_that_states_neither_count_nor_duration(tmp_path):
    path = write_video(tmp_path / "live.mkv", 13, fps=10, options={"live": "1"})   # as streamed: no duration
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0 and container.duration is None
    assert probe(path) == (13, 10.0)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """60 frames in each format, a key frame every 8 in the video files, so a clip can start past a key frame."""
    root = tmp_path_factory.mktemp("long")
    return {ext: write_any(root / f"v{ext}", 60, gop=8) for ext in FORMATS}


def full_decode(path):
    """Every frame, decoded from the start by imageio (a path independent of read_frames')."""
    if path.is_dir():
        return np.stack([iio.imread(f) for f in sorted(path.iterdir())])
    return iio.imread(path, mode="RGB") if path.suffix == ".gif" else iio.imread(path, plugin="pyav")


@pytest.mark.parametrize("ext", FORMATS)
def test_clips_equal_the_same_frames_of_a_full_decode(long_videos, ext):
    path = long_videos[ext]
    everything = full_decode(path)
    assert len(everything) == 60
    for start in (0, 1, 7, 8, 9, 23, 40, 52):
        for stride in (1, 2, 3):
            indices = list(range(start, min(60, start + 8 * stride), stride))
            assert np.array_equal(read_frames(path, indices), everything[indices]), (start, stride)


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".webm", ".mkv"])
def test_a_clip_late_in_a_video_decodes_from_the_key_frame_before_it(long_videos, monkeypatch, ext):
    decoded = []
    take = common.video._take

    def counting(numbered, indices, path):
        return take(((decoded.append(i), (i, f))[1] for i, f in numbered), indices, path)

    monkeypatch.setattr(common.video, "_take", counting)
    read_frames(long_videos[ext], range(44, 52))
    with av.open(str(long_videos[ext])) as container:   # a key frame every 8 frames, and at the encoder's scene cuts
        stream = container.streams.video[0]
        keys = [round(p.pts * stream.time_base * stream.average_rate) for p in container.demux(stream) if p.is_keyframe]
    assert decoded == list(range(max(k for k in keys if k <= 44), 52)) and decoded[0] > 0


def test_a_variable_frame_rate_video_is_decoded_from_its_first_frame(tmp_path):
    """Frame timestamps that skip (a frame dropped every third) do not count frames one by one: after a seek the
    clip's frames could not be found by timestamp, so read_frames decodes from frame 0 and counts."""
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = 64, 48, "yuv420p", 8
        stream.codec_context.time_base = Fraction(1, 25)
        for k, image in enumerate(frames(40)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = k + k // 3, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        everything = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(everything) == 40
    for start in (5, 17, 30):
        assert np.array_equal(read_frames(path, range(start, start + 8)), everything[start:start + 8]), start


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_a_container_that_overstates_its_length(tmp_path, ext):
    path = write_overstated(tmp_path / "videos" / f"cut{ext}", 30, real=20)
    assert probe(path) == (30, 25.0)                       # the container's word, read without decoding
    assert read_frames(path, range(0, 16, 2)).shape == (8, 48, 64, 3)
    for start in (0, 12):                                  # decoding from the start, and after a seek
        with pytest.raises(EOFError, match="needed 29"):
            read_frames(path, range(start, 29, 4))
    ds = make_dataset("folder", tmp_path / "videos", frames=8, resolution=16, stride=2)
    for seed in range(6):   # starts past frame 14 run out of frames: the clip falls back to the video's start
        levels = frame_levels(ds[(0, (0, seed))]["video"])
        assert np.allclose(np.diff(levels), 2 * LEVEL, atol=2.5) and levels[-1] <= 20 * LEVEL


@pytest.mark.parametrize("h,w,r", [(48, 64, 16), (30, 20, 12), (24, 24, 24)])
def test_clips_are_the_centre_crop_resized_with_antialiasing(h, w, r):
    frames = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), dtype=np.uint8)   # noise: aliasing shows
    s = min(h, w)
    crop = torch.from_numpy(frames[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]).float()
    expected = torch.nn.functional.interpolate(crop.permute(0, 3, 1, 2), size=(r, r), mode="bilinear",
                                               antialias=True, align_corners=False).permute(1, 0, 2, 3)
    clip = clip_from_frames(frames, r)
    assert clip.shape == (3, 3, r, r) and clip.dtype == torch.float32
    assert ((clip + 1) * 127.5 - expected).abs().max() <= 1.0 + 1e-4   # resized as uint8: within one grey level


def test_probe_results_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    write_video(tmp_path / "v" / "a.mp4", 12)
    calls = []
    monkeypatch.setattr(common.data, "probe", lambda p: calls.append(p) or probe(p))
    make_dataset("folder", tmp_path / "v", frames=8, resolution=16)
    make_dataset("folder", tmp_path / "v", frames=8, resolution=16)
    assert len(calls) == 1
    write_video(tmp_path / "v" / "a.mp4", 14)             # rewritten: a new size and mtime
    assert make_dataset("folder", tmp_path / "v", frames=8, resolution=16).videos[0][2] == 14
    assert len(calls) == 2


@pytest.mark.parametrize("mode,pixel,rgb", [("L", 100, (100, 100, 100)), ("LA", (100, 7), (100, 100, 100)),
                                            ("RGBA", (10, 200, 30, 7), (10, 200, 30))])
def test_grey_and_alpha_frames_come_back_as_rgb(tmp_path, mode, pixel, rgb):
    folder = tmp_path / mode
    folder.mkdir()
    for k in range(3):
        iio.imwrite(folder / f"{k}.png", np.full((8, 10, len(mode)), pixel, np.uint8).squeeze(-1 if mode == "L" else ()))
    assert np.array_equal(read_frames(folder, [0, 2]), np.full((2, 8, 10, 3), rgb, np.uint8))
    # the same pixel format in a video file (PNG frames in a .mov)
    video = tmp_path / f"{mode}.mov"
    pix_fmt = {"L": "gray", "LA": "ya8", "RGBA": "rgba"}[mode]
    with av.open(str(video), "w") as container:
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = 10, 8, pix_fmt
        for k in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((8, 10, 4), (*rgb, 7), np.uint8), format="rgba")
            container.mux(stream.encode(frame.reformat(format=pix_fmt)))
        container.mux(stream.encode())
    assert np.array_equal(read_frames(video, [0, 2]), np.full((2, 8, 10, 3), rgb, np.uint8))


def test_16_bit_grey_and_colour_png_frames_keep_their_high_byte(tmp_path):
    """A 16-bit grey PNG (Pillow's I;16) reads as value >> 8, as Pillow reads a 16-bit colour PNG: the same
    values in both come back equal. (Pillow's own conversion to RGB clipped every grey value above 255 to white.)"""
    x = np.random.default_rng(0).integers(0, 65536, (3, 8, 10), dtype=np.uint16)   # (T, H, W), H != W
    x[0, 0, :3] = (65535, 256, 255)                                                 # the ends of the range
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    grey.mkdir()
    colour.mkdir()
    for k in range(3):
        Image.fromarray(x[k]).save(grey / f"{k}.png")
        assert Image.open(grey / f"{k}.png").mode == "I;16"
        with av.open(str(colour / f"{k}.png"), "w") as f:           # the same values as 16-bit RGB (48-bit PNG)
            stream = f.add_stream("png", rate=1)
            stream.width, stream.height, stream.pix_fmt = 10, 8, "rgb48be"
            rgb = av.VideoFrame.from_ndarray(np.repeat(x[k][..., None], 3, -1), format="rgb48le")
            f.mux(stream.encode(rgb.reformat(format="rgb48be")))
            f.mux(stream.encode())
    expected = np.repeat((x >> 8).astype(np.uint8)[..., None], 3, -1)
    assert expected[0, 0, :3, 0].tolist() == [255, 1, 0]
    assert np.array_equal(read_frames(grey, [0, 1, 2]), expected)
    assert np.array_equal(read_frames(colour, [0, 1, 2]), expected)
    clip = make_dataset("folder", tmp_path, frames=3, resolution=8)[0]["video"]    # a centre 8x8 crop of each
    assert torch.equal(clip[0], torch.from_numpy(expected[:, :, 1:9, 0]).float() / 127.5 - 1)


@pytest.mark.parametrize("layout", ["folder", "sky"])
def test_an_unreadable_sub_folder_is_named_in_one_warning_and_the_rest_load(tmp_path, monkeypatch, layout):
    """A folder the walk cannot list (no permission) is one warning naming it; the videos beside it load. As root,
    whom permissions do not stop, listing that folder raises the PermissionError the kernel would give anyone else."""
    if layout == "folder":
        root, locked = tmp_path / "data", tmp_path / "data" / "locked"       # 3 videos in open/, 3 in locked/
        for k in range(6):
            folder = root / ("open" if k < 3 else "locked")
            folder.mkdir(parents=True, exist_ok=True)
            iio.imwrite(folder / f"clip{k}.gif", frames(8), duration=100, loop=0)
    else:
        root = make_sky(tmp_path / "sky", n=8)
        locked = root / "sky_train" / "video1"
    if permissions_apply():
        locked.chmod(0)
        give_back = lambda: locked.chmod(0o755)     # noqa: E731
    else:
        def refused(real):
            def listing(path=".", *a):
                if os.fspath(path) == str(locked):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
                return real(path, *a)
            return listing
        monkeypatch.setattr(os, "scandir", refused(os.scandir))     # os.walk lists with it
        monkeypatch.setattr(os, "listdir", refused(os.listdir))     # Path.iterdir with this one (Python 3.11)
        give_back = lambda: None                     # noqa: E731
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if layout == "folder":    # through `train --data folder`, as a user meets it
                toy_script.cli(["train", "--data", "folder", "--data-root", str(root), "--run", str(tmp_path / "run"),
                                "--steps", "1"])
            ds = make_dataset(layout, root, frames=8, resolution=16)
    finally:
        give_back()
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert messages == [f"skipping unreadable folder {locked}: Permission denied"] * (2 if layout == "folder" else 1)
    opened = [root / "open" / f"clip{k}.gif" for k in range(3)] if layout == "folder" else \
        [root / "sky_train" / "video0" / f"video0_{c}" for c in range(2)]
    assert [path for path, *_ in ds.videos] == opened


def test_a_gif_with_transparency_comes_back_as_rgb(tmp_path):
    rgba = np.zeros((4, 8, 10, 4), np.uint8)
    rgba[..., :3], rgba[..., 3], rgba[:, :2, :2, 3] = (10, 200, 30), 255, 0   # a transparent corner
    rgba[:, 4, 4, 0] = 60 + np.arange(4) * 50                                # frames differ (GIF merges equal ones)
    iio.imwrite(tmp_path / "t.gif", rgba, duration=100, loop=0)
    clip = read_frames(tmp_path / "t.gif", [0, 1, 2, 3])
    assert clip.shape == (4, 8, 10, 3) and np.allclose(clip[:, 4, 4, 0], 60 + np.arange(4) * 50, atol=10)  # a palette


def test_frames_of_another_size_are_resized_to_the_first_frames(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, (h, w) in enumerate([(8, 10), (16, 20), (8, 10)]):
        iio.imwrite(folder / f"{k}.png", np.full((h, w, 3), 40 * (k + 1), np.uint8))
    clip = read_frames(folder, [0, 1, 2])
    assert clip.shape == (3, 8, 10, 3) and np.array_equal(clip[:, 3, 3, 0], [40, 80, 120])


def test_a_frame_folder_whose_jpgs_are_not_images_is_skipped_with_a_warning(tmp_path):
    write_any(tmp_path / "data" / "good.png", 10)
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    for k in range(10):
        (bad / f"{k:05d}.jpg").write_text("not a picture")
    with pytest.warns(UserWarning, match="skipping unreadable video .*bad"):     # found when probed, not at a clip
        ds = make_dataset("folder", tmp_path / "data", frames=8, resolution=16)
    assert [p.name for p, *_ in ds.videos] == ["good.png"] and ds.left_out == 1
    assert np.allclose(frame_levels(ds[0]["video"]), LEVEL * np.arange(8), atol=2.5)


@pytest.mark.parametrize("classind,trainlist,expected", [
    ("1 ApplyEyeMakeup\n2\n", None, r"classInd.txt line 2 reads '2': expected '<index> <ClassName>'"),
    ("1 ApplyEyeMakeup 3\n", None, r"classInd.txt line 1 reads '1 ApplyEyeMakeup 3'"),
    ("One ApplyEyeMakeup\n", None, r"classInd.txt line 1 reads 'One ApplyEyeMakeup'"),
    ("1 ApplyEyeMakeup\n", None, r"trainlist01.txt line 2 reads 'Biking/v_Biking_g02_c01.avi 2': expected "
                                  r"<Class>/v_<Class>_gXX_cYY.avi with a class that classInd.txt lists"),
    ("1 ApplyEyeMakeup\n2 Biking\n", "Biking v_Biking_g02_c01.avi 2\n", r"trainlist01.txt line 1 reads 'Biking v_"),
    ("1 Apply\xe9EyeMakeup\n".encode("latin-1"), None, r"classInd.txt is not UTF-8 text \(byte 7\)"),
])
def test_a_malformed_class_or_split_file_is_one_sentence_naming_it(tmp_path, monkeypatch, classind, trainlist,
                                                                   expected):
    root = make_ucf101(tmp_path / "ucf")
    lists = root / "ucfTrainTestlist"
    (lists / "classInd.txt").write_bytes(classind if isinstance(classind, bytes) else classind.encode())
    if trainlist:
        (lists / "trainlist01.txt").write_text(trainlist)
    monkeypatch.setattr(common.data, "probe", lambda p: pytest.fail(f"probed {p} before the lists were checked"))
    with pytest.raises(UserError, match=expected) as err:
        make_dataset("ucf101", root, frames=8, resolution=16)
    assert "\n" not in str(err.value)


def test_ucf101_lists_with_windows_line_ends_and_a_byte_order_mark_load(tmp_path):
    root = make_ucf101(tmp_path / "ucf")
    for f in (root / "ucfTrainTestlist").iterdir():
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.warns(UserWarning, match="1 of 4 videos left out"):
        ds = make_dataset("ucf101", root, frames=16, resolution=16)
    assert ds.num_classes == 2 and [label for _, label, _, _ in ds.videos] == [0, 1, 0]


@pytest.mark.parametrize("argv,expected", [
    (["--data", "kinetics", "--data-root", "{root}"], "invalid choice: 'kinetics'"),
    (["--data", "ucf101"], "--data ucf101 needs --data-root"),
    (["--data", "ucf101", "--data-root", "{root}/nowhere"], "UCF-101 not found"),
    (["--data", "ucf101", "--data-root", "{root}/no-classind"], "UCF-101 not found"),
    (["--data", "ucf101", "--data-root", "{root}/no-trainlist"], "missing split file"),
    (["--data", "folder", "--data-root", "{root}/ucf", "--resolution", "30"], "--resolution 30 is not divisible"),
])
def test_layout_and_flag_mistakes_are_reported_before_any_file_is_probed(tmp_path, monkeypatch, argv, expected):
    import pvdm
    root = tmp_path
    make_ucf101(root / "ucf")
    make_ucf101(root / "no-classind")
    (root / "no-classind" / "ucfTrainTestlist" / "classInd.txt").unlink()
    make_ucf101(root / "no-trainlist")
    (root / "no-trainlist" / "ucfTrainTestlist" / "trainlist01.txt").unlink()
    monkeypatch.setattr(common.data, "probe", lambda p: pytest.fail(f"probed {p} before the mistake was reported"))
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        pvdm.cli(["train", "--run", str(tmp_path / "run"), *[a.format(root=root) for a in argv]])


def test_a_class_conditional_preset_on_an_unlabelled_folder_trains(tmp_path, monkeypatch, capsys):
    import videofusion
    for k in range(3):
        write_video(tmp_path / "balls" / f"{k}.mp4", 12)
    probed = []
    monkeypatch.setattr(common.data, "probe", lambda p: probed.append(p) or probe(p))
    run = tmp_path / "run"
    videofusion.cli(["train", "--data", "folder", "--data-root", str(tmp_path / "balls"), "--run", str(run),
                     "--stage", "base-pretrain", "--base-steps", "2", "--frames", "4", "--resolution", "16",
                     "--batch-size", "2"])   # the stage without a final sampling pass: seconds, not minutes
    assert "has no class labels: training without class conditioning" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["class_cond"] is False
    assert len(probed) == 3                                 # each file once: later datasets hit the cache
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and 0 <= log[-1]["data_wait"] <= 1


class SlowSynthetic(SyntheticVideos):
    """Synthetic clips that take half a second each to arrive, as from a slow disk."""

    def __getitem__(self, key):
        import time
        time.sleep(0.5)
        return super().__getitem__(key)


def test_training_logs_the_share_of_each_step_spent_waiting_for_data(tmp_path, monkeypatch):
    toy_script.cli(["train", "--run", str(tmp_path / "fast"), "--steps", "3"])
    monkeypatch.setattr(toy_script, "make_dataset", lambda *a, **k: SlowSynthetic(4, 8, seed=0))
    toy_script.cli(["train", "--run", str(tmp_path / "slow"), "--steps", "3"])
    fast, slow = ([json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
                  for name in ("fast", "slow"))
    assert [set(r) for r in fast] == [{"stage", "step", "loss", "lr", "data_wait", "seconds"}] * 3
    assert all(0 <= r["data_wait"] <= 1 for r in fast + slow)
    # a step of the toy model takes milliseconds; two clips of half a second each leave it waiting most of the time
    assert min(r["data_wait"] for r in slow) > 0.5 > max(r["data_wait"] for r in fast)


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticVideos(16, 32, seed=3), SyntheticVideos(16, 32, seed=3)
    assert torch.equal(a[5]["video"], b[5]["video"])
    assert not torch.equal(a[5]["video"], a[6]["video"])
    assert not torch.equal(a[5]["video"], SyntheticVideos(16, 32, seed=3, split="test")[5]["video"])
    batch = fixed_batch(a, 64)
    assert batch["video"].shape == (64, 3, 16, 32, 32)
    assert set(batch["label"].tolist()) == {0, 1, 2, 3}
    assert set(batch["fps"].tolist()) <= set(SyntheticVideos.fps_choices)
    # the objects move: consecutive frames differ
    assert (batch["video"][:, :, 1:] - batch["video"][:, :, :-1]).abs().amax(dim=(1, 2, 3, 4)).min() > 0.1


def test_stream_sampler_resumes_and_splits_across_ranks():
    full = StreamSampler(10, 4, seed=1)
    stream = [k for k, _ in zip(full, range(40))]
    resumed = [k for k, _ in zip(StreamSampler(10, 4, seed=1, start=12), range(28))]
    assert resumed == stream[12:]
    # two ranks with batch 2 each read, step by step, the same samples as one rank with batch 4
    r0, r1 = iter(StreamSampler(10, 2, seed=1, rank=0, world=2)), iter(StreamSampler(10, 2, seed=1, rank=1, world=2))
    two = [k for _ in range(10) for k in [next(r0), next(r0), next(r1), next(r1)]]
    assert two == stream
    # every epoch visits every index once
    assert sorted(i for i, _ in stream[:10]) == list(range(10))


def test_loader_with_workers_yields_batches(tmp_path):
    root = make_ucf101(tmp_path / "ucf")
    ds = make_dataset("ucf101", root, frames=8, resolution=16, split="train")
    batch = next(make_loader(ds, 2, workers=2))
    assert batch["video"].shape == (2, 3, 8, 16, 16) and batch["label"].shape == (2,)


def test_the_data_speed_benchmark_prints_one_line_per_format(tmp_path, capsys):
    from eval import data_speed
    data_speed.run(["--out", str(tmp_path), "--videos", "2", "--frames", "6", "--resolution", "16", "--clip", "4"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["format"] for r in lines] == ["mp4", "avi", "webm", "gif", "png frames"]
    for r in lines:
        assert r["decode_ratio"] > 0 and r["probe_ratio"] > 0 and set(r["clips_per_s"]) == {"0", "1", "2"}
    assert len(list((tmp_path / "avi" / "UCF-101" / "Balls").glob("v_Balls_g01_c0*.avi"))) == 2


def test_write_samples_produces_contract_files(tmp_path):
    import imageio.v3 as iio
    videos = to_uint8(torch.rand(3, 3, 5, 18, 14) * 2 - 1)
    assert videos.shape == (3, 5, 18, 14, 3) and videos.dtype == np.uint8
    write_samples(tmp_path, videos, labels=[0, 1, 2])
    npz = np.load(tmp_path / "samples.npz")
    assert np.array_equal(npz["videos"], videos) and npz["labels"].tolist() == [0, 1, 2]
    assert iio.improps(tmp_path / "video_0002.mp4", plugin="pyav").shape[0] == 5
    assert iio.imread(tmp_path / "grid.gif").shape[0] == 5
    assert make_grid(np.zeros((20, 2, 4, 4, 3), np.uint8)).shape[1:3] == (2 + 4 * 6, 2 + 4 * 6)  # 16 kept, 4x4
