"""Run plumbing: checkpoints, exact resume, the CLI's errors and presets, DDP under torchrun."""
import json
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common import checkpoint, files, train
from common.checkpoint import config_from_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.errors import UserError
from common.run import EMA, pick_precision
from tests import toy_script
from tests.fixtures import make_ucf101, permissions_apply, read_only, run_script, torchrun


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(run_dir) / "log.jsonl").read_text().split("\n")[:-1])]


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7,
                                        "config": {"width": 3}, "script": "toy", "rng": rng_state()})
    ckpt = load_checkpoint(tmp_path / "c.pt", "toy", {"width": 3})
    assert ckpt["step"] == 7 and ckpt["format_version"] == checkpoint.FORMAT_VERSION
    assert torch.equal(ckpt["model"]["weight"], model.weight)
    assert torch.equal(ckpt["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_refuses_wrong_script_newer_format_and_other_architecture(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"config": {"width": 3}, "script": "pvdm"})
    with pytest.raises(UserError, match="written by pvdm.py, not videofusion.py"):
        load_checkpoint(tmp_path / "c.pt", "videofusion")
    with pytest.raises(UserError, match="width=3 but the config asks for 4"):
        load_checkpoint(tmp_path / "c.pt", "pvdm", {"width": 4})
    torch.save({"script": "pvdm", "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(UserError, match="format 99, newer"):
        load_checkpoint(tmp_path / "new.pt", "pvdm")
    torch.save({"script": "pvdm", "format_version": checkpoint.FORMAT_VERSION - 1}, tmp_path / "old.pt")
    with pytest.raises(UserError, match="older than this code's"):
        load_checkpoint(tmp_path / "old.pt", "pvdm")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", "pvdm")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="empty.pt is not a readable checkpoint: it is empty, truncated or damaged"):
        load_checkpoint(tmp_path / "empty.pt", "pvdm")
    good = (tmp_path / "new.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="cut.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt", "pvdm")


def test_flipped_bytes_are_refused_and_a_mapped_load_verifies_what_it_returns(tmp_path):
    """torch.load does not check a zip member's bytes: 64 flipped bytes in a weight load silently without the
    checksums. A load that asks for some entries (mmap sampling) verifies and returns only those."""
    model = torch.nn.Linear(256, 256)
    ema = {k: v.clone() for k, v in model.state_dict().items()}      # its own bytes: torch.save shares storages
    save_checkpoint(tmp_path / "c.pt", {"model": model.state_dict(), "ema": {"model": ema, "updates": 1},
                                        "config": {}, "script": "toy", "step": 1})
    data = bytearray((tmp_path / "c.pt").read_bytes())
    torch.load(tmp_path / "c.pt", weights_only=True)                 # the reference: loads
    middle = data.index(model.weight.detach().numpy().tobytes()[:64]) + 1024      # inside the first weight (model)
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    torch.load(tmp_path / "bad.pt", weights_only=True)              # still loads: the damage is invisible to torch
    with pytest.raises(UserError, match="bad.pt is damaged: its 'model' entry does not match the checksum"):
        load_checkpoint(tmp_path / "bad.pt", "toy")
    ema_only = load_checkpoint(tmp_path / "bad.pt", "toy", mmap=True, entries=("ema",))
    assert "model" not in ema_only and torch.equal(ema_only["ema"]["model"]["weight"], model.weight)


def test_a_config_setting_this_version_lacks_is_named():
    ckpt = {"config": {"steps": 3, "future_setting": 1}, "script": "toy"}
    with pytest.raises(UserError, match="c.pt was trained with the setting future_setting=1, which this version of "
                                        "toy.py does not have"):
        config_from_checkpoint(toy_script.Config, ckpt, "c.pt")
    assert config_from_checkpoint(toy_script.Config, {"config": {"steps": 3}}, "c.pt").steps == 3


def test_an_output_folder_is_made_and_loses_killed_writes_temporaries_only(tmp_path):
    out = files.output_folder(tmp_path / "a" / "b")
    (out / ".samples.tmp999.npz").write_bytes(b"half")
    (out / ".notes.tmpl").write_text("the user's")
    files.output_folder(out)
    assert sorted(p.name for p in out.iterdir()) == [".notes.tmpl"]
    with pytest.raises(UserError, match="it is a file, not a folder"):
        files.output_folder(out / ".notes.tmpl")


def test_save_interrupted_before_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c.pt", {"script": "toy", "step": 1})

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c.pt", {"script": "toy", "step": 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "c.pt", "toy")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]          # the temporary file went with the failure


def test_a_full_disk_is_one_sentence_and_leaves_nothing_behind(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "c.pt", {"script": "toy", "step": 1})
    real_save = torch.save

    def full(obj, f):
        real_save(obj, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'c.pt'}: No space left on device"):
        save_checkpoint(tmp_path / "c.pt", {"script": "toy", "step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(tmp_path / "c.pt", "toy")["step"] == 1


@pytest.mark.parametrize("limit,flags,refused", [
    (8192, ["--steps", "2"], "diffusion.pt"),                        # config.json and log lines fit, 20 KB do not
    (300, ["--steps", "5", "--save-every", "0"], "log.jsonl"),       # the third log line does not fit
])
def test_a_file_the_kernel_refuses_to_grow_is_one_sentence_through_the_cli(tmp_path, limit, flags, refused):
    """A file-size limit makes the kernel refuse a file's bytes (EFBIG) as a full disk refuses them (ENOSPC): a
    real OS error, even for root. torch.save given a path reports it as a RuntimeError, and the user saw a
    traceback; checkpoints are written through a Python file, where it is an OSError, then one sentence."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = run_script("tests/toy_script.py", "train", "--run", str(tmp_path), *flags, preexec_fn=limit_file_size)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1:] == [
        f"error: cannot write {tmp_path / refused}: File too large"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not list(tmp_path.glob(".*.tmp*"))


def test_rng_state_round_trips():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class OnAnotherDevice:
    """A tensor as a checkpoint loaded with map_location="cuda" holds it: usable only through .cpu() (torch's
    set_rng_state refuses a CUDA tensor, as the first resumed run on a GPU showed)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def cpu(self):
        return self.tensor


def test_rng_state_restores_from_states_a_gpu_checkpoint_holds(monkeypatch):
    state = rng_state()
    a = torch.rand(3), np.random.rand(3)
    cuda_states = [torch.get_rng_state()]                 # stands in for one GPU's generator state
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    set_rng_state({**state, "torch": OnAnotherDevice(state["torch"]), "cuda": [OnAnotherDevice(cuda_states[0])],
                   "numpy": [*state["numpy"][:1], OnAnotherDevice(state["numpy"][1]), *state["numpy"][2:]]})
    assert torch.equal(torch.rand(3), a[0]) and np.array_equal(np.random.rand(3), a[1])
    assert len(restored) == 1 and torch.equal(restored[0], cuda_states[0])


def test_resumed_training_continues_the_same_loss_curve(tmp_path, monkeypatch):
    toy_script.cli(["train", "--run", str(tmp_path / "straight"), "--steps", "6"])
    # the same run killed during step 5 (after the checkpoint of step 4), then started again
    real_loss = torch.nn.functional.mse_loss
    calls = {"n": 0}

    def dies_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(toy_script.F, "mse_loss", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        toy_script.cli(["train", "--run", str(tmp_path / "killed"), "--steps", "6"])
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "diffusion.pt", "toy")["step"] == 4
    toy_script.cli(["train", "--run", str(tmp_path / "killed"), "--steps", "6"])
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 1 + 4, 2 + 4] and len(straight) == 6
    assert [l for _, l in resumed] == [l for _, l in straight]


def test_a_finished_stage_is_skipped_and_more_steps_resume_it(tmp_path, capsys):
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "2"])
    capsys.readouterr()
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "2"])
    assert "diffusion: finished at step 2" in capsys.readouterr().out
    assert len(losses(tmp_path)) == 2
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "3"])
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3]


def test_config_flags_override_the_preset_and_help_shows_preset_values(tmp_path, capsys):
    toy_script.cli(["train", "--run", str(tmp_path), "--preset", "wide", "--steps", "1", "--lr", "0.5"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["width"] == 16 and cfg["steps"] == 1 and cfg["lr"] == 0.5 and cfg["preset"] == "wide"
    with pytest.raises(SystemExit):
        toy_script.cli(["train", "--help"])
    assert "(default: 6)" in capsys.readouterr().out


def test_resuming_with_another_architecture_is_refused_and_changes_nothing(tmp_path):
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "1"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="width=8 but the config asks for 16"):
        toy_script.cli(["train", "--run", str(tmp_path), "--steps", "2", "--preset", "wide"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_resumed_stage_logs_each_step_once_and_stale_temporary_files_go(tmp_path):
    """A kill between a step's log line and its checkpoint leaves the line; the resumed stage forgets it."""
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "4"])            # checkpoints at 2 and 4
    ckpt = torch.load(tmp_path / "diffusion.pt", weights_only=True)
    save_checkpoint(tmp_path / "diffusion.pt", {**ckpt, "step": 2, "samples": 2 * 2})   # as if killed after step 4's line
    (tmp_path / ".diffusion.tmp999.pt").write_bytes(b"half a checkpoint")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"stage": "diffusion", "st')                                     # a line cut short by the kill
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "5"])
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob(".*.tmp*"))


def test_a_skipped_stage_leaves_the_rng_where_its_training_left_it(tmp_path):
    """What a script does after a stage (build the next stage's modules) draws the same numbers whether that stage
    trained in this command or was skipped as finished in a later one."""
    from common.data import SyntheticVideos
    from common.run import Dist, RunLog

    run = train.Run("toy", tmp_path, torch.device("cpu"), None, Dist(), False, RunLog(tmp_path))

    def stage_then_draw():
        model = torch.nn.Linear(1, 1)
        train.train_stage(run, "a", model, torch.optim.SGD(model.parameters(), lr=0.1),
                          lambda net, batch: net.weight.sum(), SyntheticVideos(2, 4, length=8), steps=2, batch_size=2,
                          config=toy_script.Config(), must_match={})
        return torch.rand(4)

    trained = stage_then_draw()
    torch.manual_seed(123)                  # a new command: the RNG is wherever its start left it
    assert torch.equal(stage_then_draw(), trained)


def test_a_stage_killed_in_its_first_save_starts_afresh_and_logs_each_step_once(tmp_path, monkeypatch):
    """The toy logs every step and saves every 2: killed while saving step 2, its log holds steps 1 and 2 and no
    checkpoint does. The stage starts again from nothing and must neither log those steps twice nor draw other
    numbers than a run never killed."""
    toy_script.cli(["train", "--run", str(tmp_path / "straight"), "--steps", "4"])

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        toy_script.cli(["train", "--run", str(tmp_path / "killed"), "--steps", "4"])
    monkeypatch.undo()
    assert [s for s, _ in losses(tmp_path / "killed")] == [1, 2] and not (tmp_path / "killed" / "diffusion.pt").exists()
    toy_script.cli(["train", "--run", str(tmp_path / "killed"), "--steps", "4"])
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


def test_killed_writes_temporary_files_go_from_the_run_folder_and_its_samples_at_start(tmp_path):
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "2"])
    (tmp_path / "samples" / "final").mkdir(parents=True)
    stale = [tmp_path / ".diffusion.tmp999.pt", tmp_path / "samples" / ".step_0000002.tmp999.gif",
             tmp_path / "samples" / "final" / ".samples.tmp999.npz"]
    for path in stale:
        path.write_bytes(b"half a file")
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "2"])
    assert not any(path.exists() for path in stale)


@pytest.mark.skipif(not permissions_apply(), reason="root writes where permissions forbid it")
def test_a_read_only_run_folder_is_one_sentence_before_any_training(tmp_path, monkeypatch):
    """As on a read-only disk: the finished run's folder, and a new run's parent, refuse writes. Both are found when
    the run starts, with the cause, and nothing in them changes."""
    toy_script.cli(["train", "--run", str(tmp_path / "run"), "--steps", "2"])
    (tmp_path / "parent").mkdir()
    give_back = read_only(tmp_path / "run", tmp_path / "parent")
    try:
        monkeypatch.setattr(toy_script, "train_stage", lambda *a, **k: pytest.fail("training began"))
        for run in (tmp_path / "run", tmp_path / "parent" / "new"):
            with pytest.raises(UserError, match=f"^cannot write {run}: Permission denied$"):
                toy_script.cli(["train", "--run", str(run), "--steps", "3"])
    finally:
        give_back()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "diffusion.pt", "log.jsonl", "parent", "run"]


def test_an_unusable_cache_folder_costs_only_the_cache(tmp_path, monkeypatch):
    """The video-probe cache under a regular file cannot be made (even by root): the run trains on, uncached."""
    (tmp_path / "blocker").write_text("a file, not a folder")
    monkeypatch.setenv("VIDIFF_CACHE", str(tmp_path / "blocker" / "cache"))
    root = make_ucf101(tmp_path / "ucf")
    toy_script.cli(["train", "--data", "ucf101", "--data-root", str(root), "--run", str(tmp_path / "run"),
                    "--steps", "1"])
    assert (tmp_path / "run" / "diffusion.pt").exists()


@pytest.mark.parametrize("argv,expected", [
    (["train", "--batch-size", "many"], "--batch-size must be an integer >= 1, got many"),
    (["train", "--data", "ucf101", "--data-root", "/no/such/dir"], "UCF-101 not found at /no/such/dir"),
    (["sample", "--run", "/no/such/run"], "train one first with `python toy.py train --run /no/such/run`"),
    (["train", "--device", "cuda"] if not torch.cuda.is_available() else ["train", "--precision", "x"], ""),
])
def test_user_errors_are_one_line_and_exit_2(argv, expected):
    out = run_script("tests/toy_script.py", *argv)
    assert out.returncode == 2
    lines = out.stderr.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


def test_sample_writes_contract_files(tmp_path):
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "2"])
    toy_script.cli(["sample", "--run", str(tmp_path), "--n", "3", "--steps", "4"])
    videos = np.load(tmp_path / "samples" / "sample" / "samples.npz")["videos"]
    assert videos.shape == (3, 4, 8, 8, 3) and videos.dtype == np.uint8
    assert len(list((tmp_path / "samples" / "sample").glob("*.mp4"))) == 3


def test_torchrun_two_processes_train_and_only_rank_0_writes(tmp_path):
    out = torchrun("tests/toy_script.py", "train", "--run", str(tmp_path), "--steps", "4", "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]          # one line per step, not one per rank
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.lock", "config.json", "diffusion.pt", "log.jsonl"]
    ckpt = load_checkpoint(tmp_path / "diffusion.pt", "toy")
    assert ckpt["step"] == 4 and ckpt["samples"] == 4 * 2 * 2        # steps x batch x world
    # and it resumes on one process, continuing the data stream where the two left it
    toy_script.cli(["train", "--run", str(tmp_path), "--steps", "5"])
    assert load_checkpoint(tmp_path / "diffusion.pt", "toy")["samples"] == 16 + 2


def test_ema_follows_with_warm_up():
    model = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = ema.model.weight.item()
    ema.update(model)   # first update: decay min(0.5, 2/11) = 2/11
    assert ema.model.weight.item() == pytest.approx(start * 2 / 11 + 9 / 11)


def test_precision_is_fp32_on_cpu_and_fp16_needs_cuda():
    assert pick_precision("auto", torch.device("cpu")) is None
    assert pick_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        pick_precision("fp16", torch.device("cpu"))


def test_accumulated_batches_make_one_step_of_their_mean_gradient(tmp_path):
    """accumulate=3 on a loss whose gradient is 1 per batch: one SGD step of lr 1 moves the weight by -1 (the mean),
    as a single batch would, not by -3."""
    from common.data import SyntheticVideos
    from common.run import Dist, RunLog
    from common.train import Run, train_stage

    run = Run("toy", tmp_path, torch.device("cpu"), None, Dist(), False, RunLog(tmp_path))
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    for accumulate in (1, 3):
        torch.nn.init.zeros_(model.weight)
        train_stage(run, f"acc{accumulate}", model, torch.optim.SGD(model.parameters(), lr=1.0),
                    lambda net, batch: net.weight.sum(), SyntheticVideos(2, 4, length=8), steps=1, batch_size=2,
                    config=toy_script.Config(), must_match={}, accumulate=accumulate)
        assert model.weight.item() == pytest.approx(-1.0)
    assert torch.load(tmp_path / "acc3.pt", weights_only=True)["samples"] == 2 * 3


@pytest.mark.parametrize("argv", [["train", "--run", "{blocker}/run"],
                                  ["sample", "--run", "{run}", "--n", "1", "--steps", "2", "--out", "{blocker}/out"]])
def test_an_unwritable_folder_is_one_sentence_naming_the_path(tmp_path, argv):
    """A folder under a regular file cannot be made, even by root: a real OS error, reported in one line."""
    toy_script.cli(["train", "--run", str(tmp_path / "run"), "--steps", "1"])
    (tmp_path / "blocker").write_text("a file, not a folder")
    args = [a.format(blocker=tmp_path / "blocker", run=tmp_path / "run") for a in argv]
    out = run_script("tests/toy_script.py", *args)
    lines = out.stderr.strip().split("\n")
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: cannot write {tmp_path / 'blocker'}/") and "Not a directory" in lines[0]


def test_a_changed_lr_on_resume_is_applied_from_that_step_and_logged(tmp_path, monkeypatch):
    """Resumed at step 2 with --lr 1e-3 instead of 1e-2: AdamW's step 3 moves every weight by exactly a tenth of
    what the unchanged run's step 3 moves it (both its terms, the decay and the moment ratio, scale with lr, and
    the moments and the batch are the same), the log says so at step 2, and config.json and the checkpoint name
    the rate that ran from there."""
    toy_script.cli(["train", "--run", str(tmp_path / "same"), "--steps", "2"])
    for copy in ("slower", "killed"):
        shutil.copytree(tmp_path / "same", tmp_path / copy)
    before = torch.load(tmp_path / "same" / "diffusion.pt", weights_only=True)["model"]
    toy_script.cli(["train", "--run", str(tmp_path / "same"), "--steps", "3"])
    toy_script.cli(["train", "--run", str(tmp_path / "slower"), "--steps", "3", "--lr", "1e-3"])
    same, slower = (torch.load(tmp_path / run / "diffusion.pt", weights_only=True) for run in ("same", "slower"))
    for key, w in before.items():
        torch.testing.assert_close(slower["model"][key] - w, (same["model"][key] - w) / 10, rtol=0, atol=1e-6)
        assert not torch.equal(same["model"][key], w)
    assert [g["lr"] for g in slower["optimizer"]["param_groups"]] == [1e-3] and slower["config"]["lr"] == 1e-3
    assert json.loads((tmp_path / "slower" / "config.json").read_text())["lr"] == 1e-3
    log = [json.loads(line) for line in (tmp_path / "slower" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("changed"), r.get("lr")) for r in log] == \
        [(1, None, 1e-2), (2, None, 1e-2), (2, {"lr": [1e-2, 1e-3]}, None), (3, None, 1e-3)]
    assert torch.equal(torch.load(tmp_path / "same" / "diffusion.pt", weights_only=True)["optimizer"]["state"][0]
                       ["exp_avg_sq"], slower["optimizer"]["state"][0]["exp_avg_sq"])   # the moments carried over
    # killed before the next checkpoint, then resumed with the same --lr: the change is logged once
    monkeypatch.setattr(train, "save_checkpoint", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        toy_script.cli(["train", "--run", str(tmp_path / "killed"), "--steps", "3", "--lr", "1e-3"])
    monkeypatch.undo()
    toy_script.cli(["train", "--run", str(tmp_path / "killed"), "--steps", "3", "--lr", "1e-3"])
    killed = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("seconds", "data_wait")} for r in killed] == \
        [{k: v for k, v in r.items() if k not in ("seconds", "data_wait")} for r in log]


def test_other_optimizer_settings_on_resume_are_applied_too(tmp_path):
    """Whatever the optimizer is built with (betas, weight decay) is what the resumed stage's param groups hold,
    and the log names each change; built as before, nothing is logged and the state is the checkpoint's."""
    from common.data import SyntheticVideos
    from common.run import Dist, RunLog

    run = train.Run("toy", tmp_path, torch.device("cpu"), None, Dist(), False, RunLog(tmp_path))

    def stage(steps, **settings):
        model = torch.nn.Linear(1, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, **settings)
        train.train_stage(run, "a", model, optimizer, lambda net, batch: net.weight.sum(),
                          SyntheticVideos(2, 4, length=8), steps=steps, batch_size=2, config=toy_script.Config(),
                          must_match={}, log_every=1)
        return optimizer

    stage(2)
    same = stage(3)
    assert same.param_groups[0]["betas"] == (0.9, 0.999) and same.param_groups[0]["weight_decay"] == 0.01
    changed = stage(4, betas=(0.5, 0.9), weight_decay=0.1)
    assert changed.param_groups[0]["betas"] == (0.5, 0.9) and changed.param_groups[0]["weight_decay"] == 0.1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["changed"] for r in log if "changed" in r] == [{"betas": [[0.9, 0.999], [0.5, 0.9]],
                                                            "weight_decay": [0.01, 0.1]}]
    assert [r["step"] for r in log] == [1, 2, 3, 3, 4]
