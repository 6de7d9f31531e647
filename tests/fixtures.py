"""Small real datasets, written by the tests into a temporary folder in each real layout.

Frame k of every video is a flat grey of level LEVEL*k (plus a coloured marker), so a loaded clip tells which
frames it came from even after lossy compression.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from common import train, video

LEVEL = 6
ROOT = Path(__file__).resolve().parent.parent


def run_script(*args, env=None, preexec_fn=None):
    """`python *args` from the repository root; the finished process, its output captured as text. preexec_fn
    runs in the child before Python starts (to set a resource limit)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def permissions_apply() -> bool:
    """Whether this process is refused a folder without write permission: root (with CAP_DAC_OVERRIDE) is not, so
    the tests that take a permission away skip under it."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
        return False
    except PermissionError:
        return True
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def read_only(*folders):
    """Every folder and file under `folders` without write permission, as on a read-only disk; returns the function
    that gives it back (call it in a `finally`, or pytest cannot delete them)."""
    paths = [p for f in folders for p in [Path(f), *Path(f).rglob("*")]]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return lambda: [p.chmod(0o755 if p.is_dir() else 0o644) for p in paths]


def torchrun(script, *args):
    """`torchrun --nproc_per_node=2 -- script *args` on CPU, one thread per process."""
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--", str(script), *args,
                      env={"OMP_NUM_THREADS": "1"})


RANK_PROBE = """
import sys
from pathlib import Path
sys.path.insert(0, str(Path.cwd()))
import {script}
stage_fn = {script}.train_stage
def probe(run, stage, model, *args, **kwargs):
    out = stage_fn(run, stage, model, *args, **kwargs)
    flat = [p.detach().double().flatten() for p in model.parameters()]
    Path(sys.argv[1], f"{{stage}}.{{run.dist.rank}}").write_text(repr([float(v.sum()) for v in flat]))
    return out
{script}.train_stage = probe
{script}.cli(sys.argv[2:])
"""


def torchrun_probed(tmp_path, script, *args):
    """`torchrun` `script`.py's cli with args on two CPU ranks, each rank writing its parameters' sums after every
    stage to tmp_path/<stage>.<rank>, so a test can check that DDP kept the ranks in step."""
    probe = Path(tmp_path) / f"probe_{script}.py"
    probe.write_text(RANK_PROBE.format(script=script))
    return torchrun(probe, str(tmp_path), *args)


def assert_ranks_in_step(out, tmp_path, stages):
    """After torchrun_probed: the run finished and both ranks ended every stage with the same weights."""
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in stages:
        assert (Path(tmp_path) / f"{stage}.0").read_text() == (Path(tmp_path) / f"{stage}.1").read_text(), stage


def resumed_runs_equal_one_train(cli, stages, args, tmp_path, kill_in):
    """Train once with `train`; once a stage per command; and once killed while saving `kill_in`'s first
    checkpoint (the stages before it finished), then with `train` again. The three runs must log the same losses,
    each (stage, step) once, and end every stage with identical weights: a stage continues the RNG stream of the
    one before it, whichever command ran that one."""
    cli(["train", "--run", str(tmp_path / "one"), *args])
    for stage in stages:
        cli(["train", "--run", str(tmp_path / "staged"), "--stage", stage, *args])
    save = train.save_checkpoint

    def killed_in(path, state):
        if Path(path).stem == kill_in:
            raise KeyboardInterrupt
        save(path, state)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "save_checkpoint", killed_in)
        with pytest.raises(KeyboardInterrupt):
            cli(["train", "--run", str(tmp_path / "killed"), *args])
    assert not (tmp_path / "killed" / f"{kill_in}.pt").exists() and (tmp_path / "killed" / f"{stages[0]}.pt").exists()
    cli(["train", "--run", str(tmp_path / "killed"), *args])

    def logged(run):        # what a step computed, without its timings
        lines = map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())
        return [{k: v for k, v in line.items() if k not in ("seconds", "data_wait")} for line in lines]

    one = logged("one")
    assert len({(line["stage"], line["step"]) for line in one}) == len(one) and {line["stage"] for line in one} == \
        set(stages)
    assert logged("staged") == one and logged("killed") == one
    for stage in stages:
        weights = [torch.load(tmp_path / run / f"{stage}.pt", weights_only=True) for run in ("one", "staged", "killed")]
        for entry in ("model", "ema"):
            if entry in weights[0]:
                flat = [w[entry] if entry == "model" else w[entry]["model"] for w in weights]
                assert all(torch.equal(flat[0][k], other[k]) for other in flat[1:] for k in flat[0]), (stage, entry)


def randomize(module, seed=0):
    """Non-zero weights everywhere (the zero-initialised layers would hide what a test looks for)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def frames(n, h=48, w=64):
    """(n, h, w, 3) uint8: frame k is grey LEVEL*k with a red square in the centre (marks the crop centre)."""
    v = np.repeat(np.repeat(np.repeat((np.arange(n) * LEVEL).astype(np.uint8)[:, None, None, None], h, 1), w, 2), 3, 3)
    v[:, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4] = (255, 0, 0)
    return v


def write_video(path, n, fps=25, h=48, w=64, gop=None, options=None):
    """n frames of `frames` as .avi (mpeg4, as UCF-101), .mp4 (H.264), .webm (VP9) or .mkv (VP8); a key frame every
    `gop` frames (the encoder's default: one for the whole of these short files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import av       # here, not at the top: the GPU tests import this module on machines without PyAV
    codec = {".avi": "mpeg4", ".mp4": "libx264", ".webm": "libvpx-vp9", ".mkv": "libvpx"}[path.suffix]
    with av.open(str(path), "w", options=options or {}) as container:   # PyAV: a bitrate that keeps grey levels
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = w, h, "yuv420p", 20_000_000
        if gop:
            stream.gop_size = gop
        for frame in frames(n, h, w):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_overstated(path, n, real):
    """A video whose container states n frames but holds only the first `real`: written whole (mp4 with its
    index first), then cut where frame `real`'s packet starts, as an interrupted download leaves it."""
    import av
    path = write_video(path, n, options={"movflags": "faststart"} if Path(path).suffix == ".mp4" else None)
    with av.open(str(path)) as container:
        starts = [packet.pos for packet in container.demux(video=0) if packet.size]
    path.write_bytes(path.read_bytes()[:starts[real]])
    return path


def make_ucf101(root, n_frames=(30, 30, 20, 8), fps=(25, 10, 25, 25)):
    """root/UCF-101/<Class>/v_<Class>_gXX_cYY.avi plus ucfTrainTestlist/ with fold-1 lists.
    Classes: 1 ApplyEyeMakeup, 2 Biking; the last video (8 frames) is too short for 16-frame clips."""
    root = Path(root)
    classes = ["ApplyEyeMakeup", "Biking"]
    rels = []
    for k, (n, f) in enumerate(zip(n_frames, fps)):
        c = classes[k % 2]
        rel = f"{c}/v_{c}_g{k + 1:02d}_c01.avi"
        write_video(root / "UCF-101" / rel, n, fps=f)
        rels.append((rel, k % 2))
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (lists / "trainlist01.txt").write_text("".join(f"{r} {c + 1}\n" for r, c in rels[:3]) + rels[3][0] + " 1\n")
    (lists / "testlist01.txt").write_text(f"{rels[0][0]}\n")
    return root


def make_sky(root, videos=2, clips=2, n=20):
    """root/sky_{train,test}/<video>/<clip>/<frame>.jpg"""
    root = Path(root)
    for split in ("train", "test"):
        for v in range(videos):
            for c in range(clips):
                d = root / f"sky_{split}" / f"video{v}" / f"video{v}_{c}"
                d.mkdir(parents=True)
                for k, frame in enumerate(frames(n)):
                    iio.imwrite(d / f"video{v}_{c}_frames_{k:08d}.jpg", frame, quality=95)
    return root


def make_gif_folder(root, count=3, n=12):
    root = Path(root)
    (root / "sub").mkdir(parents=True)
    for k in range(count):
        iio.imwrite(root / ("sub" if k else "") / f"clip{k}.gif", frames(n), duration=100, loop=0)
    return root


def sampling_an_older_checkpoint_uses_its_weights(module, trained, tmp_path, stage, train_flags, flags=(),
                                                  generate="generate"):
    """`sample --ckpt` and `eval --ckpt` of a checkpoint kept aside (a copy of `trained`'s `stage` file, in a copy
    of the run whose `stage` then trained one more step at a high rate) make the same videos as that checkpoint
    sampled from its own run, `trained`, and not those of the run's newer file. Eval's `evaluate_run` is replaced by
    one that samples 2 videos with the `fake` it is given: what is under test is which weights it samples with.
    `flags` go to sample and eval; the samples `train` writes at its end take one step of module.`generate`, and no
    mp4 is encoded (libx264 took most of this test's time, and samples.npz holds the same videos)."""
    newer, old = tmp_path / "newer", tmp_path / "newer" / f"{stage}-kept.pt"
    shutil.copytree(trained, newer, ignore=shutil.ignore_patterns("samples", "eval.json"))
    shutil.copy(newer / f"{stage}.pt", old)
    step = torch.load(old, weights_only=True)["step"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(video, "write_mp4", lambda *a, **kw: None)
        full = getattr(module, generate)
        mp.setattr(module, generate, lambda *a, **kw: full(*a, **{**kw, **{k: 1 for k in ("steps", "cond_steps")
                                                                            if k in kw}}))
        module.cli(["train", "--run", str(newer), "--stage", stage, *train_flags, "--steps", str(step + 1), "--lr",
                    "0.05"])
    assert torch.load(newer / f"{stage}.pt", weights_only=True)["step"] == step + 1

    def sample(*source):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(video, "write_mp4", lambda *a, **kw: None)
            module.cli(["sample", *source, "--n", "2", "--steps", "2", "--out", str(out), *flags])
        return np.load(out / "samples.npz")["videos"]

    kept = sample("--ckpt", str(old))
    assert np.array_equal(kept, sample("--run", str(trained)))
    assert not np.array_equal(kept, sample("--run", str(newer)))     # the newer weights do sample other videos

    def evaluate(*source):
        made = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, "evaluate_run", lambda script, cfg, run_dir, fake, **kw: made.append(
                fake(2, kw["frames"], 0)))
            module.cli(["eval", *source, "--n", "2", "--steps", "2", *flags])
        return made[0]

    assert np.array_equal(evaluate("--ckpt", str(old)), evaluate("--run", str(trained)))
