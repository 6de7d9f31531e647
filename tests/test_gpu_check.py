"""eval.gpu_check, and the scripts on a Python without PyAV (the CUDA machine's): the whole check runs on a CPU at
the tiny presets with `av` unimportable, its FLOP and step-time meter agrees with a hand count, an item past its
share of the budget stops and the check goes on, and a user's mistake is one `error:` line.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

from common.cli import main
from eval import gpu_check as G
from tests.fixtures import ROOT

# a sitecustomize that makes `import av` fail, in this process's children and theirs (PYTHONPATH is inherited)
NO_PYAV = '''
import sys
class NoPyAV:
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoPyAV())
'''


@pytest.fixture
def no_pyav(tmp_path):
    """The environment of a child process in which PyAV cannot be imported."""
    folder = tmp_path / "no_pyav"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(NO_PYAV)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "OMP_NUM_THREADS": "1"}


def test_the_scripts_import_and_write_samples_without_pyav_and_video_files_say_how_to_get_it(no_pyav, tmp_path):
    code = textwrap.dedent(f"""
        import sys, warnings
        from pathlib import Path
        import numpy as np
        import pvdm, lvdm, vqvdm, videofusion, vdm, eval.efficiency, eval.gpu_check, eval.data_speed
        from common.data import make_dataset
        from common.errors import UserError
        from common.video import probe, write_samples
        assert "av" not in sys.modules
        try:
            import av
            raise SystemExit("av was imported")
        except ImportError:
            pass
        out = Path({str(tmp_path)!r})
        (out / "clips").mkdir()
        (out / "clips" / "a.mp4").write_bytes(b"not read")
        for read in (lambda: probe(out / "clips" / "a.mp4"), lambda: make_dataset("folder", str(out / "clips"))):
            try:
                read()
                raise SystemExit("a video file was read without PyAV")
            except UserError as e:
                print("error:", e)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write_samples(out / "samples", np.zeros((2, 3, 8, 6, 3), np.uint8))
        print("written:", sorted(p.name for p in (out / "samples").iterdir()))
        print("warned:", [str(w.message) for w in caught])
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=no_pyav, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 2 and all(line.endswith("pip install av") for line in errors)
    assert "written: ['grid.gif', 'samples.npz']" in lines
    assert "no .mp4 files" in done.stdout and "pip install av" in lines[-1]


def test_the_whole_check_passes_on_a_cpu_at_the_tiny_presets_without_pyav(no_pyav):
    """`python -m eval.gpu_check --device cpu --tiny`, as CI runs it (minutes: every script's stages, resume,
    compile and sample, the gpu-marked tests' collection and a torchrun): every item passes, each training item
    has its step time and TFLOP/s, and the table lists every item. The budget is generous: a slow machine must not
    turn the check's own test into a timing test."""
    done = subprocess.run([sys.executable, "-m", "eval.gpu_check", "--device", "cpu", "--tiny",
                           "--budget-minutes", "40"], cwd=ROOT, env=no_pyav, capture_output=True, text=True,
                          timeout=3000)
    print(done.stdout)              # the table, for whoever reads the test's output
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    rows = {row[0][2:]: row for row in rows[1:]}
    expected = [item.name for _, items in G.plan_groups(None) for item in items]
    assert list(rows) == expected
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (_, result, seconds, step_s, peak, tflops, mfu, checked) in rows.items():
        assert result == "passed", (name, checked)
        assert peak == "n/a" and mfu == "n/a"                                       # a CPU has neither
        if " train " in name:
            assert float(step_s) > 0 and float(tflops) > 0, name
    assert "skipped" in rows["tests"][-1] and "gloo" in rows["torchrun"][-1]
    for name in ("pvdm resume+compile ae", "lvdm resume+compile short", "vqvdm resume+compile diffusion",
                 "videofusion resume+compile base-pretrain", "vdm resume+compile base"):
        assert "from step 10 to 20, " in rows[name][-1] and "graph(s) compiled" in rows[name][-1]


def test_the_meter_counts_a_steps_flops_and_times_the_steps_after_the_second():
    """A trained and a frozen linear map (an encoder inside the step) called by a module that branches on a value
    (.item(), which the meta device cannot give), beside a leaf module that does too: the second step's FLOPs are
    3 x the trained map's forward + 1 x the frozen one's, 2 per multiply-add, as counted by hand; the branching
    module is replaced by the calls it made, and the leaf is left out and named."""
    B, D, H = 6, 5, 7

    class Count(nn.Module):
        def forward(self, x):
            return x * (x.abs().max().item() > 0)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen, self.trained, self.count = nn.Linear(D, H).requires_grad_(False), nn.Linear(H, 3), Count()

        def forward(self, x):
            z = self.frozen(x) if x.sum().item() > -1e9 else x
            return self.count(self.trained(z))

    model = Step()
    optimizer = torch.optim.SGD(model.trained.parameters(), lr=0.1)
    meter = G.Meter(torch.device("cpu"), count=True)
    try:
        for _ in range(5):
            model(torch.randn(B, D)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            time.sleep(0.01)
    finally:
        meter.close()
    gflop, left_out = meter.gflop()
    assert gflop * 1e9 == pytest.approx(3 * 2 * B * H * 3 + 1 * 2 * B * D * H, rel=1e-12) and left_out == ["Count"]
    assert len(meter.times) == 5 and [type(call[1]).__name__ for call in meter.calls] == \
        ["Step", "Linear", "Linear", "Count"]
    gaps = [b - a for a, b in zip(meter.times[2:], meter.times[3:])]       # steps 3-5; the second is watched
    assert meter.step_s() == pytest.approx(sorted([meter.times[2] - meter.times[1], *gaps])[1])


def test_an_item_past_its_share_stops_and_says_so(tmp_path):
    class Slow:
        @staticmethod
        def cli(argv):
            time.sleep(30)
    item = G.Item("toy train ae", "train", "ae")
    script = G.Script("toy", "ucf64", (("ae", "--ae-steps"),), "ae", "ae")
    plan = G.Plan("cpu", True, str(tmp_path), 60.0)
    start = time.perf_counter()
    G.measure(item, script, Slow, plan, "tiny", tmp_path, torch.device("cpu"), 0.5, {}, None)
    assert item.result == "stopped" and item.detail.startswith("at its share of the budget, 0.5 s, after 0 steps")
    assert time.perf_counter() - start < 20


def test_a_stage_may_take_the_scripts_time_but_the_floors_of_the_items_after_it(tmp_path, monkeypatch):
    """The first H200 run stopped pvdm's first stage after 9 of 10 steps at a weighted share of 28 s while the
    script had 170 s: an item's share is the script's time left less MIN_SHARE_S of each item after it."""
    shares = []

    def fake_measure(item, script, module, plan, preset, run_dir, device, share, flops, peak):
        shares.append((item.name, round(share)))
        item.result = "passed"
    monkeypatch.setattr(G, "measure", fake_measure)
    monkeypatch.setattr(G.time, "time", lambda: 1000.0)                    # no time passes between the items
    script = next(s for s in G.SCRIPTS if s.name == "vqvdm")
    items = G.script_items(script)
    G.run_script_items({"plan": {"device": "cpu", "tiny": True, "work": str(tmp_path), "budget_s": 200.0},
                        "script": "vqvdm", "items": [G.asdict(i) for i in items], "deadline": 1200.0,
                        "failed": [], "results": str(tmp_path / "results.jsonl")})
    floors = G.MIN_SHARE_S
    assert shares == [("vqvdm train ae", 200 - floors["train"] - floors["compile"] - floors["sample"]),
                      ("vqvdm train diffusion", 200 - floors["compile"] - floors["sample"]),
                      ("vqvdm resume+compile diffusion", 200 - floors["sample"]),
                      ("vqvdm sample", 200)]


def test_lvdm_trains_without_lpips_whose_weights_a_gpu_machine_cannot_fetch(tmp_path):
    import lvdm
    from common.cli import build_parser
    script = next(s for s in G.SCRIPTS if s.name == "lvdm")
    argv = G.train_argv(script, G.Plan("cuda", False, str(tmp_path), 60.0), "ucf256", tmp_path, "ae", {})
    assert argv[-2:] == ["--lpips-weight", "0"] and argv[argv.index("--preset") + 1] == "ucf256"
    parser, _ = build_parser(lvdm.SCRIPT, lvdm.__doc__, lvdm.Config, lvdm.PRESETS, stages=("all", *lvdm.STAGES))
    assert parser.parse_args(argv).lpips_weight == 0     # lvdm's own command line takes what the check passes


@pytest.mark.parametrize("argv, says", [
    (["--device", "cpu"], "pass --device cpu --tiny"),
    (["--budget-minutes", "0"], "--budget-minutes must be"),
    (["--only", "mcvd"], "invalid choice: 'mcvd'"),
], ids=["cpu-without-tiny", "no-budget", "unknown-script"])
def test_a_users_mistake_is_one_error_line(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(G, "run_group", lambda *a: pytest.fail("a check started"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(lambda: G.run(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1


def test_torchrun_with_one_process_still_makes_the_process_group(monkeypatch):
    """Under torchrun (it sets RANK) one process gets a process group too, gloo on a CPU (NCCL on CUDA), so that
    `torchrun --nproc_per_node=1` on a one-GPU machine runs DDP as N processes do; without torchrun, none."""
    import socket

    import torch.distributed as dist

    from common.run import init_distributed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    world, device = init_distributed("cpu")
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and (world.rank, world.world) == (0, 1)
    finally:
        dist.destroy_process_group()
    monkeypatch.delenv("RANK")
    world, device = init_distributed("cpu")
    assert not dist.is_initialized() and world.world == 1


def test_an_item_may_borrow_half_of_the_later_items_parts():
    assert G.share_of(100.0, [1.0, 2.0, 1.0]) == pytest.approx(100 * (1 + 1.5) / 4)
    assert G.share_of(100.0, [3.0]) == 100.0
