"""Every malformed input is one sentence: exit status 2, one `error:` line on stderr, no traceback, and no file that
existed before changed. Each case runs as a user runs it: in-process through common.cli.main, as `python X.py` does
(a subprocess costs seconds of imports on this machine), and a few through the real entry point. Malformed data
layouts (classInd and the like) are tests/test_data.py's.
"""
import errno
import os
import shutil
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch

import lvdm
import pvdm
import vdm
import videofusion
import vqvdm
from common import evaluate
from common.checkpoint import save_checkpoint
from common.cli import main
from common.errors import UserError
from common.files import lock_folder, release_locks
from eval import fvd, inception_score
from tests.fixtures import ROOT, permissions_apply, read_only, run_script

ENTRIES = {"pvdm": pvdm.cli, "videofusion": videofusion.cli, "lvdm": lvdm.cli, "vqvdm": vqvdm.cli, "vdm": vdm.cli,
           "fvd": fvd.run, "inception_score": inception_score.run}

# the smallest runs each script trains (as in its own tests), and train flags that would finish in seconds if a bad
# value were accepted
P_FLAGS = ["--frames", "4", "--resolution", "16", "--patch", "4", "--sample-every", "0", "--save-every", "0",
           "--batch-size", "2", "--ae-batch-size", "2", "--ae-steps", "1", "--gan-steps", "0", "--steps", "1"]
V_FLAGS = ["--frames", "4", "--resolution", "16", "--sample-every", "0", "--save-every", "0", "--batch-size", "2",
           "--steps", "1", "--base-steps", "0"]
L_FLAGS = ["--frames", "12", "--resolution", "16", "--key-stride", "2", "--sample-every", "0", "--save-every", "0",
           "--batch-size", "2", "--ae-batch-size", "2", "--disc-start", "1", "--ae-steps", "1", "--steps", "1",
           "--pred-steps", "1", "--interp-steps", "1"]
Q_FLAGS = ["--frames", "8", "--resolution", "16", "--sample-every", "0", "--save-every", "0", "--batch-size", "2",
           "--ae-batch-size", "2", "--disc-start", "1", "--ae-steps", "1", "--steps", "1"]
D_FLAGS = ["--frames", "8", "--resolution", "8", "--sr-resolution", "16", "--sample-every", "0", "--save-every", "0",
           "--batch-size", "2", "--sr-batch-size", "2", "--steps", "1", "--sr-steps", "1", "--sample-steps", "1"]
TRAIN = {"pvdm": P_FLAGS, "videofusion": V_FLAGS, "lvdm": L_FLAGS, "vqvdm": Q_FLAGS, "vdm": D_FLAGS}


def as_user(entry, argv, capsys):
    """(exit status, stderr) of `entry(argv)` under common.cli.main, as `python X.py` runs it; an exception main
    lets through is status 1 and its traceback, as the interpreter would print them."""
    capsys.readouterr()
    try:
        main(lambda: entry(argv))
        status, tb = 0, ""
    except SystemExit as e:
        status, tb = e.code, ""
    except Exception:
        status, tb = 1, traceback.format_exc()
    return status, capsys.readouterr().err + tb


def snapshot(folder):
    """Every file under `folder` with its size and modification time (in ns: any write changes it)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# --- one tiny trained run per script, and damaged copies of its checkpoints ---

def flip(path, at=0.5, count=64):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + count] = bytes(b ^ 0xFF for b in data[i:i + count])
    path.write_bytes(bytes(data))


def rewrite(path, change):
    """Load a checkpoint, change(ckpt) it and save it properly: damage a checksum cannot see."""
    ckpt = torch.load(path, weights_only=True)
    ckpt = {k: v for k, v in ckpt.items() if k not in ("checksums", "format_version")}
    change(ckpt)
    save_checkpoint(path, ckpt)


def first_weight(ckpt):
    return next(iter(ckpt["ema"]["model"]))


DAMAGE = {     # and "flipped": 64 bytes inside the weights sampling reads
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "future": lambda p: rewrite(p, lambda c: c["config"].update(future_setting=1)),
    "missing": lambda p: rewrite(p, lambda c: c["ema"]["model"].pop(first_weight(c))),
    "misshapen": lambda p: rewrite(p, lambda c: c["ema"]["model"].update({first_weight(c): torch.zeros(1, 2, 3)})),
    # well-formed files with the checksums right, of the wrong structure
    "strconfig": lambda p: rewrite(p, lambda c: c.update(config="frames=4")),
    "listema": lambda p: rewrite(p, lambda c: c.update(ema=list(c["ema"]["model"].values()))),
    "noconfig": lambda p: rewrite(p, lambda c: c.pop("config")),
}


def one_step(generate):
    """`generate` with one denoising step: what the fixture's runs sample at the end of `train` is not under test,
    and 100 steps of it cost a minute a script on two busy cores."""
    return lambda *a, **kw: generate(*a, **{**kw, **{k: 1 for k in ("steps", "cond_steps") if k in kw}})


class World(dict):
    """{placeholder: path} for the table's argv: malformed npz files and a regular file to put folders under, made
    at once; a script's trained run ("pvdm", "videofusion", "lvdm") and the damaged copies of its sampling checkpoint
    ("pvdm-flipped", ...) are trained the first time a case names one, so the cases that need no run need no
    training."""
    SAMPLED = {"pvdm": "diffusion", "videofusion": "diffusion", "lvdm": "short", "vqvdm": "diffusion",   # sample reads
               "vdm": "base"}

    def __init__(self, root):
        super().__init__(scratch=root / "scratch", npz=root / "npz", data=root / "data")
        self.root = root
        self["scratch"].mkdir()
        (self["scratch"] / "a-file").write_text("a file, not a folder")
        self["npz"].mkdir()
        videos = np.zeros((2, 16, 8, 8, 3), np.uint8)
        np.savez(self["npz"] / "ok.npz", videos=videos)
        (self["npz"] / "empty.npz").write_bytes(b"")
        (self["npz"] / "text.npz").write_text("videos")
        np.savez(self["npz"] / "nokey.npz", clips=videos)
        np.savez(self["npz"] / "float.npz", videos=videos.astype(np.float32))
        np.savez(self["npz"] / "gray.npz", videos=videos[..., :1])
        np.savez(self["npz"] / "rgba.npz", videos=np.concatenate([videos, videos[..., :1]], -1))
        np.savez(self["npz"] / "none.npz", videos=videos[:0])
        np.savez(self["npz"] / "frames.npz", videos=videos[0])
        # data that cannot be read, or not fast: a FIFO as the root or as a video, frames that are all corrupt
        data = self["data"] = root / "data"
        os.mkfifo(data.mkdir() or data / "fifo")
        os.mkfifo((data / "fifo-video").mkdir() or data / "fifo-video" / "a.mp4")
        for folder in (data / "corrupt" / "v1", data / "sky" / "sky_train" / "v" / "c1",
                       data / "sky" / "sky_test" / "v" / "c1"):
            folder.mkdir(parents=True)
            for i in range(16):
                (folder / f"{i:03d}.png").write_text("not a png")

    def __missing__(self, key):
        if key == "data":
            raise KeyError(key)
        script = key.split("-")[0]
        stage, run = self.SAMPLED[script], self.root / script
        self[script] = run
        with pytest.MonkeyPatch.context() as mp:
            for module, generate in ((pvdm, "generate"), (videofusion, "generate"), (lvdm, "generate_short"),
                                     (vqvdm, "generate"), (vdm, "generate")):
                mp.setattr(module, generate, one_step(getattr(module, generate)))
            # lvdm: the autoencoder and the short model, all that sampling short clips reads
            for stages in (["--stage", "ae"], ["--stage", "short"]) if script == "lvdm" else ([],):
                ENTRIES[script](["train", "--run", str(run), *stages, *TRAIN[script]])
        # lvdm and vqvdm sample from a mapped file and read only the EMA weights, saved after the model and
        # optimizer: 7/8 in
        at = 7 / 8 if script in ("lvdm", "vqvdm", "vdm") else 0.5
        for how, damage in {**DAMAGE, "flipped": lambda p: flip(p, at)}.items():
            copy = self.root / "damaged" / f"{script}-{how}"
            shutil.copytree(run, copy)               # sampling reads the autoencoder beside the checkpoint
            damage(copy / f"{stage}.pt")
            self[f"{script}-{how}"] = copy
        return self[key]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("bad-inputs"))


# --- the table: (script, argv) and a piece of the sentence expected ---

def train(script, *bad):
    return (script, ["train", "--run", "{scratch}/new-run", *TRAIN[script], *bad])


def train_again(run, *flags):
    """`train` again into a trained run (or a damaged copy): a refusal must leave its config.json as it was."""
    script = run.split("-")[0]
    return (script, ["train", "--run", f"{{{run}}}", *TRAIN[script], *flags])


CASES = [
    # pvdm.py train: ranges, then what only several values together reveal
    (train("pvdm", "--batch-size", "0"), "--batch-size must be an integer >= 1, got 0"),
    (train("pvdm", "--batch-size", "-3"), "--batch-size must be an integer >= 1"),
    (train("pvdm", "--batch-size", "many"), "--batch-size must be an integer"),
    (train("pvdm", "--ae-batch-size", "0"), "--ae-batch-size must be"),
    (train("pvdm", "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    (train("pvdm", "--lr", "inf"), "--lr must be a finite number > 0"),
    (train("pvdm", "--lr", "0"), "--lr must be a finite number > 0"),
    (train("pvdm", "--ae-lr=-1e-3"), "--ae-lr must be"),
    (train("pvdm", "--seed", "1e23"), "--seed must be an integer between 0 and"),
    (train("pvdm", "--seed", "-1"), "--seed must be an integer between 0 and"),
    (train("pvdm", "--seed", str(2 ** 63)), "--seed must be an integer between 0 and 9223372036854775807"),
    (train("pvdm", "--patch", "0"), "--patch must be an integer >= 1"),
    (train("pvdm", "--patch", "3"), "not divisible by --patch 3"),
    (train("pvdm", "--steps", "-1"), "--steps must be an integer >= 1"),
    (train("pvdm", "--ae-steps", "0"), "--ae-steps must be an integer >= 1"),
    (train("pvdm", "--gan-steps", "-1"), "--gan-steps must be an integer >= 0"),
    (train("pvdm", "--lam", "2"), "--lam must be a finite number between 0 and 1"),
    (train("pvdm", "--lam", "nan"), "--lam must be"),
    (train("pvdm", "--frames", "0"), "--frames must be"),
    (train("pvdm", "--frames", "5"), "must be divisible by 2"),
    (train("pvdm", "--resolution", "0"), "--resolution must be"),
    (train("pvdm", "--save-every", "-1"), "--save-every must be an integer >= 0"),
    (train("pvdm", "--sample-every", "-5"), "--sample-every must be"),
    (train_again("pvdm", "--frames", "8"), "was trained with frames=4 but the config asks for 8"),
    (train_again("pvdm-flipped", "--lr", "0.5"), "is damaged"),
    # pvdm.py sample and eval
    (("pvdm", ["sample", "--run", "{pvdm}", "--n", "0"]), "--n must be an integer >= 1, got 0"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--frames", "0"]), "--frames must be an integer >= 1"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--steps", "0"]), "--steps must be"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--steps", "5000"]), "between 1 and the schedule's 1000 steps"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--cond-steps", "0"]), "--cond-steps must be"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--eta", "nan"]), "--eta must be a finite number between 0 and 1"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--eta", "2"]), "--eta must be"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--guidance", "nan"]), "--guidance must be a finite number"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--guidance", "1"]), "unconditional on classes"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--seed", "1e23"]), "--seed must be"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--label", "-1"]), "--label must be"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--out", "{scratch}/a-file"]), "it is a file, not a folder"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--out", "{scratch}/a-file/out"]), "Not a directory"),
    (("pvdm", ["sample", "--ckpt", "{pvdm}/ae.pt"]), "ae.pt is a ae checkpoint, not a diffusion one"),
    (("pvdm", ["eval", "--ckpt", "{pvdm}/ae.pt"]), "ae.pt is a ae checkpoint, not a diffusion one"),
    (("pvdm", ["sample", "--ckpt", "{videofusion}/diffusion.pt"]), "written by videofusion.py, not pvdm.py"),
    (("pvdm", ["sample", "--run", "{pvdm-empty}"]), "it is empty, truncated or damaged"),
    (("pvdm", ["sample", "--run", "{pvdm-truncated}"]), "not a readable checkpoint"),
    (("pvdm", ["sample", "--run", "{pvdm-flipped}"]), "is damaged"),
    (("pvdm", ["sample", "--run", "{pvdm-future}"]), "setting future_setting=1, which this version of pvdm.py"),
    (("pvdm", ["sample", "--run", "{pvdm-missing}"]), "has no weight"),
    (("pvdm", ["sample", "--run", "{pvdm-misshapen}"]), "has shape (1, 2, 3)"),
    (("pvdm", ["eval", "--run", "{pvdm}", "--batch-size", "0"]), "--batch-size must be an integer >= 1"),
    (("pvdm", ["eval", "--run", "{pvdm}", "--n", "0"]), "--n must be"),
    (("pvdm", ["eval", "--run", "{pvdm}", "--frames", "-16"]), "--frames must be"),
    (("pvdm", ["eval", "--run", "{pvdm}", "--seed", "-1"]), "--seed must be"),
    (("pvdm", ["eval", "--run", "{pvdm-flipped}"]), "is damaged"),
    # videofusion.py
    (train("videofusion", "--batch-size", "0"), "--batch-size must be"),
    (train("videofusion", "--lr", "inf"), "--lr must be"),
    (train("videofusion", "--p-uncond", "2"), "--p-uncond must be a finite number between 0 and 1"),
    (train("videofusion", "--p-uncond", "nan"), "--p-uncond must be"),
    (train("videofusion", "--lam", "0"), "--lam must be a finite number > 0 and < 1"),
    (train("videofusion", "--lam", "1"), "--lam must be"),
    (train("videofusion", "--frames", "1"), "--frames must be an integer >= 2"),
    (train("videofusion", "--resolution", "6"), "which the U-Nets halve 2 times"),
    (train("videofusion", "--base-steps", "-1"), "--base-steps must be an integer >= 0"),
    (train("videofusion", "--steps", "-1"), "--steps must be"),
    (train("videofusion", "--seed", "1e23"), "--seed must be"),
    (train_again("videofusion", "--joint", "full"), "joint='stop-grad' but the config asks for 'full'"),
    (train_again("videofusion-flipped", "--lr", "0.5"), "is damaged"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--guidance", "nan"]), "--guidance must be a finite number"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--guidance", "-1"]), "--guidance must be"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--eta", "1.5"]), "--eta must be"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--n", "0"]), "--n must be"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--frames", "0"]), "--frames must be"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--label", "99"]), "--label must be in 0.."),
    (("videofusion", ["sample", "--run", "{videofusion}", "--out", "{scratch}/a-file"]), "it is a file, not a folder"),
    (("videofusion", ["sample", "--run", "{videofusion-empty}"]), "not a readable checkpoint"),
    (("videofusion", ["sample", "--run", "{videofusion-flipped}"]), "is damaged"),
    (("videofusion", ["sample", "--run", "{videofusion-future}"]), "setting future_setting=1"),
    (("videofusion", ["sample", "--run", "{videofusion-missing}"]), "has no weight"),
    (("videofusion", ["sample", "--run", "{videofusion-misshapen}"]), "has shape (1, 2, 3)"),
    (("videofusion", ["eval", "--run", "{videofusion}", "--batch-size", "0"]), "--batch-size must be"),
    (("videofusion", ["eval", "--run", "{videofusion}", "--n", "-1"]), "--n must be"),
    # lvdm.py
    (train("lvdm", "--batch-size", "0"), "--batch-size must be"),
    (train("lvdm", "--lr", "nan"), "--lr must be"),
    (train("lvdm", "--ae-lr", "0"), "--ae-lr must be"),
    (train("lvdm", "--p-cond-pred", "1.5"), "--p-cond-pred must be a finite number between 0 and 1"),
    (train("lvdm", "--p-cond-interp", "-0.1"), "--p-cond-interp must be"),
    (train("lvdm", "--key-stride", "1"), "--key-stride must be an integer >= 2"),
    (train("lvdm", "--cond-latents", "0"), "--cond-latents must be"),
    (train("lvdm", "--cond-noise-max", "0"), "--cond-noise-max must be"),
    (train("lvdm", "--cond-noise-max", "5000"), "--cond-noise-max must be between 1 and 1000"),
    (train("lvdm", "--resolution", "12"), "which the U-Net halves 1 times"),
    (train("lvdm", "--frames", "10"), "not a multiple of the autoencoder's temporal factor"),
    (train("lvdm", "--disc-start", "-1"), "--disc-start must be"),
    (train("lvdm", "--seed", "1e23"), "--seed must be"),
    (train_again("lvdm-flipped", "--lr", "0.5", "--stage", "short"), "is damaged"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--eta", "nan"]), "--eta must be"),
    (("lvdm", ["sample", "--ckpt", "{lvdm}/ae.pt"]), "ae.pt is a ae checkpoint, not a diffusion one: pass short.pt"),
    (("lvdm", ["eval", "--ckpt", "{lvdm}/ae.pt"]), "ae.pt is a ae checkpoint, not a diffusion one"),
    (("lvdm", ["sample", "--ckpt", "{lvdm}/short.pt", "--frames", "40"]), "short.pt holds the short model, but "
     "sampling 40 frames (hierarchical) uses pred.pt and interp.pt"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--cond-noise", "-1"]), "--cond-noise must be an integer >= 0"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--n", "0"]), "--n must be"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--steps", "0"]), "--steps must be"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--frames", "0"]), "--frames must be"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--guidance", "inf"]), "--guidance must be"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--out", "{scratch}/a-file"]), "it is a file, not a folder"),
    (("lvdm", ["sample", "--run", "{lvdm-empty}"]), "not a readable checkpoint"),
    (("lvdm", ["sample", "--run", "{lvdm-flipped}"]), "is damaged"),
    (("lvdm", ["sample", "--run", "{lvdm-future}"]), "setting future_setting=1"),
    (("lvdm", ["sample", "--run", "{lvdm-missing}"]), "has no weight"),
    (("lvdm", ["sample", "--run", "{lvdm-misshapen}"]), "has shape (1, 2, 3)"),
    (("lvdm", ["eval", "--run", "{lvdm}", "--guidance", "nan"]), "--guidance must be"),
    (("lvdm", ["eval", "--run", "{lvdm}", "--batch-size", "0"]), "--batch-size must be"),
    # vqvdm.py
    (train("vqvdm", "--batch-size", "0"), "--batch-size must be"),
    (train("vqvdm", "--lr", "inf"), "--lr must be"),
    (train("vqvdm", "--ae-lr", "-1"), "--ae-lr must be"),
    (train("vqvdm", "--rho", "1.5"), "--rho must be a finite number between 0 and 1"),
    (train("vqvdm", "--restart-after", "-1"), "--restart-after must be an integer >= 0"),
    (train("vqvdm", "--disc-start", "-1"), "--disc-start must be"),
    (train("vqvdm", "--latent", "z"), "invalid choice: 'z'"),
    (train("vqvdm", "--frames", "10"), "not a multiple of the VQGAN's temporal factor"),
    (train("vqvdm", "--frames", "4"), "too short for the discriminator"),
    (train("vqvdm", "--resolution", "12"), "must be divisible by 8"),
    (train("vqvdm", "--seed", "-3"), "--seed must be"),
    (train_again("vqvdm-flipped", "--lr", "0.5"), "is damaged"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--n", "0"]), "--n must be"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--steps", "1001"]), "--steps must be between 1 and the schedule's 1000"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--frames", "6"]), "--frames must be a positive multiple"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--label", "4"]), "--label must be in 0..3"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--fps", "nan"]), "--fps must be a finite number > 0"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--guidance", "-1"]), "--guidance must be"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--eta", "2"]), "--eta must be"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--out", "{scratch}/a-file"]), "it is a file, not a folder"),
    (("vqvdm", ["sample", "--ckpt", "{vqvdm}/ae.pt"]), "ae.pt is a ae checkpoint, not a diffusion one"),
    (("vqvdm", ["eval", "--ckpt", "{vqvdm}/ae.pt"]), "ae.pt is a ae checkpoint, not a diffusion one"),
    (("vqvdm", ["sample", "--run", "{vqvdm-empty}"]), "not a readable checkpoint"),
    (("vqvdm", ["sample", "--run", "{vqvdm-truncated}"]), "not a readable checkpoint"),
    (("vqvdm", ["sample", "--run", "{vqvdm-flipped}"]), "is damaged"),
    (("vqvdm", ["sample", "--run", "{vqvdm-future}"]), "setting future_setting=1"),
    (("vqvdm", ["sample", "--run", "{vqvdm-missing}"]), "has no weight"),
    (("vqvdm", ["sample", "--run", "{vqvdm-misshapen}"]), "has shape (1, 2, 3)"),
    (("vqvdm", ["sample", "--ckpt", "{pvdm}/diffusion.pt"]), "written by pvdm.py, not vqvdm.py"),
    (("vqvdm", ["eval", "--run", "{vqvdm}", "--guidance", "nan"]), "--guidance must be"),
    (("vqvdm", ["eval", "--run", "{vqvdm}", "--frames", "6"]), "--frames must be a positive multiple"),
    (("vqvdm", ["eval", "--run", "{vqvdm}", "--batch-size", "0"]), "--batch-size must be"),
    # vdm.py
    (train("vdm", "--batch-size", "0"), "--batch-size must be"),
    (train("vdm", "--sr-batch-size", "0"), "--sr-batch-size must be"),
    (train("vdm", "--lr", "nan"), "--lr must be"),
    (train("vdm", "--sr-steps", "0"), "--sr-steps must be an integer >= 1"),
    (train("vdm", "--sr-aug-max", "0"), "--sr-aug-max must be an integer >= 1"),
    (train("vdm", "--sr-resolution", "-1"), "--sr-resolution must be an integer >= 0"),
    (train("vdm", "--resolution", "9"), "--resolution 9 must be divisible by 2"),
    (train("vdm", "--sr-resolution", "8"), "--sr-resolution 8 must be above --resolution 8"),
    (train("vdm", "--sr-resolution", "0", "--stage", "sr"), "--stage sr needs a super-resolution stage"),
    (train("vdm", "--stage", "ae"), "invalid choice: 'ae'"),
    (train("vdm", "--sr-aug-max", "1001"), "--sr-aug-max must be at most the schedule's 1000 steps"),
    (train("vdm", "--sample-steps", "1001"), "--sample-steps must be at most the schedule's 1000 steps"),
    (train("vdm", "--seed", "-1"), "--seed must be"),
    (train_again("vdm", "--sr-aug-max", "100"), "was trained with sr_aug_max=250 but the config asks for 100"),
    (train_again("vdm-flipped", "--lr", "0.5"), "is damaged"),
    (("vdm", ["sample", "--run", "{vdm}", "--n", "0"]), "--n must be"),
    (("vdm", ["sample", "--run", "{vdm}", "--steps", "1001"]), "--steps must be between 1 and the schedule's 1000"),
    (("vdm", ["sample", "--run", "{vdm}", "--label", "1"]), "unconditional: --label and --guidance do not apply"),
    (("vdm", ["sample", "--run", "{vdm}", "--guidance", "2"]), "unconditional: --label and --guidance do not apply"),
    (("vdm", ["sample", "--run", "{vdm}", "--sr-noise", "250"]), "--sr-noise must be below the run's --sr-aug-max 250"),
    (("vdm", ["sample", "--run", "{vdm}", "--sr-noise", "-1"]), "--sr-noise must be an integer >= 0"),
    (("vdm", ["sample", "--run", "{vdm}", "--eta", "2"]), "--eta must be"),
    (("vdm", ["sample", "--run", "{vdm}", "--out", "{scratch}/a-file"]), "it is a file, not a folder"),
    (("vdm", ["sample", "--ckpt", "{vdm}/sr.pt"]), "is a sr checkpoint: pass the base model's, base.pt"),
    (("vdm", ["eval", "--ckpt", "{vdm}/sr.pt"]), "is a sr checkpoint: pass the base model's, base.pt"),
    (("vdm", ["sample", "--run", "{vdm-empty}"]), "not a readable checkpoint"),
    (("vdm", ["sample", "--run", "{vdm-truncated}"]), "not a readable checkpoint"),
    (("vdm", ["sample", "--run", "{vdm-flipped}"]), "is damaged"),
    (("vdm", ["sample", "--run", "{vdm-future}"]), "setting future_setting=1"),
    (("vdm", ["sample", "--run", "{vdm-missing}"]), "has no weight"),
    (("vdm", ["sample", "--run", "{vdm-misshapen}"]), "has shape (1, 2, 3)"),
    (("vdm", ["sample", "--ckpt", "{pvdm}/diffusion.pt"]), "written by pvdm.py, not vdm.py"),
    (("vdm", ["eval", "--run", "{vdm}", "--steps", "0"]), "--steps must be"),
    (("vdm", ["eval", "--run", "{vdm}", "--batch-size", "0"]), "--batch-size must be"),
    # python -m eval.fvd
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--n", "1"]), "--n must be an integer >= 2"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--frames", "4"]), "--frames must be an integer >= "
                                                                                        "9"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--batch-size", "0"]), "--batch-size must be"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--seed", "-1"]), "--seed must be"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--resolution", "0"]), "--resolution must be"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/empty.npz"]), "empty.npz is not a readable npz archive (an "
                                                                         "empty file)"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/text.npz"]), "text.npz is not a readable npz archive"),
    (("fvd", ["--real", "{npz}/nokey.npz", "--fake", "{npz}/ok.npz"]), "has no `videos` array (it holds clips)"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/float.npz"]), "should be uint8 (N, T, H, W, 3) RGB videos, "
                                                                         "found float32"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/gray.npz"]), "found uint8 (2, 16, 8, 8, 1)"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/rgba.npz"]), "found uint8 (2, 16, 8, 8, 4)"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/none.npz"]), "holds no videos"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/frames.npz"]), "found uint8 (16, 8, 8, 3)"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/missing.npz"]), "missing.npz does not exist"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "nonsense"]), "is neither a .npz file"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--out", "{scratch}/a-file/fvd.json"]),
     "a-file is a file, not a folder"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--out", "{scratch}"]), "it is a folder, not a file"),
    # python -m eval.inception_score (the npz is checked before the C3D weights are looked for)
    (("inception_score", ["--fake", "{npz}/ok.npz", "--c3d", "c3d.npz", "--splits", "0"]), "--splits must be"),
    (("inception_score", ["--fake", "{npz}/ok.npz", "--c3d", "c3d.npz", "--n", "0"]), "--n must be"),
    (("inception_score", ["--fake", "{npz}/ok.npz", "--c3d", "c3d.npz", "--batch-size", "0"]), "--batch-size must"),
    (("inception_score", ["--c3d", "c3d.npz", "--fake", "{npz}/rgba.npz"]), "found uint8 (2, 16, 8, 8, 4)"),
    (("inception_score", ["--c3d", "c3d.npz", "--fake", "{npz}/empty.npz"]), "not a readable npz archive"),
    (("inception_score", ["--c3d", "c3d.npz", "--fake", "{npz}/nokey.npz"]), "has no `videos` array"),
    (("inception_score", ["--fake", "{npz}/ok.npz", "--c3d", "c3d.npz", "--out", "{scratch}/a-file/is.json"]),
     "a-file is a file, not a folder"),
    (("inception_score", ["--fake", "{npz}/ok.npz", "--c3d", "{npz}/text.npz"]), "cannot read"),
]

# data that would hang or end in a traceback: found when the folder is scanned
CASES += [
    (train("pvdm", "--data", "folder", "--data-root", "{data}/fifo"), "is a FIFO, not a folder"),
    (train("vqvdm", "--data", "folder", "--data-root", "{data}/fifo-video"), "none of the 1 videos found in folder can "
                                                                             "be read"),
    (train("pvdm", "--data", "folder", "--data-root", "{data}/corrupt"), "none of the 1 videos found in folder"),
    (train("lvdm", "--data", "sky", "--data-root", "{data}/sky"), "none of the 1 videos found in sky can be read"),
    (("lvdm", ["eval", "--run", "{lvdm}", "--data", "folder", "--data-root", "{scratch}/none"]), "none does not exist"),
    (("fvd", ["--real", "folder:{scratch}/none", "--fake", "{npz}/ok.npz"]), "none does not exist"),
    (("fvd", ["--real", "ucf101:{scratch}/a-file", "--fake", "{npz}/ok.npz"]), "a-file is not a folder"),
    (("fvd", ["--real", "{npz}/ok.npz", "--fake", "{npz}/ok.npz", "--split", "val"]), "invalid choice: 'val'"),
]
# sizes no memory holds: the estimate in one sentence, before anything is allocated
HUGE = "100000000"
CASES += [(train(script, *(["--sr-resolution", "0"] if script == "vdm" else []), *huge), "would need at least")
          for script in TRAIN for huge in (["--frames", HUGE], ["--resolution", "100000"], ["--batch-size", HUGE])]
CASES += [
    (train("lvdm", "--key-stride", HUGE), "a pred step on 2 clips of 1200000000x16x16 would need at least"),
    (("lvdm", ["sample", "--run", "{lvdm}", "--frames", "1000000000", "--mode", "hierarchical"]), "8 videos of "
     "1000000000 frames at 16x16 would need at least"),
    (("lvdm", ["eval", "--run", "{lvdm}", "--frames", "1000000000"]), "would need at least"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--frames", "1000000000"]), "would need at least"),
    (("pvdm", ["sample", "--run", "{pvdm}", "--frames", "1000000000"]), "would need at least"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--n", "1000000000"]), "would need at least"),  # frames: its N
    (("vdm", ["sample", "--run", "{vdm}", "--frames", "1000000000"]), "would need at least"),
]
# checkpoints whose checksums hold but whose structure is not vidiff's
CASES += [((script, ["sample", "--run", f"{{{script}-{how}}}"]), f"its {entry!r} entry should be")
          for script in TRAIN for how, entry in (("strconfig", "config"), ("listema", "ema"))]
CASES += [((script, ["sample", "--run", f"{{{script}-noconfig}}"]), "is not a vidiff checkpoint: it has no 'config' "
                                                                    "entry") for script in ("pvdm", "lvdm")]
# ranges a user can defend, and eval flags this run would not use
CASES += [
    (("lvdm", ["sample", "--run", "{lvdm}", "--guidance", "1e30"]), "--guidance must be a finite number between 0 and "
                                                                    "100"),
    (("lvdm", ["eval", "--run", "{lvdm}", "--guidance", "101"]), "--guidance must be"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--guidance", "1e30"]), "--guidance must be"),
    (("vqvdm", ["eval", "--run", "{vqvdm}", "--guidance", "1e30"]), "--guidance must be"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--fps", "1e30"]), "--fps must be a finite number > 0 and <= 240"),
    (("vqvdm", ["sample", "--run", "{vqvdm}", "--fps", "0"]), "--fps must be a finite number > 0 and <= 240, got 0"),
    (("videofusion", ["sample", "--run", "{videofusion}", "--guidance", "1e30"]), "--guidance must be"),
    (("videofusion", ["eval", "--run", "{videofusion}", "--i3d", "{scratch}/i3d.pt"]), "--i3d would go unused: this "
     "run makes 4-frame clips"),
    (("videofusion", ["eval", "--run", "{videofusion}", "--c3d", "c3d.npz", "--i3d", "i3d.pt"]), "--i3d and --c3d "
     "would go unused"),
]


def expand(argv, world):
    return [a.format_map(world) for a in argv]


def case_id(script, argv):
    """`pvdm train --lr nan`, `fvd --fake {npz}/gray.npz`: the command and the input that is wrong."""
    command = argv[0] if argv[0] in ("train", "sample", "eval") else ""
    wrong = argv[-1:] if argv[-1].startswith("--") else argv[-2:]
    return " ".join(filter(None, [script, command, *wrong]))


@pytest.mark.parametrize("case,expected", CASES, ids=[case_id(*case) for case, _ in CASES])
def test_a_malformed_input_is_one_sentence_and_changes_nothing(world, case, expected, capsys):
    script, argv = case
    argv = expand(argv, world)                  # first: it may train the run the case needs
    before = snapshot(world.root)
    status, err = as_user(ENTRIES[script], argv, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert snapshot(world.root) == before


# --- folders and disks that refuse writes ---

# eval --frames: enough for I3D (9) where the script samples that many; videofusion samples its training clip's 4
FRAMES = {"pvdm": "16", "videofusion": "4", "lvdm": "12", "vqvdm": "16", "vdm": "12"}
# the first checkpoint TRAIN saves
FIRST = {"pvdm": "ae", "videofusion": "diffusion", "lvdm": "ae", "vqvdm": "ae", "vdm": "base"}


@pytest.mark.skipif(not permissions_apply(), reason="root writes where permissions forbid it")
@pytest.mark.parametrize("script", TRAIN)
def test_a_read_only_folder_is_one_sentence_before_any_work_and_changes_nothing(world, script, tmp_path, capsys,
                                                                               monkeypatch):
    """As on a read-only disk: `train` again into a finished run, `train` into a new run under a read-only folder,
    `sample --out` into one, and `eval` beside the run (eval.json). Each names the folder or file and the cause
    before training, sampling or loading I3D begins."""
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(world[script], run)
    out.mkdir()
    module = sys.modules[script]
    for name in ("train_stage", "generate"):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: pytest.fail(f"{name} began"))
    monkeypatch.setattr(evaluate, "load_i3d", lambda *a, **k: pytest.fail("I3D began"))
    cases = [(["train", "--run", str(run), *TRAIN[script]], run),
             (["train", "--run", str(out / "new"), *TRAIN[script]], out / "new"),
             (["sample", "--run", str(run), "--n", "1", "--steps", "1", "--out", str(out)], out),
             (["eval", "--run", str(run), "--n", "2", "--steps", "1", "--frames", FRAMES[script]], run / "eval.json")]
    give_back = read_only(run, out)
    try:
        before = snapshot(tmp_path)
        for argv, path in cases:
            status, err = as_user(ENTRIES[script], argv, capsys)
            assert (status, err.strip().splitlines()) == (2, [f"error: cannot write {path}: Permission denied"]), err
        assert snapshot(tmp_path) == before
    finally:
        give_back()


@pytest.mark.parametrize("script", TRAIN)
def test_a_full_disk_while_saving_is_one_sentence_and_leaves_no_temporary_file(script, tmp_path, capsys,
                                                                              monkeypatch):
    """The first checkpoint's bytes go out, then the disk is full: `error: cannot write <run>/<stage>.pt: No space
    left on device`, and the half-written temporary file does not stay to keep the disk full."""
    save = torch.save

    def full(obj, f):
        save(obj, f)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    status, err = as_user(ENTRIES[script], ["train", "--run", str(run), *TRAIN[script]], capsys)
    assert status == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"error: cannot write {run / FIRST[script]}.pt: No space left on device"
    assert not list(run.rglob(".*.tmp*")) and not (run / f"{FIRST[script]}.pt").exists()


@pytest.mark.parametrize("argv", [
    ["pvdm.py", "train", "--batch-size", "0"],
    ["videofusion.py", "sample", "--run", "{videofusion-flipped}", "--guidance", "1"],
    ["lvdm.py", "sample", "--run", "{lvdm-future}"],
    ["-m", "eval.fvd", "--real", "{npz}/ok.npz", "--fake", "{npz}/gray.npz"],
], ids=["pvdm", "videofusion", "lvdm", "eval.fvd"])
def test_the_real_entry_points_agree(world, argv):
    """The same through `python X.py`: what main prints is what the user sees."""
    out = run_script(*expand(argv, world))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr


def test_more_splits_than_videos_is_one_sentence(world, capsys, monkeypatch):
    """IS over 5 splits of 2 videos would average empty splits: refused once the count is known, before C3D runs."""
    monkeypatch.setattr(inception_score, "load_c3d", lambda *a: None)
    status, err = as_user(inception_score.run, ["--fake", f"{world['npz']}/ok.npz", "--c3d", "c3d.npz", "--splits",
                                                "5"], capsys)
    assert status == 2 and err.strip().splitlines() == [f"error: --splits 5 needs at least as many videos, and "
                                                        f"{world['npz']}/ok.npz gives 2"]


def test_a_second_train_on_a_run_folder_is_refused_while_the_first_holds_it(world, tmp_path, capsys):
    """Another process holds the run folder's lock (as a `train` in a second terminal would): `train` stops with one
    sentence naming that process and changes nothing, `sample` reads the run all the same, and once the holder is
    killed the lock is free at once (the operating system's lock: no stale file to delete)."""
    run = tmp_path / "run"
    shutil.copytree(world["pvdm"], run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.files import lock_folder; "
                               "lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(300)", str(run)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        status, err = as_user(pvdm.cli, ["train", "--run", str(run), *TRAIN["pvdm"], "--steps", "2"], capsys)
        assert (status, err.strip().splitlines()) == (2, [
            f"error: {run} is being trained by process {holder.pid} (another `train` on this run folder): wait for "
            f"it to finish or stop it, or pass another --run"]), err
        assert snapshot(run) == before
        status, err = as_user(pvdm.cli, ["sample", "--run", str(run), "--n", "1", "--steps", "1", "--cond-steps", "1",
                                         "--out", str(tmp_path / "out")], capsys)
        assert status == 0 and (tmp_path / "out" / "samples.npz").exists(), err
    finally:
        holder.kill()
        holder.wait()
    lock_folder(run)             # free again: the holder's death released it
    release_locks()


class _Refusing(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise UserError("every video in folder failed to decode")


def test_a_mistake_found_inside_a_data_loader_worker_is_still_one_sentence(capsys):
    """A worker process wraps the UserError in its traceback text; main prints only the sentence."""
    status, err = as_user(lambda argv: next(iter(torch.utils.data.DataLoader(_Refusing(), num_workers=1))), [], capsys)
    assert (status, err.strip().splitlines()) == (2, ["error: every video in folder failed to decode"]), err
