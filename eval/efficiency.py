"""The four papers' efficiency claims against one pixel-space VDM baseline (vdm.py), measured side by side.

    python -m eval.efficiency                       # --scale cpu on a CPU, --scale paper on a GPU
    python -m eval.efficiency --scale cpu           # widths / 4, the papers' resolutions; 2 cores: ~4 minutes
    python -m eval.efficiency --only lvdm --precision bf16 --compile        # one protocol, on a GPU

Each protocol prints one JSON line; a Markdown table of all of them follows. A row holds the paper's numbers, ours,
the paper's ratio (baseline / method), our measured ratio and the ratio of forward FLOPs at the paper's scale for
the same work, counted by torch.utils.flop_counter.FlopCounterMode on the meta device: exact, independent of the
machine, and seconds to compute (no weights are made).
  pvdm         PVDM Table 5: seconds and peak memory to synthesise one 16x256^2 video, decoding included, PVDM-L at
               100/20-s, 200/200-s and 400/400-s (DDIM steps for the first / each later clip) against the VDM
               cascade (base 16x64^2, then SR to 256^2, 100 DDIM steps each); 128 frames; on a GPU the largest
               training batch under a 24 GiB cap (binary search)
  lvdm         LVDM Table 2: seconds per training step (forward, backward, AdamW; LVDM's frozen encoder included)
               at the per-GPU batch of 2, VDM base + SR against the Table 2 LVDM; #dims and #params
  vqvdm        VQ-VDM Table 3: 100 denoising steps at batch 1, one warm-up step, then --repeats timed runs (mean
               and std), VDM base at 16x64^2 against the VQ-VDM denoiser at 4x16^2, with and without the VQGAN decode
  videofusion  VideoFusion Table 4: seconds per denoising step at batch 1, and peak training memory at the ucf64
               preset's batch (GPU), VDM* (the base generator's widths with temporal attention, denoising every
               frame, as Table 4 defines it) against VideoFusion (base generator on the key frame + residual
               generator on every frame)
Scales: `paper` builds the papers' networks and times every step (meant for a GPU). `cpu` divides every width
and head count by --width-divisor (4; a head keeps its width) and never a resolution: small networks at small
resolutions are overhead-bound, so their time ratios would mean nothing. After one warm-up step it times
--timed-steps denoising steps of each sampler and --train-steps training steps one by one; the fastest counts
(other work on a machine only adds time) and a sampler's is multiplied by its step count (about 4 minutes on 2
cores). A CPU runs the 1x3x3 3D convolutions of the pixel and latent U-Nets through a slow generic kernel and its
time ratios differ from a GPU's: read them beside the FLOP ratio.

Memory is CUDA's max_memory_allocated / max_memory_reserved, in GiB (the papers' "GB"); on a CPU it is n/a. Each
training step also gives its achieved TFLOP/s, counted as 3x its forward FLOPs (backward ~ 2x forward; the frozen
encoder's forward once; recomputation by gradient checkpointing not counted), and on a GPU the MFU against the
card's dense peak for the precision (PEAK_TFLOPS; an unknown card gives null). fp32 means IEEE fp32 here: TF32 is
switched off, so that the peak to compare with is the fp32 one.

The papers do not publish their VDM baselines (LVDM Table 2 gives only a base at 16x64^2 and a super-resolution
stage of 397M + 48M parameters; PVDM Table 5, VQ-VDM Table 3 and VideoFusion Table 4 give no configuration):
vdm.py's presets are our reconstruction (a ~400M base at 16x64^2 as LVDM's "397M", a ~48M SR stage), and each row
lists this and its other guesses under "guesses".

A protocol that runs out of GPU memory (torch's OutOfMemoryError, or a cuBLAS/cuDNN allocation failure) gives a row
that says so, and the others still run; the table of the rows done is printed even when one fails otherwise. On a
GPU cuDNN picks its fastest convolution algorithm for each shape (cudnn.benchmark) for every network alike.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

# OpenMP reads its wait policy when torch loads it, hence before the import. Threads that spin while they wait hold
# the core another process needs, and every op stalls: beside one busy process on this 2-core machine a VQ-VDM
# U-Net step took 2-4.5 s spinning and 0.1-0.4 s passive. A user's own setting wins; an import (the tests) leaves
# the environment of its process, and of what that process starts, alone.
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import lvdm  # noqa: E402
import pvdm  # noqa: E402
import vdm  # noqa: E402
import videofusion  # noqa: E402
import vqvdm  # noqa: E402
from common.cli import Parser, main, number  # noqa: E402
from common.diffusion import Schedule, ddim_sample, ddim_timesteps  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.run import autocast, count_params, pick_device  # noqa: E402

GiB = 2 ** 30
STEPS = 100              # DDIM steps per sampling stage wherever a paper fixes no other number (T5's VDM, T3)
TRAIN_BATCH = 2          # LVDM Table 2's per-GPU batch (official configs/lvdm_short/ucf.yaml)
MEMORY_CAP_GIB = 24      # PVDM Table 5's card: a 3090Ti, 24 GB
LONG_FRAMES = 128        # PVDM Table 5's long videos

# dense TFLOP/s per card (vendor datasheets): (bf16 on tensor cores, fp32 without them); the first name that
# torch.cuda.get_device_name contains counts, so the PCIe H100 comes before the SXM one
PEAK_TFLOPS = {"H100 PCIe": (756.0, 51.2), "H100": (989.4, 66.9), "H200": (989.4, 66.9), "A100": (312.0, 19.5)}


# --- The papers' numbers ---

# PVDM Table 5 (one 3090Ti 24GB): (seconds, GB) per 16-frame and 128-frame 256^2 video; None: out of memory
PVDM_T5 = {"VDM 100/20-s": ((113, 11.1), None), "PVDM-S 100/20-s": ((7.88, 4.33), (31.3, 4.33)),
           "PVDM-L 200/200-s": ((20.4, 5.22), (166, 5.22)), "PVDM-L 400/400-s": ((40.9, 5.22), (328, 5.22))}
PVDM_T5_BATCH = {"VDM": 0, "PVDM-L": 2, "PVDM-S": 7}          # largest training batch at 16 frames
# LVDM Table 2 (8 V100s): step time in s (VDM: base + SR), #dims, #params in millions
LVDM_T2 = {"vdm_s": (3.3, 1.6), "lvdm_s": 0.8, "dims": {"VDM": "197k", "LVDM": "16k"},
           "params_m": {"VDM": (397, 48), "LVDM": (418, 19)}}
# VQ-VDM Table 3: seconds per 100 steps, mean and std of 10 runs
VQVDM_T3 = {"VDM 16x64x64": (35.26, 2.43), "VQ-VDM 16x128x128": (3.95, 0.01)}
# VideoFusion Table 4: (memory GB, latency s)
VIDEOFUSION_T4 = {"VDM*": (63.82, 0.40), "VideoFusion": (49.85, 0.17)}


# --- Where and how: the settings of one run ---

@dataclass
class Setting:
    scale: str
    device: torch.device
    dtype: Optional[torch.dtype]    # autocast dtype, None = fp32
    divisor: int                    # every width / divisor
    timed_steps: Optional[int]      # denoising steps timed per sampling run (None: all of them)
    train_steps: int                # training steps timed per network
    repeats: int                    # timed runs of VQ-VDM's 100-step protocol
    compile: bool
    load: float                     # the machine's 1-minute load average at the start: other work slows a CPU run

    def describe(self) -> str:
        if self.timed_steps is None:
            timing = f"every sampling step timed; the mean of {self.train_steps} training steps"
        else:
            timing = (f"{self.timed_steps} steps of each sampler and {self.train_steps} training steps timed one by "
                      f"one, the fastest counting (x the step count)")
        return (f"{self.scale} scale (widths / {self.divisor}, the papers' resolutions), "
                f"{'bf16' if self.dtype else 'fp32'}{', compiled' if self.compile else ''} on "
                f"{device_name(self.device)}{self.threads()}; {timing}; one warm-up step before each")

    def threads(self) -> str:
        if self.device.type != "cpu":
            return ""
        return f" ({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def log(text: str):
    print(f"efficiency: {text}", file=sys.stderr, flush=True)


# --- The networks, at a width divisor ---

def narrow(width: int, divisor: int, heads: int = 1) -> int:
    """width / divisor rounded to an even multiple of `heads` (attention must split it evenly, and a sinusoidal
    embedding of the width gives half of it to cos and half to sin), and at least that; divisor 1 keeps it."""
    step = math.lcm(2, heads)
    return width if divisor == 1 else max(step, round(width / divisor / step) * step)


def fewer(heads: int, divisor: int) -> int:
    """Heads / divisor: a narrower network keeps its head dimension, as a smaller model of one family does. With
    the heads kept instead, a head would be 4x narrower and the softmax over L^2 logits per head, which does not
    shrink with the width, would weigh 4x more than at the paper's scale."""
    return max(1, round(heads / divisor))


def vdm_config() -> vdm.Config:
    return vdm.PRESETS["ucf256"]     # the ucf64 base model, then SR 64^2 -> 256^2 (LVDM's "397+48M" VDM)


def vdm_shape(stage: str, divisor: int) -> vdm.UNetShape:
    shape = (vdm.base_shape if stage == "base" else vdm.sr_shape)(vdm_config())
    heads = fewer(shape.heads, divisor)
    return dataclasses.replace(shape, ch=narrow(shape.ch, divisor, heads), heads=heads)


def lvdm_config(divisor: int) -> lvdm.Config:
    c = lvdm.PRESETS["table2"]
    heads = fewer(c.heads, divisor)
    return dataclasses.replace(c, ch=narrow(c.ch, divisor, heads), heads=heads, ae_ch=narrow(c.ae_ch, divisor))


def pvdm_config(divisor: int) -> pvdm.Config:
    c = pvdm.PRESETS["ucf256"]       # PVDM-L; pvdm.py has no PVDM-S (nor has the official code)
    heads = fewer(c.heads, divisor)
    return dataclasses.replace(c, ch=narrow(c.ch, divisor, heads), heads=heads, ae_dim=narrow(c.ae_dim, divisor),
                               ae_heads=fewer(c.ae_heads, divisor), proj_heads=fewer(c.proj_heads, divisor),
                               proj_mlp=narrow(c.proj_mlp, divisor))


def vqvdm_config(divisor: int) -> vqvdm.Config:
    c = vqvdm.PRESETS["ucf128"]      # class-conditional on UCF-101's 101 classes, as `train` would set it
    heads = fewer(c.heads, divisor)
    return dataclasses.replace(c, num_classes=101, ch=narrow(c.ch, divisor, heads), heads=heads,
                               ae_ch=narrow(c.ae_ch, divisor))


def videofusion_config(divisor: int) -> videofusion.Config:
    c = videofusion.PRESETS["ucf64"]
    heads = fewer(c.heads, divisor)
    return dataclasses.replace(c, base_ch=narrow(c.base_ch, divisor, heads), res_ch=narrow(c.res_ch, divisor, heads),
                               heads=heads)


def vdm_star(c: videofusion.Config) -> videofusion.UNet:
    """Table 4's VDM*: "VDM re-implemented on the base generator of VideoFusion", i.e. the base generator's widths
    and depths as one video U-Net with the residual generator's temporal attention, denoising all N frames."""
    return videofusion.UNet(3, c.base_ch, c.base_mult, c.base_blocks, c.attn_res, c.resolution, c.heads,
                            c.dropout, 0, c.temporal_res)


def steps_tensor(B):
    return torch.full((B,), 500, dtype=torch.long)


def pvdm_planes(c: pvdm.Config, B: int):
    """(z_s, z_h, z_w) of one clip: (B, C, h, w), (B, C, T, w), (B, C, T, h)."""
    h = c.resolution // c.patch
    return (torch.randn(B, c.z_channels, h, h), torch.randn(B, c.z_channels, c.frames, h),
            torch.randn(B, c.z_channels, c.frames, h))


def vq_latent(c: vqvdm.Config, B: int):
    return torch.randn(B, c.z_channels, c.frames // c.ae_down_t, c.resolution // c.ae_down_s,
                       c.resolution // c.ae_down_s)


@dataclass
class Net:
    """One network as the protocols run it: how it is built at a width divisor, a batch of its inputs (made on
    the current default device) and the call that is one denoising step (or one decode, or one encode)."""
    build: Callable[[int], nn.Module]
    inputs: Callable[[int, int], tuple]            # (divisor, batch) -> arguments of call
    call: Callable = lambda m, *args: m(*args)


def video(B, c):
    return torch.rand(B, 3, c.frames, c.resolution, c.resolution) * 2 - 1


NETS = {
    "vdm_base": Net(lambda d: vdm.UNet3D(vdm_shape("base", d)),
                    lambda d, B: (video(B, vdm_config()), steps_tensor(B))),
    "vdm_sr": Net(lambda d: vdm.UNet3D(vdm_shape("sr", d)),
                  lambda d, B: (torch.randn(B, 6, vdm_config().frames, vdm_config().sr_resolution,
                                            vdm_config().sr_resolution), steps_tensor(B), steps_tensor(B))),
    "lvdm_unet": Net(lambda d: lvdm.UNet3D(lvdm_config(d)),
                     lambda d, B: (torch.randn(B, lvdm_config(d).z_channels, *latent_lhw(lvdm_config(d))),
                                   steps_tensor(B))),
    "lvdm_encode": Net(lambda d: lvdm.Autoencoder3D(lvdm_config(d)), lambda d, B: (video(B, lvdm_config(d)),),
                       lambda m, x: m.sample(x)),
    "pvdm_unet": Net(lambda d: pvdm.PlaneUNet(pvdm_config(d)),
                     lambda d, B: (pvdm_planes(pvdm_config(d), B), pvdm_planes(pvdm_config(d), B), steps_tensor(B))),
    "pvdm_decode": Net(lambda d: pvdm.ProjectedAutoencoder(pvdm_config(d)),
                       lambda d, B: (pvdm_planes(pvdm_config(d), B),), lambda m, z: m.decode(z)),
    "vqvdm_unet": Net(lambda d: vqvdm.UNet3D(vqvdm_config(d)),
                      lambda d, B: (vq_latent(vqvdm_config(d), B), steps_tensor(B), torch.full((B,), 25.0),
                                    torch.zeros(B, dtype=torch.long))),
    # the requantization before decoding (a nearest-code search, ~17 MFLOP) is timed but not counted: its
    # autocast guard cannot run on the meta device
    "vqvdm_decode": Net(lambda d: vqvdm.VQGAN3D(vqvdm_config(d)), lambda d, B: (vq_latent(vqvdm_config(d), B),),
                        lambda m, z: m.decode(z)),
    "videofusion": Net(lambda d: videofusion.VideoFusion(videofusion_config(d), vf_schedule()),
                       lambda d, B: (video(B, videofusion_config(d)), steps_tensor(B)), lambda m, x, t: m.eps(x, t)),
    "vdm_star": Net(lambda d: vdm_star(videofusion_config(d)),
                    lambda d, B: (video(B, videofusion_config(d)), steps_tensor(B))),
}


def latent_lhw(c: lvdm.Config):
    return c.frames // c.ae_down_t, c.resolution // c.ae_down_s, c.resolution // c.ae_down_s


def vf_schedule() -> Schedule:
    c = videofusion.PRESETS["ucf64"]
    return Schedule.make(c.schedule, c.timesteps)


# --- Counting: FLOPs on the meta device, parameters ---

def gflop(name: str, divisor: int = 1, batch: int = 1) -> float:
    """Forward GFLOP of one call of NETS[name] at a width divisor and batch, counted on the meta device: the
    shapes propagate and no weights or activations are made."""
    net = NETS[name]
    with torch.device("meta"):
        module, args = net.build(divisor).eval(), net.inputs(divisor, batch)
    return count_gflop(lambda: net.call(module, *args))


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of fn() as FlopCounterMode counts them: 2 per multiply-add of every matmul and convolution (bias,
    norms and elementwise work are not counted). Run on meta tensors, scaled_dot_product_attention decomposes
    into the matmuls it costs; on a real CPU its fused kernel would go uncounted. A causal mask counts as full
    attention, which is what the kernels compute."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def millions(name: str, divisor: int = 1) -> float:
    """Parameters (millions) of the module NETS[name] builds: a whole autoencoder for the _encode and _decode ones."""
    with torch.device("meta"):
        return round(count_params(NETS[name].build(divisor)) / 1e6, 2)


# --- Timing and memory ---

def elapsed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds of fn(), with the GPU's queue drained before and after (CUDA calls return before they finish)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Peak:
    """Peak CUDA memory within a `with` block, in GiB: {"allocated": ..., "reserved": ...}; None on a CPU."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda" and exc[0] is None:
            self.gib = {"allocated": round(torch.cuda.max_memory_allocated(self.device) / GiB, 2),
                        "reserved": round(torch.cuda.max_memory_reserved(self.device) / GiB, 2)}


def release():
    """Let go of the last protocol's networks before the next one is measured (peaks include what stays)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# how running out of GPU memory shows: torch's own error (torch.OutOfMemoryError from 2.5, torch.cuda's before), or
# a plain RuntimeError from a library that allocates for itself (cuBLAS's handle and workspace, cuDNN's workspace)
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)} - {None})
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, OOM_ERRORS) or (isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES))


def build(name: str, s: Setting, train: bool = False) -> nn.Module:
    """NETS[name] at the run's width divisor, initialised on the run's device (no CPU copy to make and move), in
    training or inference mode."""
    with torch.device(s.device):
        module = NETS[name].build(s.divisor)
    return module.train() if train else module.eval().requires_grad_(False)


def compiled(module: nn.Module, s: Setting):
    return torch.compile(module) if s.compile else module


def compiled_call(name: str, module: nn.Module, s: Setting) -> Callable:
    """NETS[name].call on module as one function, compiled with --compile. The call is compiled, not the module:
    VideoFusion's step is its eps method (forward, then compose), and torch.compile(module).eps would reach the
    original module's method and run it eagerly."""
    def call(*args):
        return NETS[name].call(module, *args)
    return torch.compile(call) if s.compile else call


def inputs(name: str, s: Setting, batch: int = 1) -> tuple:
    with torch.device(s.device):
        return NETS[name].inputs(s.divisor, batch)


def sampling_seconds(s: Setting, eps_fn, x_T, sched: Schedule, steps: int, repeats: int = 1) -> list:
    """Seconds for `steps` DDIM steps of eps_fn from x_T, one value per repeat, after one warm-up step. With
    s.timed_steps None every step is timed, as one run; otherwise s.timed_steps steps are timed one by one and
    typical() of them, times `steps`, counts (the cost of a step does not depend on t)."""
    ts = ddim_timesteps(sched.T, steps)

    def run(timesteps):
        return elapsed(s.device, lambda: ddim_sample(eps_fn, x_T, sched, timesteps))

    with torch.no_grad():
        run(ts[:1])                                                 # warm-up (and compile)
        if s.timed_steps is None:
            return [run(ts) for _ in range(repeats)]
        return [len(ts) * typical(s, [run(ts[i:i + 1]) for i in range(min(s.timed_steps, len(ts)))])
                for _ in range(repeats)]


def typical(s: Setting, seconds: list) -> float:
    """The fastest of some timed steps that stand for many (--timed-steps): other work on a machine only ever adds
    time, and on a shared 2-core machine one step of one network took 1.1 s or 8 s from minute to minute (its
    two OpenMP threads wait for each other when another process holds a core). With every step timed, the mean."""
    return min(seconds) if s.timed_steps is not None else statistics.mean(seconds)


def once_seconds(s: Setting, fn) -> float:
    """Seconds of one call of fn (a decode) after one warm-up call."""
    with torch.no_grad():
        elapsed(s.device, fn)
        return elapsed(s.device, fn)


def eps_of(s: Setting, fn):
    """An eps callable for the samplers: fn under the run's autocast, returned in float32, as the scripts do."""
    def eps_fn(x, t):
        with autocast(s.device, s.dtype):
            return fn(x, t).float()
    return eps_fn


def train_step(s: Setting, model: nn.Module, loss_fns: Sequence[Callable[[nn.Module], object]]):
    """One optimizer step as the scripts take it (common/train.py): each loss of loss_fns under autocast, then its
    backward, then AdamW. loss_fns are the micro-batches of one batch (usually one): their gradients accumulate,
    each loss divided by their number, as common/train.py's --accumulate does."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    net = compiled(model, s)

    def step():
        for loss_fn in loss_fns:
            with autocast(s.device, s.dtype):
                out = loss_fn(net)
            ((out["loss"] if isinstance(out, dict) else out) / len(loss_fns)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def training(s: Setting, model: nn.Module, loss_fns: Sequence[Callable], step_gflop: float) -> dict:
    """Seconds per training step (typical() of s.train_steps after one warm-up step, which also makes AdamW's state),
    peak memory, achieved TFLOP/s (step_gflop: 3x the forward of a trained network, backward being ~2x; 1x that
    of a frozen one) and MFU."""
    step = train_step(s, model, loss_fns)
    with Peak(s.device) as peak:
        elapsed(s.device, step)
        seconds = typical(s, [elapsed(s.device, step) for _ in range(s.train_steps)])
    tflops = step_gflop / seconds / 1e3
    return {"s": sig(seconds), "memory_gib": peak.gib, "tflops": sig(tflops), "mfu": mfu(s, tflops)}


def mfu(s: Setting, tflops: float) -> Optional[float]:
    """Achieved / peak dense TFLOP/s of the card at the run's precision; None on a CPU or an unknown card."""
    peak = peak_tflops(torch.cuda.get_device_name(s.device), s.dtype) if s.device.type == "cuda" else None
    return None if peak is None else round(tflops / peak, 4)


def peak_tflops(card: str, dtype: Optional[torch.dtype]) -> Optional[float]:
    """The dense peak of the first PEAK_TFLOPS entry whose name the card's contains, at bf16 or fp32 (None)."""
    peaks = next((p for key, p in PEAK_TFLOPS.items() if key in card), None)
    return None if peaks is None else peaks[0 if dtype == torch.bfloat16 else 1]


def largest_batch(s: Setting, step_at: Callable[[int], Callable[[], None]], limit: int = 256) -> int:
    """The largest batch whose training step fits in MEMORY_CAP_GIB (PVDM Table 5's 24 GB card); 0 when batch 1
    does not fit. step_at(B) returns one step at batch B."""
    total = torch.cuda.get_device_properties(s.device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP_GIB * GiB / total), s.device)

    try:
        return largest_fitting(lambda B: fits(step_at, B), limit)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, s.device)


def fits(step_at: Callable[[int], Callable[[], None]], B: int) -> bool:
    """Whether training at batch B fits in memory. Two steps are taken: AdamW makes its state (2 x the parameters, in
    fp32) inside the first step, after the backward has freed the activations, so only the second step holds
    activations, gradients and optimizer state at once, as every later step of a training run does."""
    try:
        step = step_at(B)
        step()
        step()
        ok = True
    except Exception as e:
        if not out_of_memory(e):
            raise
        ok = False
    release()            # after the except clause: until it ends, its traceback holds the batch's tensors
    return ok


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest B <= limit with fits(B), for a fits that holds up to some B and fails above it: doubling from
    1, then bisecting, about 2 log2(B) trials."""
    lo, hi = 0, 1                                   # fits(lo) holds (0 trivially); fits(hi) is unknown
    while hi <= limit and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, limit + 1)                         # now fits(hi) fails, or hi is past the limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def sig(x: float) -> float:
    """x to 4 significant digits: seconds and FLOPs span from milliseconds to hours between the scales."""
    return float(f"{x:.4g}")


def ratio(a, b) -> Optional[float]:
    return None if a is None or b is None else round(a / b, 2)


# --- PVDM Table 5: synthesising one 256^2 video ---

def vdm_cascade(s: Setting):
    """Seconds of the VDM cascade for one 16-frame video at STEPS DDIM steps per stage: base at 64^2, then SR to
    256^2 conditioned on the base output, noised to vdm.generate's default level and upsampled
    (vdm.sr_condition); and the peak memory, with both networks resident."""
    c = vdm_config()
    sched = Schedule.make(c.schedule, c.timesteps)
    base, sr = compiled(build("vdm_base", s), s), compiled(build("vdm_sr", s), s)
    with torch.device(s.device):
        x_base = torch.randn(1, 3, c.frames, c.resolution, c.resolution)
        x_sr = torch.randn(1, 3, c.frames, c.sr_resolution, c.sr_resolution)
        level = torch.full((1,), vdm.sr_level(None, c), dtype=torch.long)
    with Peak(s.device) as peak:
        base_s = sampling_seconds(s, vdm.eps_function(base, sched, dtype=s.dtype), x_base, sched, STEPS)[0]
        cond = vdm.sr_condition(sched, x_base, c.sr_resolution, level, torch.randn_like(x_base))   # base output
        sr_eps = vdm.eps_function(sr, sched, cond=cond, s=level, prediction=c.sr_prediction, dtype=s.dtype)
        sr_s = sampling_seconds(s, sr_eps, x_sr, sched, STEPS)[0]
    return base_s, sr_s, peak.gib


def pvdm_table5(s: Setting) -> dict:
    c = pvdm_config(s.divisor)
    log("PVDM Table 5: the VDM cascade")
    base_s, sr_s, vdm_gib = vdm_cascade(s)
    vdm_16 = base_s + sr_s
    release()
    log("PVDM Table 5: PVDM-L")
    unet, ae = compiled(build("pvdm_unet", s), s), build("pvdm_decode", s)
    sched = Schedule.make(c.schedule, c.timesteps)
    planes = inputs("pvdm_decode", s)[0]
    z_T, shapes = pvdm.flat(planes), [p.shape[1:] for p in planes]
    cond = pvdm.unflat(torch.zeros_like(z_T), shapes)      # the first clip's zero condition; later clips: z_0^{l-1}
    eps_fn = eps_of(s, lambda z, t: pvdm.flat(unet(pvdm.unflat(z, shapes), cond, t)))
    with Peak(s.device) as peak:
        # a step costs the same whatever its t and its condition (zeros or the previous clip's latent): the
        # seconds of one over a 100-step run price every N/M setting
        step_s = sampling_seconds(s, eps_fn, z_T, sched, STEPS)[0] / STEPS
        decode_s = once_seconds(s, lambda: ae.decode(pvdm.unflat(z_T, shapes)))
    v = vdm_config()
    clips, vdm_clips = math.ceil(LONG_FRAMES / c.frames), math.ceil(LONG_FRAMES / v.frames)
    ours, flops = {}, {}
    g = {name: gflop(name) for name in ("vdm_base", "vdm_sr", "pvdm_unet", "pvdm_decode")}
    vdm_flop = STEPS * (g["vdm_base"] + g["vdm_sr"])
    for N, M in ((100, 20), (200, 200), (400, 400)):
        key = f"{N}/{M}-s"
        ours[key] = {"s_16": sig(N * step_s + decode_s),
                     "s_128": sig((N + (clips - 1) * M) * step_s + clips * decode_s)}
        flops[key] = round(vdm_flop / (N * g["pvdm_unet"] + g["pvdm_decode"]), 2)
    train_batch = "n/a on CPU"
    if s.device.type == "cuda":
        release()
        log("PVDM Table 5: largest training batches under 24 GiB")
        train_batch = pvdm_train_batches(s)
    paper_vdm = PVDM_T5["VDM 100/20-s"][0][0]
    return {
        "protocol": "PVDM Table 5",
        "measures": "seconds (and peak GiB) to synthesise one 256x256 video of 16 (and 128) frames at batch 1, "
                    "decoding included; the largest training batch at 16 frames under 24 GiB",
        "paper": {"video_16": {k: v[0] for k, v in PVDM_T5.items()},
                  "video_128": {k: v[1] for k, v in PVDM_T5.items()}, "train_batch": PVDM_T5_BATCH,
                  "device": "one RTX 3090Ti 24GB", "value": "(seconds, GB)"},
        "paper_ratio": {"100/20-s": ratio(paper_vdm, PVDM_T5["PVDM-S 100/20-s"][0][0]),
                        "200/200-s": ratio(paper_vdm, PVDM_T5["PVDM-L 200/200-s"][0][0]),
                        "400/400-s": ratio(paper_vdm, PVDM_T5["PVDM-L 400/400-s"][0][0])},
        "ours": {"vdm": {"s_16": sig(vdm_16), "base_s": sig(base_s), "sr_s": sig(sr_s),
                         "memory_gib": vdm_gib, "s_128_lower_bound": sig(vdm_clips * vdm_16)},
                 "pvdm_l": {**ours, "memory_gib": peak.gib, "decode_s": sig(decode_s),
                            "step_s": sig(step_s)},
                 "train_batch": train_batch},
        "ratio": {k: ratio(vdm_16, v["s_16"]) for k, v in ours.items()},
        "flop_ratio": flops,
        "gflop_per_call": {k: sig(v) for k, v in g.items()},
        "params_m": {name: millions(name) for name in ("vdm_base", "vdm_sr", "pvdm_unet", "pvdm_decode")},
        "config": {"setting": s.describe(),
                   "models": "VDM: vdm.py ucf64 base + SR to 256^2 (ours: a guess); PVDM-L: pvdm.py ucf256",
                   "vdm": f"vdm.py ucf256: base {vdm_shape_text('base', s)} at {v.frames}x{v.resolution}^2, then "
                          f"SR {vdm_shape_text('sr', s)} at {v.frames}x{v.sr_resolution}^2, {STEPS} DDIM steps each",
                   "pvdm": f"pvdm.py ucf256 (PVDM-L) at width / {s.divisor}; seconds = steps x (seconds per step "
                           f"over a {STEPS}-step run) + one decode per clip; {LONG_FRAMES} frames are {clips} clips "
                           f"of {c.frames} (Alg. 1: N steps for the first, M for each later one)"},
        "guesses": [f"the paper's VDM configuration (one 256^2 model or a cascade) is not published: ours, "
                    f"vdm.py's base + SR cascade, costs {(g['vdm_base'] + g['vdm_sr']) / 1e3:.1f} TFLOP per step; "
                    f"Table 5's 113 s for 100 steps on a 3090Ti is ~1.1 s a step, which fits a network of 4-7 TFLOP "
                    f"a step (a 64^2 base + SR cascade, or a small model at 256^2), not a ~400M one at 256^2",
                    "the 100/20-s comparison runs PVDM-L: pvdm.py (like the official code) has no PVDM-S",
                    f"VDM at {LONG_FRAMES} frames is out of memory in the paper and vdm.py has no long-video "
                    f"sampler: ours is a lower bound, {vdm_clips} independent {v.frames}-frame cascades",
                    "the paper's memory tool is unknown; ours is torch's peak allocated and reserved",
                    *vdm_widths_guess(s)],
    }


def vdm_widths_guess(s: Setting, stages=("base", "sr")) -> list:
    """A guess to state where a row times VDM stages with channel counts that are not multiples of 8."""
    odd = {stage: [shape.ch * m for m in shape.mult if shape.ch * m % 8]
           for stage, shape in ((stage, vdm_shape(stage, s.divisor)) for stage in stages)}
    text = "; ".join(f"{stage} {', '.join(map(str, widths))}" for stage, widths in odd.items() if widths)
    return [f"VDM widths that are not multiples of 8 ({text}) run through padded or slower tensor-core kernels in "
            f"bf16, which may slow the baseline; they are kept: ch 150 reconstructs LVDM's 397M base (ours 399.0M), "
            f"and other widths would change its size"] if text else []


def vdm_shape_text(stage: str, s: Setting) -> str:
    shape = vdm_shape(stage, s.divisor)
    return f"{millions('vdm_' + stage, s.divisor)}M (ch {shape.ch}, heads {shape.heads})"


def pvdm_train_batches(s: Setting) -> dict:
    """Largest training batch of each network under the cap: PVDM-L's denoiser with its frozen encoder inside
    (pvdm.diffusion_loss on pairs of clips), and each VDM stage (the cascade's stages train separately)."""
    c, v = pvdm_config(s.divisor), vdm_config()
    sched_p, sched_v = Schedule.make(c.schedule, c.timesteps), Schedule.make(v.schedule, v.timesteps)
    s = dataclasses.replace(s, compile=False)     # each trial builds a new network: --compile would compile each

    def pvdm_at(B):
        unet, ae = build("pvdm_unet", s, train=True), build("pvdm_decode", s)
        with torch.device(s.device):
            pair = torch.rand(B, 3, 2 * c.frames, c.resolution, c.resolution) * 2 - 1
        return train_step(s, unet, [lambda net: pvdm.diffusion_loss(net, sched_p, ae, pair, c.lam)])

    def vdm_at(stage):
        def at(B):
            net = build(f"vdm_{stage}", s, train=True)
            size = v.resolution if stage == "base" else v.sr_resolution
            with torch.device(s.device):
                x0 = torch.rand(B, 3, v.frames, size, size) * 2 - 1
            if stage == "base":
                return train_step(s, net, [lambda n: vdm.base_loss(n, sched_v, x0)])
            return train_step(s, net, [lambda n: vdm.sr_loss(n, sched_v, x0, v.resolution, v.sr_aug_max,
                                                             v.sr_prediction)])
        return at

    return {"pvdm_l": largest_batch(s, pvdm_at), "vdm_base": largest_batch(s, vdm_at("base")),
            "vdm_sr": largest_batch(s, vdm_at("sr"))}


# --- LVDM Table 2: a training step ---

def lvdm_table2(s: Setting) -> dict:
    B, v, c = TRAIN_BATCH, vdm_config(), lvdm_config(s.divisor)
    sched_v = Schedule.make(v.schedule, v.timesteps)
    ours = {}
    log("LVDM Table 2: VDM base training step")
    with torch.device(s.device):
        x_base = torch.rand(B, 3, v.frames, v.resolution, v.resolution) * 2 - 1
        x_sr = torch.rand(B, 3, v.frames, v.sr_resolution, v.sr_resolution) * 2 - 1
    ours["vdm_base"] = training(s, build("vdm_base", s, train=True), [lambda n: vdm.base_loss(n, sched_v, x_base)],
                                3 * gflop("vdm_base", s.divisor, B))
    release()
    log("LVDM Table 2: VDM SR training step")
    ours["vdm_sr"] = training(s, build("vdm_sr", s, train=True),
                              [lambda n: vdm.sr_loss(n, sched_v, x_sr, v.resolution, v.sr_aug_max, v.sr_prediction)],
                              3 * gflop("vdm_sr", s.divisor, B))
    release()
    log("LVDM Table 2: LVDM training step, frozen encoder included")
    unet, ae = build("lvdm_unet", s, train=True), build("lvdm_encode", s)
    sched_l = Schedule.make(c.schedule, c.timesteps, beta_end=c.beta_end)
    with torch.device(s.device):
        x = video(B, c)

    def lvdm_loss(net):           # lvdm.py's `encode`, then Eq. (7): the encoder runs inside every step
        with torch.no_grad():
            z0 = unet.to_diffusion(ae.sample(x))
        return lvdm.short_loss(net, sched_l, z0, c)

    ours["lvdm"] = training(s, unet, [lvdm_loss],
                            3 * gflop("lvdm_unet", s.divisor, B) + gflop("lvdm_encode", s.divisor, B))
    vdm_s = ours["vdm_base"]["s"] + ours["vdm_sr"]["s"]
    g = {name: gflop(name) for name in ("vdm_base", "vdm_sr", "lvdm_unet", "lvdm_encode")}
    dims = {"vdm": 3 * v.frames * v.resolution ** 2, "lvdm": c.z_channels * math.prod(latent_lhw(c))}
    paper_vdm = sum(LVDM_T2["vdm_s"])
    return {
        "protocol": "LVDM Table 2",
        "measures": f"seconds per training step (forward, backward, AdamW) at batch {B} per GPU; VDM: base step + "
                    f"SR step; LVDM: its frozen 3D encoder runs inside the step",
        "paper": {**LVDM_T2, "device": "8 V100s (per-GPU step)"},
        "paper_ratio": ratio(paper_vdm, LVDM_T2["lvdm_s"]),
        "ours": {**ours, "vdm_s": sig(vdm_s), "dims": dims,
                 "params_m": {name: millions(name) for name in ("vdm_base", "vdm_sr", "lvdm_unet", "lvdm_encode")},
                 "params_m_measured": {name: millions(name, s.divisor)
                                       for name in ("vdm_base", "vdm_sr", "lvdm_unet", "lvdm_encode")}},
        "ratio": ratio(vdm_s, ours["lvdm"]["s"]),
        "flop_ratio": round((3 * g["vdm_base"] + 3 * g["vdm_sr"]) / (3 * g["lvdm_unet"] + g["lvdm_encode"]), 2),
        "gflop_per_call": {k: sig(v) for k, v in g.items()},
        "config": {"setting": s.describe(),
                   "models": "VDM: vdm.py ucf64 base + SR to 256^2 (ours: a guess); LVDM: lvdm.py table2",
                   "vdm": f"vdm.py ucf256: base {vdm_shape_text('base', s)}, SR {vdm_shape_text('sr', s)}, "
                          f"gradient checkpointing as the presets (on)",
                   "lvdm": f"lvdm.py table2 (U-Net 418M + autoencoder 19M at paper scale) at width / {s.divisor}; "
                           f"encoder posterior sampled as in training",
                   "flops": "training = 3 x forward (+ 1 x the frozen encoder's forward); TFLOP/s likewise"},
        "guesses": ["the paper's VDM base and SR networks are in a supplement we lack: ours are vdm.py's presets "
                    "(399M + 48M against the paper's 397M + 48M)",
                    "'Step Time' is undefined in the paper (§4.2); we read it as a training step: a sampling step of "
                    "one 4x32^2 latent clip would take far less than its 0.8 s",
                    "batch 2 per GPU for both, from LVDM's official config; VDM's is not published",
                    "no gradient clipping or EMA update is timed", *vdm_widths_guess(s)],
    }


# --- VQ-VDM Table 3: 100 sampling steps ---

def vqvdm_table3(s: Setting) -> dict:
    v, c = vdm_config(), vqvdm_config(s.divisor)
    log(f"VQ-VDM Table 3: VDM base, {s.repeats} runs")
    base = compiled(build("vdm_base", s), s)
    with torch.device(s.device):
        x = torch.randn(1, 3, v.frames, v.resolution, v.resolution)
    sched_v = Schedule.make(v.schedule, v.timesteps)
    vdm_s = sampling_seconds(s, vdm.eps_function(base, sched_v, dtype=s.dtype), x, sched_v, STEPS, s.repeats)
    release()
    log(f"VQ-VDM Table 3: VQ-VDM, {s.repeats} runs")
    unet, vq = compiled(build("vqvdm_unet", s), s), build("vqvdm_decode", s)
    z_T, t, fps, label = inputs("vqvdm_unet", s)
    vq_s = sampling_seconds(s, eps_of(s, lambda z, t: unet(z, t, fps, label)), z_T,
                            Schedule.make(c.schedule, c.timesteps), STEPS, s.repeats)
    decode_s = once_seconds(s, lambda: vq.decode(vq.quantize(z_T)))    # as vqvdm.generate: snap to codes, decode
    with_decode = [x + decode_s for x in vq_s]
    g = {name: gflop(name) for name in ("vdm_base", "vqvdm_unet", "vqvdm_decode")}
    mean = {"vdm": statistics.mean(vdm_s), "vqvdm": statistics.mean(vq_s), "vqvdm_decode": statistics.mean(with_decode)}
    return {
        "protocol": "VQ-VDM Table 3",
        "measures": f"seconds for {STEPS} denoising steps at batch 1 (mean and std of {s.repeats} runs after one "
                    f"warm-up step); VQ-VDM also with the VQGAN decode",
        "paper": {"s_100_steps": VQVDM_T3, "value": "(mean, std) of 10 runs", "device": "not stated"},
        "paper_ratio": ratio(VQVDM_T3["VDM 16x64x64"][0], VQVDM_T3["VQ-VDM 16x128x128"][0]),
        "ours": {"vdm": spread(vdm_s), "vqvdm": spread(vq_s), "vqvdm_with_decode": spread(with_decode),
                 "decode_s": sig(decode_s)},
        "ratio": {"denoiser": ratio(mean["vdm"], mean["vqvdm"]), "with_decode": ratio(mean["vdm"],
                                                                                      mean["vqvdm_decode"])},
        "flop_ratio": {"denoiser": round(g["vdm_base"] / g["vqvdm_unet"], 2),
                       "with_decode": round(STEPS * g["vdm_base"] / (STEPS * g["vqvdm_unet"] + g["vqvdm_decode"]),
                                            2)},
        "gflop_per_call": {k: sig(v) for k, v in g.items()},
        "params_m": {name: millions(name) for name in ("vdm_base", "vqvdm_unet", "vqvdm_decode")},
        "config": {"setting": s.describe(),
                   "models": "VDM: vdm.py ucf64 base (ours: a guess); VQ-VDM: vqvdm.py ucf128 (our widths)",
                   "vdm": f"vdm.py ucf64 base {vdm_shape_text('base', s)} at {v.frames}x{v.resolution}^2, DDIM",
                   "vqvdm": f"vqvdm.py ucf128 U-Net on {'x'.join(map(str, z_T.shape[2:]))} latents of "
                            f"{c.z_channels} channels ({c.frames}x{c.resolution}^2 video), class- and fps-conditional, "
                            f"one pass per step (no guidance), width / {s.divisor}"},
        "guesses": ["the paper's 'reproduced implementation' of VDM is not published: ours is vdm.py's ucf64 base",
                    "the paper's sampler, batch, GPU and whether decoding is included are not stated; both are "
                    "given", "with Eq. (9) guidance VQ-VDM would run two passes per step",
                    *vdm_widths_guess(s, ("base",))],
    }


def spread(values: list) -> dict:
    return {"mean_s": sig(statistics.mean(values)),
            "std_s": sig(statistics.stdev(values)) if len(values) > 1 else None, "runs": len(values)}


# --- VideoFusion Table 4: latency per step, training memory ---

def videofusion_table4(s: Setting) -> dict:
    c = videofusion_config(s.divisor)
    sched = vf_schedule()
    ours, parts = {}, None
    for name, label in (("vdm_star", "VDM*"), ("videofusion", "VideoFusion")):
        log(f"VideoFusion Table 4: {label}")
        ours[name] = {"step_s": sig(denoising_step_seconds(s, name, sched))}
        release()
    if s.device.type == "cuda":     # on a CPU there is no peak to read, and batch 32 would take minutes a step
        parts, trained = videofusion_trainings(s, c, sched)
        for name, result in trained.items():
            ours[name]["train"] = result
    training_text = f"batch {c.batch_size}" + (f" as {parts} micro-batches, gradients accumulated (the whole batch "
                                               f"at once ran out of memory)" if parts and parts > 1 else "")
    g = {name: gflop(name) for name in ("vdm_star", "videofusion")}
    memory = [ours[n].get("train", {}).get("memory_gib") for n in ("vdm_star", "videofusion")]
    paper = VIDEOFUSION_T4
    return {
        "protocol": "VideoFusion Table 4",
        "measures": f"seconds per denoising step at batch 1 (a {STEPS}-step run / {STEPS}); peak training memory at "
                    f"{training_text} (GPU)",
        "paper": {"memory_gb_latency_s": paper, "device": "not stated (63.82 GB needs an 80 GB card)"},
        "paper_ratio": {"latency": ratio(paper["VDM*"][1], paper["VideoFusion"][1]),
                        "memory": ratio(paper["VDM*"][0], paper["VideoFusion"][0])},
        "ours": {**ours, "train_micro_batches": parts},
        "ratio": {"latency": ratio(ours["vdm_star"]["step_s"], ours["videofusion"]["step_s"]),
                  "memory": ratio(*(m and m["allocated"] for m in memory))},
        "flop_ratio": round(g["vdm_star"] / g["videofusion"], 2),
        "gflop_per_call": {k: sig(v) for k, v in g.items()},
        "params_m": {name: millions(name) for name in ("vdm_star", "videofusion")},
        "config": {"setting": s.describe(), "models": "VDM* and VideoFusion: videofusion.py ucf64 (our widths)",
                   "videofusion": f"videofusion.py ucf64 (base generator on the key frame + residual generator on "
                                  f"16 frames, 64^2 pixels) at width / {s.divisor}",
                   "vdm_star": "the base generator's widths and depths with temporal attention at the residual "
                               "generator's levels, on all 16 frames (built here from videofusion.UNet)"},
        "guesses": ["VideoFusion's network sizes are not published: ucf64's are ours, so is VDM* built on them",
                    f"Table 4's batch, resolution and GPU are not stated: latency at batch 1, memory at ucf64's "
                    f"batch {c.batch_size}, 16x64^2"],
    }


def denoising_step_seconds(s: Setting, name: str, sched: Schedule) -> float:
    """Seconds per DDIM step of NETS[name] at batch 1, over a STEPS-step run (compiled with --compile)."""
    call = compiled_call(name, build(name, s), s)
    x, _ = inputs(name, s)
    return sampling_seconds(s, eps_of(s, call), x, sched, STEPS)[0] / STEPS


def videofusion_trainings(s: Setting, c: videofusion.Config, sched: Schedule) -> tuple:
    """(micro-batches, {name: training()}) for VDM* and VideoFusion at the preset's batch: the whole batch at once,
    else as 2, 4, ... micro-batches with the gradients accumulated, the fewest at which both fit, the same for both
    so that their memory compares like with like. In fp32 at batch 32 VDM* saves ~115 GiB of activations (~66 GiB
    for VideoFusion, counted on the meta device): more than an 80 GB card holds."""
    parts = 1
    while True:
        try:
            return parts, {name: videofusion_training(s, name, c, sched, parts) for name in ("vdm_star", "videofusion")}
        except Exception as e:
            if not out_of_memory(e) or parts >= c.batch_size:
                raise
        release()            # after the except clause: until it ends, its traceback holds the step's tensors
        parts *= 2
        log(f"VideoFusion Table 4: out of memory; training again as {parts} micro-batches")


def videofusion_training(s: Setting, name: str, c: videofusion.Config, sched: Schedule, parts: int = 1) -> dict:
    """A training step of VDM* (plain eps loss) or VideoFusion (its §3.3 loss) at the preset's batch, as `parts`
    micro-batches whose gradients accumulate."""
    model = build(name, s, train=True)
    with torch.device(s.device):
        x0 = video(c.batch_size, c)

    def loss(x):
        if name == "videofusion":
            return lambda net: videofusion.diffusion_loss(net, model, sched, x, None, c.p_uncond)
        return lambda net: vdm.base_loss(net, sched, x)
    return training(s, model, [loss(x) for x in x0.chunk(parts)], 3 * gflop(name, s.divisor, c.batch_size))


# --- Output ---

PROTOCOLS = {"pvdm": pvdm_table5, "lvdm": lvdm_table2, "vqvdm": vqvdm_table3, "videofusion": videofusion_table4}
PROTOCOL_NAMES = {"pvdm": "PVDM Table 5", "lvdm": "LVDM Table 2", "vqvdm": "VQ-VDM Table 3",
                  "videofusion": "VideoFusion Table 4"}


def fmt(x, unit="") -> str:
    return "n/a" if x is None else f"{x:g}{unit}"


def markdown(rows: list, s: Setting) -> str:
    """The rows as one table: baseline / method, the paper's and ours, each ratio baseline / method."""
    lines = ["| protocol | quantity | paper: baseline / method | paper ratio | ours: baseline / method | our ratio | "
             "FLOP ratio at paper scale | our models |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "out_of_memory" in row:
            message = row["out_of_memory"].replace("|", "/")
            lines.append(f"| {row['protocol']} | out of memory | | | {message} | | | |")
            continue
        first, *more = markdown_lines(row)
        lines += [f"{first} {row['config']['models']} |"] + [f"{line} |" for line in more]
    return "\n".join(lines + ["", f"Measured at {s.describe()}; load average {s.load} at the start "
                                   f"({os.cpu_count()} cores)."])


def markdown_lines(row: dict) -> list:
    p, o, r, f = row["paper"], row["ours"], row["ratio"], row["flop_ratio"]
    name = row["protocol"]
    if name == "PVDM Table 5":
        vdm_s, vdm_gb = p["video_16"]["VDM 100/20-s"]
        out = []
        for key, method in (("100/20-s", "PVDM-S 100/20-s"), ("200/200-s", "PVDM-L 200/200-s"),
                            ("400/400-s", "PVDM-L 400/400-s")):
            ps, pgb = p["video_16"][method]
            out.append(f"| {name} | s per 16x256² video, {key} | VDM {vdm_s} / {method.split()[0]} {ps} "
                       f"({vdm_gb} / {pgb} GB) | {row['paper_ratio'][key]}x | VDM {o['vdm']['s_16']:g} / PVDM-L "
                       f"{o['pvdm_l'][key]['s_16']:g} | {r[key]}x | {f[key]}x |")
            out.append(f"| {name} | s per 128x256² video, {key} | N/A (OOM) / {p['video_128'][method][0]} | n/a | "
                       f"VDM >= {o['vdm']['s_128_lower_bound']:g} / PVDM-L {o['pvdm_l'][key]['s_128']:g} | "
                       f">= {ratio(o['vdm']['s_128_lower_bound'], o['pvdm_l'][key]['s_128'])}x | |")
        batch = o["train_batch"]
        ours = batch if isinstance(batch, str) else f"VDM base {batch['vdm_base']}, SR {batch['vdm_sr']} / " \
                                                    f"PVDM-L {batch['pvdm_l']}"
        b = p["train_batch"]
        return out + [f"| {name} | largest training batch, 24 GiB | VDM {b['VDM']} / PVDM-L {b['PVDM-L']}, "
                      f"PVDM-S {b['PVDM-S']} | | {ours} | | |"]
    if name == "LVDM Table 2":
        base, sr = p["vdm_s"]
        return [f"| {name} | s per training step, batch 2 | VDM {base}+{sr} / LVDM {p['lvdm_s']} | "
                f"{row['paper_ratio']}x | VDM {o['vdm_base']['s']:g}+{o['vdm_sr']['s']:g} / LVDM {o['lvdm']['s']:g} "
                f"| {r}x | {f}x |"]
    if name == "VQ-VDM Table 3":
        (vm, vs), (qm, qs) = p["s_100_steps"].values()
        return [f"| {name} | s per {STEPS} steps{extra} | VDM {vm}±{vs} / VQ-VDM {qm}±{qs} | {row['paper_ratio']}x | "
                f"VDM {spread_text(o['vdm'])} / VQ-VDM {spread_text(o[key])} | {r[kind]}x | {f[kind]}x |"
                for extra, key, kind in (("", "vqvdm", "denoiser"), (", + decode", "vqvdm_with_decode",
                                                                     "with_decode"))]
    (vm, vl), (fm, fl) = p["memory_gb_latency_s"].values()
    mem = [o[n].get("train", {}).get("memory_gib") for n in ("vdm_star", "videofusion")]
    mem_text = "n/a on CPU" if None in mem else f"VDM* {mem[0]['allocated']} / VideoFusion {mem[1]['allocated']}"
    return [f"| {name} | s per denoising step | VDM* {vl} / VideoFusion {fl} | {row['paper_ratio']['latency']}x | "
            f"VDM* {o['vdm_star']['step_s']:g} / VideoFusion {o['videofusion']['step_s']:g} | {r['latency']}x | "
            f"{f}x |",
            f"| {name} | peak training memory, GB (ours GiB) | VDM* {vm} / VideoFusion {fm} | "
            f"{row['paper_ratio']['memory']}x | {mem_text} | {fmt(r['memory'], 'x')} | |"]


def spread_text(x: dict) -> str:
    return f"{x['mean_s']:g}" + ("" if x["std_s"] is None else f"±{x['std_s']:g}")


# --- Command line ---

def parser():
    p = Parser(prog="python -m eval.efficiency", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="auto", choices=["auto", "cpu", "paper"],
                   help="paper: the papers' networks, every step timed (GPU); cpu: widths / 4, a few steps timed "
                        "(default: paper on CUDA, cpu otherwise)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32 as in the papers' era (TF32 off), or bf16 autocast (default: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the timed networks")
    p.add_argument("--only", default=None, choices=list(PROTOCOLS), help="run one protocol (default: all four)")
    p.add_argument("--width-divisor", type=number(int, lo=1), default=None,
                   help="divide every network width and head count by this (default: 4 at --scale cpu, 1 at "
                        "--scale paper)")
    p.add_argument("--timed-steps", type=number(int, lo=1), default=None,
                   help="denoising steps timed per sampler, the rest extrapolated (default: 3 at --scale cpu, "
                        "every step at --scale paper)")
    p.add_argument("--train-steps", type=number(int, lo=1), default=None,
                   help="training steps timed per network after one warm-up (default: 2 at --scale cpu, 5 at "
                        "--scale paper)")
    p.add_argument("--repeats", type=number(int, lo=1), default=None,
                   help="timed runs of VQ-VDM Table 3's 100 steps (default: 10 as the paper, 3 at --scale cpu)")
    return p


def setting(args) -> Setting:
    device = pick_device(args.device)
    scale = args.scale if args.scale != "auto" else ("paper" if device.type == "cuda" else "cpu")
    if scale == "paper" and device.type != "cuda":
        raise UserError("--scale paper needs a CUDA GPU (the papers' networks take minutes per step on a CPU): "
                        "use --scale cpu")
    cpu = scale == "cpu"
    if device.type == "cuda":
        configure_cuda(args.precision)
    return Setting(scale=scale, device=device, dtype=torch.bfloat16 if args.precision == "bf16" else None,
                   divisor=args.width_divisor or (4 if cpu else 1),
                   timed_steps=args.timed_steps or (3 if cpu else None),
                   train_steps=args.train_steps or (2 if cpu else 5), repeats=args.repeats or (3 if cpu else 10),
                   compile=args.compile, load=round(os.getloadavg()[0], 2))


def configure_cuda(precision: str):
    """cuDNN times its convolution algorithms on each new shape and keeps the fastest (cudnn.benchmark), for every
    network alike: off, as torch leaves it, it takes a heuristic's pick, which can favour one side.
    fp32 means fp32: torch lets cuDNN convolutions use TF32 by default, which would be neither the papers'
    arithmetic nor comparable with the fp32 peak in PEAK_TFLOPS. It is switched off through fp32_precision where
    this torch has it (2.9+: the allow_tf32 flags warn there, and a mix of the two kinds has broken inductor),
    through the allow_tf32 flags before; never both."""
    torch.backends.cudnn.benchmark = True
    if precision != "fp32":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"     # as conv: torch reads the two as one legacy flag
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def run(argv=None):
    args = parser().parse_args(argv)
    s = setting(args)
    log(s.describe())
    rows = []
    try:
        for name in [args.only] if args.only else PROTOCOLS:
            try:
                rows.append(PROTOCOLS[name](s))
            except Exception as e:
                if not out_of_memory(e):
                    raise        # after the table of the rows done (finally), with its traceback
                rows.append(out_of_memory_row(name, e, s))
            rows[-1]["config"]["load_average"] = round(os.getloadavg()[0], 2)      # at the end of the protocol
            print(json.dumps(rows[-1]), flush=True)
            release()
    finally:
        print(markdown(rows, s), flush=True)


def out_of_memory_row(name: str, e: BaseException, s: Setting) -> dict:
    """The row of a protocol that ran out of GPU memory: what failed, in the error's first line."""
    log(f"{PROTOCOL_NAMES[name]}: out of memory")
    return {"protocol": PROTOCOL_NAMES[name], "out_of_memory": str(e).strip().split("\n")[0][:160],
            "config": {"setting": s.describe()}}


if __name__ == "__main__":
    main(run)
