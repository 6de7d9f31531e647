"""C3D fine-tuned on UCF-101, the classifier behind the video Inception Score (TGANv2
tgan2/models/c3d/c3d_ucf101.py, StyleGAN-V src/metrics/video_inception_score.py).

The layer names are those of the converted checkpoints (`conv1a` ... `fc8`): TGANv2's chainer file
`conv3d_deepnetA_ucf.npz` (`conv1a/W`, `conv1a/b`, ...) with its mean clip `mean2.npz`, or a PyTorch state dict
with the same names (`conv1a.weight`, ..., and optionally `mean`). No C3D weights can be installed offline, so the
path is always given by the user.
"""
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_state_checked
from common.errors import UserError

WHERE = ("the UCF-101 C3D is published as conv3d_deepnetA_ucf.npz with mean2.npz in TGANv2's release "
         "(https://github.com/rezoo/tgan2) and as c3d_ucf101.pt with StyleGAN-V "
         "(https://github.com/universome/stylegan-v)")

CONVS = [("conv1a", 3, 64), ("conv2a", 64, 128), ("conv3a", 128, 256), ("conv3b", 256, 256),
         ("conv4a", 256, 512), ("conv4b", 512, 512), ("conv5a", 512, 512), ("conv5b", 512, 512)]
POOL_AFTER = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2),
              "conv5b": (2, 2, 2)}


class C3D(nn.Module):
    """(B, 3, 16, 112, 112) BGR pixels minus the mean clip -> (B, 101) UCF-101 class probabilities."""

    def __init__(self, num_classes=101):
        super().__init__()
        for name, cin, cout in CONVS:
            self.add_module(name, nn.Conv3d(cin, cout, 3, padding=1))
        self.fc6, self.fc7, self.fc8 = nn.Linear(8192, 4096), nn.Linear(4096, 4096), nn.Linear(4096, num_classes)
        # the mean clip (3, 16, 112, 112), BGR, already cropped to [8:120, 8:120] as TGANv2 does
        self.register_buffer("mean", torch.zeros(3, 16, 112, 112))

    def forward(self, x):
        for name, _, _ in CONVS:
            x = F.relu(getattr(self, name)(x))
            if name in POOL_AFTER:   # chainer's cover_all is ceil mode: pool5 takes (2, 7, 7) to (1, 4, 4)
                x = F.max_pool3d(x, POOL_AFTER[name], POOL_AFTER[name], ceil_mode=True)
        x = x.flatten(1)                                          # (B, 512*1*4*4) in (C, T, H, W) order
        x = F.relu(self.fc7(F.relu(self.fc6(x))))                 # dropout is the identity at inference
        return self.fc8(x).softmax(dim=1)


def c3d_preprocess(videos: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 16, H, W, 3) RGB -> the C3D input of TGANv2: BGR pixels, each frame resized to 112x112
    (bilinear; chainer's resize_images aligns corners), minus the mean clip."""
    B, T, H, W, _ = videos.shape
    if T != 16:
        raise UserError(f"the UCF-101 C3D scores 16-frame clips, got {T} frames: pass --frames 16")
    x = videos.flip(-1).permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W).float()   # RGB -> BGR, (B*T, 3, H, W)
    x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=True)
    x = x.reshape(B, T, 3, 112, 112).permute(0, 2, 1, 3, 4)                         # (B, 3, 16, 112, 112)
    return x - mean


def _chainer_to_torch(arrays) -> dict:
    """conv1a/W -> conv1a.weight, conv1a/b -> conv1a.bias (chainer's Linear W is (out, in) like torch's)."""
    sd = {}
    for key in arrays.files:
        parts = key.split("/")                                          # "conv1a/W" or "predictor/conv1a/W"
        leaf = {"W": "weight", "b": "bias"}.get(parts[-1], parts[-1])
        sd[f"{parts[-2]}.{leaf}" if len(parts) > 1 else leaf] = torch.from_numpy(arrays[key])
    return sd


def load_mean(path) -> torch.Tensor:
    """mean2.npz -> (3, 16, 112, 112): the BGR mean clip of UCF-101 cropped to [8:120, 8:120] (TGANv2)."""
    with np.load(path) as f:
        arr = np.asarray(f[f.files[0]], dtype=np.float32)
    arr = arr.reshape(arr.shape[-4:]) if arr.ndim >= 4 else arr
    if arr.ndim != 4 or arr.shape[:2] != (3, 16) or min(arr.shape[2:]) < 120:
        raise UserError(f"{path} should hold the (3, 16, 128, 171) C3D mean clip, found shape {arr.shape}")
    return torch.from_numpy(arr[:, :, 8:120, 8:120].copy())


def load_c3d(path, mean_path=None, device="cpu") -> C3D:
    """C3D in eval mode from a chainer .npz (its mean from mean2.npz beside it or `mean_path`) or a PyTorch file."""
    if path is None:
        raise UserError(f"the Inception Score needs C3D weights: pass --c3d PATH; {WHERE}")
    path = Path(path)
    if not path.exists():
        raise UserError(f"C3D weights {path} do not exist; {WHERE}")
    try:     # a text file, a damaged archive or another network's arrays: one sentence, not np.load's traceback
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                sd = _chainer_to_torch(arrays)
        elif zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()     # a TorchScript export
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {path} as C3D weights ({type(e).__name__}); {WHERE}") from None
    if "mean" not in sd:
        mean_path = Path(mean_path) if mean_path else path.with_name("mean2.npz")
        if not mean_path.exists():
            raise UserError(f"{path} has no mean clip and {mean_path} does not exist: pass --c3d-mean PATH "
                            f"to mean2.npz; {WHERE}")
        sd["mean"] = load_mean(mean_path)
    return load_state_checked(C3D(), sd, path).to(device).eval()
