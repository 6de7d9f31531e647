"""eval.motion: each criterion measures what it names, exactly on a hand-made video, and on sets of simple videos
a clean set scores 1.0 while each defect fails exactly the criterion it breaks."""
import json

import numpy as np
import pytest

from common.errors import UserError
from eval import motion
from tests.fixtures import run_script


def block_video(steps, H=10, W=12, colour=(255, 0, 0), background=(0, 0, 0)):
    """A 2x3 block (rows x columns) moving right by `steps` pixels per frame on a plain background, H != W."""
    x, frames = 0, []
    for dx in [0, *steps]:
        x += dx
        f = np.empty((H, W, 3), np.uint8)
        f[:] = background
        f[4:6, x:x + 3] = colour
        frames.append(f)
    return np.stack(frames)


def test_measures_of_a_hand_made_video_are_exact():
    video = block_video([1, 1, 1, 1, 3], background=(5, 6, 7))
    facts = motion.analyse(video)
    assert facts["background"].tolist() == [5, 6, 7]
    assert [f["area"] for f in facts["frames"]] == [6] * 6
    assert [f["centroid"].tolist() for f in facts["frames"]] == [[1 + x, 4.5] for x in (0, 1, 2, 3, 4, 7)]
    m = motion.measures(facts, min_area=3, background_ref=np.array([0, 0, 0]))
    assert m["counts"] == [1] * 6 and m["area"] == 6 and m["area_ratio"] == 1
    assert m["speed"] == 1.0                               # the median of 1, 1, 1, 1, 3 pixels per frame
    assert m["jolts"] == 1                                 # second differences 0, 0, 0, 2: one above 1 pixel
    assert m["chroma"] == 255 and m["colour_drift"] == 0   # (255, 0, 0): max - min channel, steady
    assert m["background_error"] == 7 and m["background_noise"] == 0


def test_speckle_below_the_object_size_is_background_noise_not_an_object():
    video = block_video([1, 1, 1])
    video[:, 0, 11] = 200                                   # a one-pixel speckle in every frame, far from the block
    m = motion.measures(motion.analyse(video), min_area=3)
    assert m["counts"] == [1] * 4
    # 4 speckles 200 levels off, over 4 frames of 10 x 12 pixels less the block dilated to 4 x 5 (4 x 4 in
    # frame 0, where the block touches the left border)
    assert m["background_noise"] == pytest.approx(4 * 200 / (4 * 120 - 16 - 3 * 20))


@pytest.fixture(scope="module")
def real():
    return motion.ball_videos(24, 16, 64, seed=0)


def clean():
    return motion.ball_videos(24, 16, 64, seed=1)


def tinted(v):
    return np.where(v.max(-1, keepdims=True) == 0, np.array([0, 24, 0], np.uint8), v)


def noisy(v):
    return np.clip(v + np.random.default_rng(0).normal(0, 6, v.shape), 0, 255).astype(np.uint8)


def grey(v):
    return np.repeat(v.mean(-1, keepdims=True).round().astype(np.uint8), 3, -1)


def frozen(v):
    return np.repeat(v[:, :1], v.shape[1], axis=1)


def shrinking(v):
    """From frame 8 on, only the ball's core within 0.65 of its radius is left: 0.42 of its area, same centre."""
    out = v.copy()
    for k in range(len(v)):
        for t in range(8, v.shape[1]):
            ys, xs = np.nonzero(v[k, t].max(-1) > 0)
            radius = np.sqrt(len(ys) / np.pi)
            far = np.hypot(ys - ys.mean(), xs - xs.mean()) > 0.65 * radius
            out[k, t, ys[far], xs[far]] = 0
    return out


@pytest.mark.parametrize("defect,make,broken", [
    ("tinted background", lambda: tinted(clean()), "background_level"),
    ("pixel noise", lambda: noisy(clean()), "background_noise"),
    ("colour lost", lambda: grey(clean()), "object_colour"),
    ("no motion", lambda: frozen(clean()), "speed"),
    ("jittered positions", lambda: motion.ball_videos(24, 16, 64, seed=1, jitter=2.0), "smooth_motion"),
    ("object shrinks", lambda: shrinking(clean()), "steady_size"),
])
def test_each_defect_fails_exactly_the_criterion_it_breaks(real, defect, make, broken):
    report = motion.score(real, make())
    assert report["plausible"] == 0.0
    assert report["criteria"][broken] == 0.0, defect
    assert {c: s for c, s in report["criteria"].items() if c != broken} == \
        {c: 1.0 for c in motion.CRITERIA if c != broken}, defect


def test_a_clean_set_scores_one_and_two_objects_fail_one_object(real):
    report = motion.score(real, clean())
    assert report["plausible"] == 1.0 and report["real"]["plausible"] == 1.0
    assert report["background_error"] == 0.0
    two = motion.score(real, motion.ball_videos(24, 16, 64, seed=1, balls=2))
    # two balls overlap in some frames of some videos, so a few videos may show one merged object throughout
    assert two["criteria"]["one_object"] <= 0.1 and two["plausible"] <= 0.1


def test_the_command_writes_a_folder_and_judges_samples_against_it(tmp_path):
    made = run_script("-m", "eval.motion", "--make", str(tmp_path / "balls"), "--n", "6", "--resolution", "48")
    assert made.returncode == 0, made.stderr
    assert len(list((tmp_path / "balls").glob("*.mp4"))) == 6
    fake = tmp_path / "samples.npz"
    np.savez(fake, videos=tinted(motion.ball_videos(6, 16, 48, seed=3)))
    out = run_script("-m", "eval.motion", "--real", str(tmp_path / "balls"), "--fake", str(fake),
                     "--out", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert json.loads((tmp_path / "m.json").read_text()) == report
    assert report["real"]["plausible"] == 1.0            # the mp4-compressed real set passes its own ranges
    assert report["criteria"]["background_level"] == 0.0 and report["criteria"]["speed"] == 1.0
    assert (report["frames"], report["resolution"], report["n_real"]) == (16, 48, 6)


def test_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="expected --real and --fake"):
        motion.run(["--fake", "x.npz"])
    with pytest.raises(UserError, match="no object found in the real videos"):
        motion.score(np.zeros((2, 4, 8, 8, 3), np.uint8), np.zeros((2, 4, 8, 8, 3), np.uint8))
