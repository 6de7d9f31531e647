"""Where and how a run executes: device, precision, seeding, EMA, data parallelism and the log.

DDP follows nanoGPT: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, every rank trains, only rank 0 writes
(checkpoints, log.jsonl, samples, the progress bar).
"""
import atexit
import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.checkpoint import load_state_checked
from common.errors import UserError
from common.files import atomic_write, cannot_write


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto: CUDA when present, else CPU. Under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}: expected auto, cpu or cuda")


# --- Sizes checked before anything is allocated ---

def memory_total(device: torch.device) -> tuple:
    """(bytes, words) of the memory a command on `device` has: the GPU's, or this machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "the GPU's memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return ""


def clip_floats(batch: int, frames: int, resolution: int, channels: int) -> float:
    """Bytes of `batch` float32 tensors of (channels, frames, resolution, resolution): a floor of what a step on
    such clips holds at once (each network's first layers keep at least two activations of their width at full
    size for the backward pass: a convolution's output and its normalisation's)."""
    return 4.0 * batch * frames * resolution ** 2 * channels


def check_memory(needs: dict, device: torch.device, fix: str = "--frames, --resolution or --batch-size"):
    """needs: {what: bytes at least}. Refuse, before any allocation, a size the device's memory cannot hold, in
    one sentence with the estimate: an absurd --frames is an error now, not a machine swapping for an hour."""
    total, where = memory_total(device)
    for what, nbytes in needs.items():
        if nbytes > total:
            raise UserError(f"{what} would need at least {fmt_bytes(nbytes)}, more than {where} "
                            f"({fmt_bytes(total)}): pass a smaller {fix}")


def check_sample_memory(n: int, frames: int, resolution: int, device: torch.device):
    """What sampling n videos of `frames` frames holds at the end whatever the method: the videos as floats."""
    check_memory({f"{n} videos of {frames} frames at {resolution}x{resolution}":
                  clip_floats(n, frames, resolution, 3)}, device, "--n or --frames")


def pick_precision(name: str, device: torch.device):
    """The autocast dtype, or None for plain fp32. auto: bf16 on CUDA GPUs that support it, fp32 on CPU."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else (torch.float16 if device.type == "cuda" else None)
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA: use fp32 (or bf16) on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype):
    """Mixed precision for the forward pass; a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class EMA:
    """Exponential moving average of a model's weights, decay min(decay, (1 + n) / (10 + n)) after n updates
    (the LitEma warm-up used by the LVDM and PVDM code), kept as a frozen copy of the model."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self):
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state, source):
        load_state_checked(self.model, state["model"], source)
        self.updates = state["updates"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str):
    """(Dist, device). Under torchrun (it sets RANK): a process group, NCCL on CUDA, gloo on CPU, also for one
    process, so that `torchrun --nproc_per_node=1` on a one-GPU machine runs the code N processes run (NCCL, DDP).
    Otherwise a single process."""
    if "RANK" not in os.environ:
        return Dist(), pick_device(device_name)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(_close_distributed)
    return Dist(rank, world, local_rank), device


def _close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


class RunLog:
    """log.jsonl: one JSON object per logged step (stage, step, loss, lr, data_wait, seconds). Rank 0 only.
    A line may be written before its step's checkpoint, so a resumed stage first forgets the lines past the step
    it resumes from, and a stage that starts afresh all of its lines: after any kill, each step appears once.
    A line with `changed` (settings a resumed stage changed, train.keep_asked_settings) is written at the step it
    resumes from, and forgotten with the lines past it: the next resume from that step writes it again if the
    change still holds."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.enabled, self.start = Path(run_dir) / "log.jsonl", enabled, time.time()

    def write(self, **record):
        if self.enabled:
            record.setdefault("seconds", round(time.time() - self.start, 3))
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise cannot_write(self.path, e) from None

    def forget_after(self, stage: str, step: int):
        """Drop the lines of `stage` past `step` (written by a run killed before its next checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        try:
            lines = self.path.read_text().splitlines(keepends=True)
        except OSError as e:
            raise cannot_write(self.path, e) from None     # it is read to be rewritten
        kept = [line for line in lines if not _past(line, stage, step)]
        if len(kept) < len(lines):
            atomic_write(self.path, lambda p: p.write_text("".join(kept)))


def _past(line: str, stage: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True   # a line cut short by a kill
    past = record.get("step", 0) > step or "changed" in record and record.get("step", 0) >= step
    return record.get("stage") == stage and past


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"
