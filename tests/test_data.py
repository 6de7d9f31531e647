"""Datasets through the real decoders, on small files the tests write in each real layout."""

import numpy as np
import pytest
import torch

from common.data import StreamSampler, SyntheticVideos, fixed_batch, make_dataset, make_loader
from common.errors import UserError
from common.video import make_grid, probe, to_uint8, write_samples
from tests.fixtures import LEVEL, make_gif_folder, make_sky, make_ucf101, write_video


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


def test_probe_reads_frame_count_and_fps(tmp_path):
    assert probe(write_video(tmp_path / "v.avi", 17, fps=12)) == (17, 12.0)


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
