"""eval.efficiency: every protocol runs and fills its row, the rows' numbers agree with each other, FLOPs counted
on the meta device agree with counts by hand, the extrapolation and the batch search do what they say, and a
user's mistake is one `error:` line. No test asserts a time: the clock is either faked or not read.
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lvdm
import pvdm
import vdm
import videofusion
import vqvdm
from common.cli import main
from common.diffusion import Schedule
from eval import efficiency as E

FIELDS = {"protocol", "measures", "paper", "paper_ratio", "ours", "ratio", "flop_ratio", "gflop_per_call", "config",
          "guesses"}


@pytest.fixture
def toy_clips(monkeypatch):
    """The protocols' presets at a few frames and small frames, so that all four run in seconds on a CPU (the
    widths come down through --width-divisor, as a user's would)."""
    for name, build, small in (
            ("vdm_config", E.vdm_config, dict(frames=4, resolution=16, sr_resolution=32)),
            ("lvdm_config", E.lvdm_config, dict(frames=4, resolution=64)),
            ("pvdm_config", E.pvdm_config, dict(frames=8, resolution=64)),
            ("vqvdm_config", E.vqvdm_config, dict(frames=4, resolution=32)),
            ("videofusion_config", E.videofusion_config, dict(frames=4, resolution=16))):
        monkeypatch.setattr(E, name, lambda *d, build=build, small=small: dataclasses.replace(build(*d), **small))


@pytest.fixture
def one_thread():
    """Toy networks run op by op in microseconds, where two OpenMP threads on a busy 2-core machine wait for each
    other at every op (this run took 124 s with two threads, 13 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `python -m eval.efficiency ARGV`, run in-process through common.cli.main."""
    capsys.readouterr()
    try:
        main(lambda: E.run(argv))
        status = 0
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_every_protocol_runs_on_a_cpu_and_fills_its_row(toy_clips, one_thread, capsys):
    status, out, _ = run_cli(["--scale", "cpu", "--device", "cpu", "--width-divisor", "16", "--timed-steps", "1",
                              "--train-steps", "1", "--repeats", "2"], capsys)
    assert status == 0
    lines = out.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["protocol"] for r in rows] == ["PVDM Table 5", "LVDM Table 2", "VQ-VDM Table 3", "VideoFusion Table 4"]
    for row in rows:
        assert FIELDS <= row.keys()
        assert "widths / 16" in row["config"]["setting"] and row["guesses"]
        assert all(g > 0 for g in row["gflop_per_call"].values()) and row["config"]["load_average"] >= 0

    pvdm_row, lvdm_row, vq_row, vf_row = rows
    v, p = pvdm_row["ours"]["vdm"], pvdm_row["ours"]["pvdm_l"]
    assert v["s_16"] == pytest.approx(v["base_s"] + v["sr_s"], rel=1e-3)          # 4 significant digits each
    assert v["memory_gib"] is None and pvdm_row["ours"]["train_batch"] == "n/a on CPU"
    clips = math.ceil(E.LONG_FRAMES / 8)                                          # the toy PVDM clip has 8 frames
    for key, (N, M) in {"100/20-s": (100, 20), "200/200-s": (200, 200), "400/400-s": (400, 400)}.items():
        assert p[key]["s_16"] == pytest.approx(N * p["step_s"] + p["decode_s"], rel=1e-3)
        assert p[key]["s_128"] == pytest.approx((N + (clips - 1) * M) * p["step_s"] + clips * p["decode_s"],
                                                rel=1e-3)
        assert pvdm_row["ratio"][key] == pytest.approx(v["s_16"] / p[key]["s_16"], rel=2e-3, abs=0.006)
    assert pvdm_row["paper_ratio"] == {"100/20-s": 14.34, "200/200-s": 5.54, "400/400-s": 2.76}

    o = lvdm_row["ours"]
    assert o["vdm_s"] == pytest.approx(o["vdm_base"]["s"] + o["vdm_sr"]["s"], rel=1e-3)
    assert lvdm_row["ratio"] == pytest.approx(o["vdm_s"] / o["lvdm"]["s"], rel=2e-3, abs=0.006)
    assert lvdm_row["paper_ratio"] == 6.12
    assert o["dims"] == {"vdm": 3 * 4 * 16 * 16, "lvdm": 4 * 1 * 8 * 8}               # the toy clips' sizes
    for net in ("vdm_base", "vdm_sr", "lvdm"):
        assert o[net]["mfu"] is None and o[net]["memory_gib"] is None
    # achieved TFLOP/s: 3 x the forward FLOPs of the measured networks at batch 2 (backward ~ 2 x forward), the
    # frozen encoder's forward once
    for net, forward in (("vdm_base", 3 * E.gflop("vdm_base", 16, 2)),
                         ("lvdm", 3 * E.gflop("lvdm_unet", 16, 2) + E.gflop("lvdm_encode", 16, 2))):
        assert o[net]["tflops"] == pytest.approx(forward / o[net]["s"] / 1e3, rel=2e-3)

    o = vq_row["ours"]
    assert o["vdm"]["runs"] == o["vqvdm"]["runs"] == 2 and o["vdm"]["std_s"] is not None
    assert o["vqvdm_with_decode"]["mean_s"] == pytest.approx(o["vqvdm"]["mean_s"] + o["decode_s"], rel=1e-3)
    assert vq_row["ratio"]["denoiser"] == pytest.approx(o["vdm"]["mean_s"] / o["vqvdm"]["mean_s"], rel=2e-3,
                                                        abs=0.006)

    o = vf_row["ours"]
    assert o["vdm_star"]["step_s"] > 0 and o["videofusion"]["step_s"] > 0 and "train" not in o["vdm_star"]
    assert vf_row["ratio"]["memory"] is None and vf_row["paper_ratio"] == {"latency": 2.35, "memory": 1.28}

    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + 7 + 1 + 2 + 2           # header; PVDM 3 x (16, 128 frames) + batch; LVDM; VQ x 2; VF x 2
    assert all(line.count("|") == 9 for line in table)


def test_one_protocol_alone_prints_one_row(toy_clips, one_thread, capsys):
    status, out, _ = run_cli(["--only", "videofusion", "--width-divisor", "16", "--timed-steps", "1"], capsys)
    assert status == 0
    assert [json.loads(line)["protocol"] for line in out.splitlines() if line.startswith("{")] == \
        ["VideoFusion Table 4"]


def test_flops_of_a_space_only_conv_and_a_linear_agree_with_a_hand_count():
    B, C_in, C_out, T, H, W, D = 2, 5, 7, 4, 6, 6, 3
    conv, linear = nn.Conv3d(C_in, C_out, (1, 3, 3), padding=(0, 1, 1)), nn.Linear(C_out, D)
    x = torch.randn(B, C_in, T, H, W)
    positions = B * T * H * W                                           # 'same' padding: one output per input
    hand = 2 * C_in * C_out * (1 * 3 * 3) * positions + 2 * C_out * D * positions   # multiply-adds, bias not counted
    got = E.count_gflop(lambda: linear(conv(x).movedim(1, -1)))
    assert got * 1e9 == pytest.approx(hand, rel=1e-12)


def test_attention_is_counted_on_meta_as_its_matmuls():
    """4 B h L^2 d: q k^T and p v. (A real CPU runs a fused kernel that FlopCounterMode does not count.)"""
    B, h, L, d = 2, 3, 50, 8
    q = torch.randn(B, h, L, d, device="meta")
    assert E.count_gflop(lambda: F.scaled_dot_product_attention(q, q, q)) * 1e9 == 4 * B * h * L * L * d


def hand_count(module: nn.Module, call) -> int:
    """FLOPs of call() by formula, layer by layer, from the shapes seen by forward hooks: 2 x multiply-adds of
    each convolution and linear map, 4 B h L^2 d for each scaled_dot_product_attention, and for vdm.py's
    temporal attention with relative positions the four (T x T) products per position and head (q k^T, q a^K,
    p v, p a^V). An independent route to the same number as FlopCounterMode."""
    total = 0

    def layer(m, args, out):
        nonlocal total
        x = args[0]
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += 2 * out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += 2 * out.numel() * m.in_features
        elif isinstance(m, vdm.TemporalAttention):
            B, C, T, H, W = x.shape
            total += 4 * 2 * B * H * W * T * T * C

    def attention(q, k, v, *a, **kw):
        nonlocal total
        total += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        return sdpa(q, k, v, *a, **kw)

    sdpa = F.scaled_dot_product_attention
    hooks = [m.register_forward_hook(layer) for m in module.modules()]
    F.scaled_dot_product_attention = attention
    try:
        with torch.no_grad():
            call()
    finally:
        F.scaled_dot_product_attention = sdpa
        for hook in hooks:
            hook.remove()
    return total


def paper_scale(name):
    net = E.NETS[name]
    with torch.device("meta"):
        module, args = net.build(1).eval(), net.inputs(1, 1)
    return module, lambda: net.call(module, *args)


def test_vqvdm_table3_flop_ratio_at_paper_scale_is_the_hand_counted_one(monkeypatch):
    """The row's denoiser FLOP ratio (VDM base at 16x64^2 / VQ-VDM's U-Net at 4x16^2) is computed on meta; the
    same ratio from the per-layer hand count, on the papers' networks (a 399M and a 174M U-Net)."""
    vdm_flops, vq_flops = hand_count(*paper_scale("vdm_base")), hand_count(*paper_scale("vqvdm_unet"))
    assert E.gflop("vdm_base") * 1e9 == pytest.approx(vdm_flops, rel=1e-9)
    assert E.gflop("vqvdm_unet") * 1e9 == pytest.approx(vq_flops, rel=1e-9)
    for name in ("vdm_base", "vqvdm_unet", "vqvdm_decode"):
        assert E.millions(name) == round(sum(p.numel() for p in paper_scale(name)[0].parameters()) / 1e6, 2)
    # the row itself, with the timing replaced by a constant: only its FLOP columns are read here
    monkeypatch.setattr(E, "sampling_seconds", lambda s, eps_fn, x, sched, steps, repeats=1: [1.0] * repeats)
    monkeypatch.setattr(E, "once_seconds", lambda s, fn: 0.5)
    row = E.vqvdm_table3(E.setting(E.parser().parse_args(["--scale", "cpu", "--device", "cpu",
                                                           "--width-divisor", "64"])))
    assert row["flop_ratio"]["denoiser"] == round(vdm_flops / vq_flops, 2)
    assert row["gflop_per_call"]["vdm_base"] == float(f"{vdm_flops / 1e9:.4g}")


@pytest.mark.parametrize("divisor", [1, 4])
@pytest.mark.parametrize("name", list(E.NETS))
def test_every_network_runs_at_paper_and_cpu_widths(name, divisor):
    """On meta, in seconds: the presets as the two scales build them (the CPU test above shrinks the clips)."""
    assert E.gflop(name, divisor) > 0


def test_narrower_networks_keep_head_dimensions_and_split_evenly():
    shape = E.vdm_shape("base", 4)
    assert (shape.ch, shape.heads) == (38, 2)                       # 150 / 4 channels, 6 / 4 heads, rounded
    for stage in ("base", "sr"):
        for divisor in (1, 4, 16):
            s = E.vdm_shape(stage, divisor)
            assert all(s.ch * m % s.heads == 0 for m in s.mult)
    assert E.vdm_shape("sr", 1) == vdm.sr_shape(vdm.PRESETS["ucf256"])              # the paper scale is the preset
    assert E.lvdm_config(4).ch // E.lvdm_config(4).heads == lvdm.PRESETS["table2"].ch // lvdm.PRESETS["table2"].heads
    assert E.pvdm_config(4).ae_dim_head == pvdm.PRESETS["ucf256"].ae_dim_head
    assert E.vqvdm_config(4).ch // E.vqvdm_config(4).heads == \
        vqvdm.PRESETS["ucf128"].ch // vqvdm.PRESETS["ucf128"].heads
    assert E.videofusion_config(1) == dataclasses.replace(videofusion.PRESETS["ucf64"])


def test_sampling_time_is_the_fastest_timed_step_times_the_step_count(monkeypatch):
    """A fake clock that a network call moves by the next of the given durations: of 2 timed steps of 100 the
    faster counts (a busy machine only adds time), the warm-up step is left out, and with every step timed the
    run is the sum of its steps."""
    clock = {"now": 0.0, "calls": 0}
    durations = iter([9.0] + [3.0, 1.0] * 3 + [9.0] + [2.0] * 20)

    def eps_fn(x, t):
        clock["now"] += next(durations)
        clock["calls"] += 1
        return torch.zeros_like(x)

    monkeypatch.setattr(E.time, "perf_counter", lambda: clock["now"])
    s = E.setting(E.parser().parse_args(["--device", "cpu", "--timed-steps", "2"]))
    sched = Schedule.make("linear", 1000)
    assert E.sampling_seconds(s, eps_fn, torch.zeros(1, 3), sched, 100, repeats=3) == [100.0] * 3
    assert clock["calls"] == 1 + 3 * 2
    s.timed_steps = None                                       # --scale paper: every step, timed as one run
    assert E.sampling_seconds(s, eps_fn, torch.zeros(1, 3), sched, 20) == [40.0]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300))
def test_batch_search_finds_the_largest_batch_that_fits(fitting):
    tried = []

    def fits(B):
        tried.append(B)
        return B <= fitting

    assert E.largest_fitting(fits, limit=256) == min(fitting, 256)
    assert len(tried) <= 2 * math.log2(256) + 2


def test_peak_tflops_are_looked_up_by_card_name():
    assert E.peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert E.peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert E.peak_tflops("NVIDIA H200", None) == 66.9
    assert E.peak_tflops("NVIDIA GeForce RTX 3090 Ti", torch.bfloat16) is None


@pytest.mark.parametrize("argv, says", [
    (["--scale", "paper", "--device", "cpu"], "--scale paper needs a CUDA GPU"),
    (["--width-divisor", "0"], "--width-divisor must be an integer >= 1, got 0"),
    (["--only", "mcvd"], "invalid choice: 'mcvd'"),
    (["--precision", "fp16"], "invalid choice: 'fp16'"),
], ids=["paper-scale-on-cpu", "width-divisor-0", "unknown-protocol", "fp16"])
def test_a_users_mistake_is_one_error_line(argv, says, capsys, monkeypatch):
    def measure(s):     # an accepted mistake would start the protocols (hours for --scale paper on a CPU)
        raise AssertionError("a protocol started")
    monkeypatch.setattr(E, "PROTOCOLS", {name: measure for name in E.PROTOCOLS})
    status, out, err = run_cli(argv, capsys)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setattr(E, "PROTOCOLS", {})
    status, _, err = run_cli(["--device", "cuda"], capsys)
    assert status == 2 and err.startswith("error: --device cuda was asked for")


# --- GPU defects, seen on a CPU ---

def cpu_setting(*argv):
    return E.setting(E.parser().parse_args(["--device", "cpu", *argv]))


def test_compile_reaches_the_network_each_denoising_step_runs(one_thread, monkeypatch):
    """With --compile every denoising step of Table 4 goes through the compiled graph, VideoFusion's (a call of its
    eps method) as VDM*'s (a forward): a CPU backend counts the graphs it compiles and the calls into them. The
    U-Nets are cut to two levels of one block, at 4x16^2: tracing costs seconds per module."""
    small = dict(frames=4, resolution=16, base_mult=(1, 2), base_blocks=1, res_mult=(1, 2), res_blocks=1,
                 attn_res=(8,), temporal_res=(8,))
    config = E.videofusion_config
    monkeypatch.setattr(E, "videofusion_config", lambda d: dataclasses.replace(config(d), **small))
    counts = {"graphs": 0, "calls": 0}

    def counting(gm, example_inputs):
        counts["graphs"] += 1

        def run(*args):
            counts["calls"] += 1
            return gm.forward(*args)
        return run

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=counting))
    torch._dynamo.reset()
    s = cpu_setting("--width-divisor", "16", "--timed-steps", "2", "--compile")
    try:
        for name in ("videofusion", "vdm_star"):
            before = dict(counts)
            E.denoising_step_seconds(s, name, E.vf_schedule())
            assert counts["graphs"] > before["graphs"], name
            assert counts["calls"] - before["calls"] >= 1 + 2, name          # the warm-up step and 2 timed ones
    finally:
        torch._dynamo.reset()


class Memory:
    """A fake GPU: a training step at batch B needs B * per_sample bytes of activations beside the AdamW state
    that exists at that moment, and raises `error` past the cap."""

    def __init__(self, cap, per_sample, error):
        self.cap, self.per_sample, self.error, self.optimizers = cap, per_sample, error, []

    def state_bytes(self):
        opt = self.optimizers[-1]
        return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))

    def step_at(self, B):
        net = nn.Linear(8, 8)

        def loss(n):
            if B * self.per_sample + self.state_bytes() > self.cap:
                raise self.error
            return n(torch.ones(B, 8)).pow(2).mean()
        return E.train_step(cpu_setting(), net, [loss])


OOMS = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")]


def test_a_batch_fits_only_beside_the_optimizer_state(monkeypatch):
    """AdamW's state (2 x 72 parameters in fp32, + its step counts) appears inside the first step, after the
    backward: a trial of one step would pass batches that the second step, and every later one, cannot hold.
    (The failure is cuBLAS's, a plain RuntimeError.)"""
    memory = Memory(cap=1000, per_sample=100, error=OOMS[1])
    monkeypatch.setattr(E, "release", lambda: None)             # a garbage collection per trial, for CUDA's sake

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            memory.optimizers.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    # 4 x 100 + 584 bytes of state fit under 1000; 5 x 100 fits only while the state does not exist yet
    assert E.fits(memory.step_at, 4) and not E.fits(memory.step_at, 5)
    assert E.largest_fitting(lambda B: E.fits(memory.step_at, B), limit=64) == 4


def test_a_failure_that_is_not_memory_is_raised_by_the_batch_search():
    def step_at(B):
        def step():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step
    with pytest.raises(RuntimeError, match="illegal memory access"):
        E.fits(step_at, 1)


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(monkeypatch):
    """train_step over the 4 micro-batches of a batch hands AdamW the gradient of one step on the whole batch."""
    grads = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    x = torch.randn(12, 5)
    try:
        for parts in (1, 4):
            torch.manual_seed(0)
            net = nn.Linear(5, 3)
            E.train_step(cpu_setting(), net, [lambda n, x=x_: (n(x) - 1).pow(2).mean() for x_ in x.chunk(parts)])()
    finally:
        hook.remove()
    for whole, accumulated in zip(*grads):
        torch.testing.assert_close(accumulated, whole)


def test_table4_trains_in_the_fewest_micro_batches_at_which_both_networks_fit(monkeypatch):
    """Batch 32 that does not fit in micro-batches above 8 clips: both networks train as 4 micro-batches (the same
    for both, so their memory compares), and the row says so."""
    tried = []

    def training(s, name, c, sched, parts):
        tried.append((name, parts))
        if c.batch_size // parts > 8 or (name == "videofusion" and parts < 4):
            raise OOMS[1]
        return {"parts": parts}

    monkeypatch.setattr(E, "videofusion_training", training)
    c = E.videofusion_config(1)
    parts, trained = E.videofusion_trainings(cpu_setting(), c, E.vf_schedule())
    assert c.batch_size == 32 and parts == 4 and trained == {"vdm_star": {"parts": 4}, "videofusion": {"parts": 4}}
    assert tried == [("vdm_star", 1), ("vdm_star", 2), ("vdm_star", 4), ("videofusion", 4)]


@pytest.mark.parametrize("error", OOMS, ids=["torch", "cublas", "cudnn"])
def test_out_of_memory_is_recognised(error):
    assert E.out_of_memory(error)
    assert not E.out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not E.out_of_memory(ValueError("out of memory"))          # not an allocation failure of torch's


def test_a_protocol_out_of_memory_leaves_the_other_rows_and_the_table(toy_clips, one_thread, capsys, monkeypatch):
    """An out-of-memory protocol gives a row that says so and the next one runs; a failure of another kind stops
    the run with its traceback, after the table of the rows done."""
    def out_of_memory(s):
        raise OOMS[1]

    def broken(s):
        raise ValueError("a bug")

    monkeypatch.setattr(E, "PROTOCOLS", {"pvdm": out_of_memory, "vqvdm": E.vqvdm_table3, "lvdm": broken})
    capsys.readouterr()
    with pytest.raises(ValueError, match="a bug"):
        main(lambda: E.run(["--device", "cpu", "--width-divisor", "16", "--timed-steps", "1", "--repeats", "2"]))
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["protocol"] for r in rows] == ["PVDM Table 5", "VQ-VDM Table 3"]
    assert "CUBLAS_STATUS_ALLOC_FAILED" in rows[0]["out_of_memory"] and rows[1]["ours"]["vqvdm"]["runs"] == 2
    table = [line for line in lines if line.startswith("| ")]
    assert len(table) == 1 + 1 + 2 and all(line.count("|") == 9 for line in table)     # header, OOM, VQ x 2
    assert table[1].startswith("| PVDM Table 5 | out of memory |")


def test_cuda_settings_benchmark_cudnn_and_turn_tf32_off_through_the_new_api_alone():
    import warnings
    flags = ((torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "fp32_precision"),
             (torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cudnn.rnn, "fp32_precision"))
    before = [getattr(module, name) for module, name in flags]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            E.configure_cuda("fp32")
        assert torch.backends.cudnn.benchmark and not caught
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
    finally:
        for (module, name), value in zip(flags, before):
            setattr(module, name, value)


def test_cuda_settings_on_a_torch_before_the_new_api_use_the_old_flags_alone(monkeypatch):
    from types import SimpleNamespace
    matmul, cudnn = SimpleNamespace(allow_tf32=True), SimpleNamespace(allow_tf32=True, benchmark=False)
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    E.configure_cuda("bf16")
    assert cudnn.benchmark and matmul.allow_tf32 and cudnn.allow_tf32     # bf16: TF32 left as it is
    E.configure_cuda("fp32")
    assert vars(matmul) == {"allow_tf32": False} and vars(cudnn) == {"allow_tf32": False, "benchmark": True}


def test_rows_that_time_the_vdm_base_say_its_widths_are_not_multiples_of_8():
    assert "(base 150, 300)" in E.vdm_widths_guess(cpu_setting("--width-divisor", "1"))[0]
    assert E.vdm_widths_guess(cpu_setting("--width-divisor", "1"), ("sr",)) == []          # 32 x (1..16)
