"""Checkpoints: one file per stage, written atomically, loadable with torch.load(weights_only=True).

A checkpoint is a dict of plain types and tensors: model, optimizer, scaler, ema (diffusion stages), step,
samples (how far into the data stream the run is), config, script, stage, format_version and the RNG states,
so a resumed run continues the same loss curve.

Damage is caught on load. torch.load reads a zip whose members it never checks, so a zero-byte or truncated file
fails to parse but flipped bytes inside a weight load as different weights. Each checkpoint therefore carries
`checksums`: the SHA-256 of every top-level entry (its tensors' dtype, shape and bytes, its other values' repr),
and load_checkpoint recomputes those of the entries it returns. The sums live inside the file, not beside it, so
the one atomic rename keeps weights and sums together; and one sum per entry, not per file, keeps mmap loading
lazy: `entries=("ema",)` verifies and returns the EMA weights without reading the optimizer state from disk.
Checkpoints written before checksums existed (same format 2, no `checksums` entry) still load, unverified.
"""
import dataclasses
import hashlib
import random
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from common.files import atomic_write

FORMAT_VERSION = 2   # 2: PVDM's projection MLP and position codes, VideoFusion's schedule outside the weights
# the small entries that say what a checkpoint is: always read and verified, whatever `entries` asks for
DESCRIPTION = ("script", "stage", "format_version", "config", "step", "samples")


def rng_state() -> dict:
    """Every RNG a training step may touch, as tensors and plain lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": list(random.getstate()[1]) + [random.getstate()[2]]}


def set_rng_state(state: dict):
    """Restore rng_state()'s RNGs. A checkpoint loaded with map_location="cuda" holds the states on the GPU, and
    torch takes them only as CPU ByteTensors (a resumed CUDA run failed with "RNG state must be a torch.ByteTensor",
    found by eval.gpu_check on an H200)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"][:-1]), state["python"][-1]))


def checksum(value) -> str:
    """SHA-256 of an entry: tensors by dtype, shape and bytes, dicts and sequences in order, other values by repr."""
    h = hashlib.sha256()

    def feed(v):
        if torch.is_tensor(v):
            h.update(f"tensor {v.dtype} {tuple(v.shape)};".encode())
            h.update(v.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())   # raw bytes, any dtype
        elif isinstance(v, dict):
            h.update(f"dict {len(v)};".encode())
            for key, item in v.items():
                feed(key)
                feed(item)
        elif isinstance(v, (list, tuple)):       # a tuple saved may come back a list: both hash alike
            h.update(f"list {len(v)};".encode())
            for item in v:
                feed(item)
        else:
            h.update(f"{type(v).__name__} {v!r};".encode())

    feed(value)
    return h.hexdigest()


def save_checkpoint(path, state: dict):
    """Write atomically and flushed to disk (common/files.py): a run killed at any instant leaves either the old or
    the new checkpoint, never half of one. Each entry's checksum goes into the same file."""
    state = {**state, "format_version": FORMAT_VERSION}
    state["checksums"] = {key: checksum(value) for key, value in state.items()}

    def write(tmp):
        with open(tmp, "wb") as f:    # given a path, torch.save reports a full disk as a RuntimeError, not an OSError
            torch.save(state, f)
    atomic_write(path, write, sync=True)


def load_checkpoint(path, script: str, must_match: dict = None, map_location="cpu", mmap: bool = False,
                    entries=None) -> dict:
    """Load a checkpoint and refuse, in one sentence, a damaged one, one from another script, a newer format, or a
    config whose `must_match` entries (the architecture) differ. Returns the DESCRIPTION entries and `entries`
    (default: all), each checked against its checksum. mmap=True (with map_location="cpu") reads tensors from
    the file only when they are used: sampling a 549M-parameter model with entries=("ema",) then never reads its
    optimizer state."""
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
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format {ckpt['format_version']}, newer than this code's {FORMAT_VERSION}: "
                        f"update vidiff")
    ckpt = verified(ckpt, path, entries)
    check_structure(ckpt, path)
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py: pass a {script} checkpoint")
    if ckpt.get("format_version", 0) < FORMAT_VERSION:
        raise UserError(f"{path} has format {ckpt.get('format_version', 0)}, older than this code's {FORMAT_VERSION} "
                        f"(the networks changed): train a new run, or use the vidiff release that wrote it")
    for key, value in (must_match or {}).items():
        saved = ckpt.get("config", {}).get(key)
        if saved != value:
            raise UserError(f"{path} was trained with {key}={saved!r} but the config asks for {value!r}: use the "
                            f"same preset/flags, or a new --run directory")
    return ckpt


def verified(ckpt: dict, path, entries=None) -> dict:
    """The DESCRIPTION entries and `entries` (default: all) of a loaded checkpoint, each compared with the checksum
    saved with it: a mismatch means the file changed after it was written."""
    keep = [k for k in ckpt if k != "checksums" and (entries is None or k in entries or k in DESCRIPTION)]
    if "checksums" in ckpt:
        sums = ckpt["checksums"]
        intact = isinstance(sums, dict) and all(k in ckpt for k in sums)
        for key in keep if intact else ["checksums"]:
            if not intact or sums.get(key) != checksum(ckpt[key]):
                raise UserError(f"{path} is damaged: its {key!r} entry does not match the checksum saved with it (the "
                                f"file changed on disk or in a copy): use another copy, or train again")
    return {k: ckpt[k] for k in keep}


def _plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, (list, tuple)) and all(map(_plain, v)))


def _weights(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(w) for k, w in v.items())


# what each entry must be (a file that passes its checksums may still have been written by other code)
STRUCTURE = {
    "script": ("a script name", lambda v: isinstance(v, str)),
    "stage": ("a stage name", lambda v: isinstance(v, str)),
    "format_version": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "step": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "samples": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "config": ("a dict of settings (names to numbers, strings or lists)",
               lambda v: isinstance(v, dict) and all(isinstance(k, str) and _plain(x) for k, x in v.items())),
    "model": ("a state dict (names to tensors)", _weights),
    "ema": ("a dict with the EMA's state dict ('model') and its update count ('updates')",
            lambda v: isinstance(v, dict) and _weights(v.get("model")) and isinstance(v.get("updates"), int)),
    "optimizer": ("an optimizer state dict ('state' and 'param_groups')",
                  lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
                  and isinstance(v.get("param_groups"), list)),
    "scaler": ("a dict", lambda v: isinstance(v, dict)),
    "rng": ("a dict of RNG states ('torch', 'cuda', 'numpy', 'python')",
            lambda v: isinstance(v, dict) and {"torch", "cuda", "numpy", "python"} <= set(v)),
}


def check_structure(ckpt: dict, path):
    """Every entry has the type vidiff writes: a file with a string for its config or a list for its EMA is one
    sentence, not a traceback later. (Which entries a command needs, it asks for: config_from_checkpoint.)"""
    for key, (what, ok) in STRUCTURE.items():
        if key in ckpt and not ok(ckpt[key]):
            raise UserError(f"{path} is not a vidiff checkpoint: its {key!r} entry should be {what}, found a "
                            f"{type(ckpt[key]).__name__}")


def config_from_checkpoint(config_cls, ckpt: dict, path):
    """The `config_cls` a checkpoint was trained with; a setting this version of the script does not know is one
    sentence naming it (a checkpoint from a newer vidiff)."""
    if "config" not in ckpt:
        raise UserError(f"{path} is not a vidiff checkpoint: it has no 'config' entry")
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = [key for key in ckpt["config"] if key not in known]
    if unknown:
        raise UserError(f"{path} was trained with the setting {unknown[0]}={ckpt['config'][unknown[0]]!r}, which this "
                        f"version of {ckpt['script']}.py does not have: use the vidiff version that wrote it")
    return config_cls(**ckpt["config"])


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
    """load_state_dict that names the first missing, unexpected or misshapen key in one sentence. Values may be
    tensors of another dtype or numpy arrays (published weights): each is copied into the module's own."""
    every = model.state_dict()
    own = {k: v for k, v in every.items() if not k.endswith("num_batches_tracked")}
    for key, value in own.items():
        if key not in sd:
            raise UserError(f"{source} has no weight {key!r}: is it the right network's checkpoint?")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: weight {key!r} has shape {tuple(sd[key].shape)}, "
                            f"expected {tuple(value.shape)}")
    extra = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    if extra:
        raise UserError(f"{source} has an unexpected weight {extra[0]!r}: is it the right network's checkpoint?")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items() if k in every}, strict=False)
    return model
