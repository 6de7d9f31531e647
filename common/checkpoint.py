"""Checkpoints: one file per stage, written atomically, loadable with torch.load(weights_only=True).

A checkpoint is a dict of plain types and tensors: model, optimizer, scaler, ema (diffusion stages), step,
samples (how far into the data stream the run is), config, script, stage, format_version and the RNG states,
so a resumed run continues the same loss curve.
"""
import random
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.files import atomic_write

FORMAT_VERSION = 2   # 2: PVDM's projection MLP and position codes, VideoFusion's schedule outside the weights


def rng_state() -> dict:
    """Every RNG a training step may touch, as tensors and plain lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": list(random.getstate()[1]) + [random.getstate()[2]]}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"][:-1]), state["python"][-1]))


def save_checkpoint(path, state: dict):
    """Write atomically and flushed to disk (common/files.py): a run killed at any instant leaves either the old or
    the new checkpoint, never half of one."""
    atomic_write(path, lambda tmp: torch.save({**state, "format_version": FORMAT_VERSION}, tmp), sync=True)


def load_checkpoint(path, script: str, must_match: dict = None, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint and refuse, in one sentence, one from another script, a newer format, or a config
    whose `must_match` entries (the architecture) differ. mmap=True (with map_location="cpu") reads tensors from
    the file only when they are used: sampling a 549M-parameter model then never holds its optimizer state."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0]
        raise UserError(f"{path} is not a readable checkpoint: it is empty, truncated or damaged ({type(e).__name__}"
                        f"{': ' + detail if detail else ''})")
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise UserError(f"{path} is not a vidiff checkpoint (no 'script' entry)")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py: pass a {script} checkpoint")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format {ckpt['format_version']}, newer than this code's {FORMAT_VERSION}: "
                        f"update vidiff")
    if ckpt.get("format_version", 0) < FORMAT_VERSION:
        raise UserError(f"{path} has format {ckpt.get('format_version', 0)}, older than this code's {FORMAT_VERSION} "
                        f"(the networks changed): train a new run, or use the vidiff release that wrote it")
    for key, value in (must_match or {}).items():
        saved = ckpt.get("config", {}).get(key)
        if saved != value:
            raise UserError(f"{path} was trained with {key}={saved!r} but the config asks for {value!r}: use the "
                            f"same preset/flags, or a new --run directory")
    return ckpt


def find_checkpoint(script: str, run_dir, ckpt=None, stage: str = "diffusion") -> Path:
    """The checkpoint `sample` should use: --ckpt if given, else <run>/<stage>.pt; if there is none, say which
    `train` command makes one."""
    path = Path(ckpt) if ckpt else Path(run_dir) / f"{stage}.pt"
    if not path.is_file():
        default = Path(f"runs/{script}-synthetic-tiny")
        how = f"python {script}.py train" + ("" if ckpt or Path(run_dir) == default else f" --run {run_dir}")
        raise UserError(f"no checkpoint at {path}: train one first with `{how}`")
    return path


def load_state_checked(model: torch.nn.Module, sd: dict, source) -> torch.nn.Module:
    """load_state_dict that names the first missing, unexpected or misshapen key in one sentence."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    for key, value in own.items():
        if key not in sd:
            raise UserError(f"{source} has no weight {key!r}: is it the right network's checkpoint?")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: weight {key!r} has shape {tuple(sd[key].shape)}, "
                            f"expected {tuple(value.shape)}")
    extra = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    if extra:
        raise UserError(f"{source} has an unexpected weight {extra[0]!r}: is it the right network's checkpoint?")
    model.load_state_dict({k: torch.as_tensor(sd[k]).float() for k in own}, strict=False)
    return model
