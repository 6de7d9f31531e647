"""LPIPS (Zhang et al. 2018), the perceptual loss of the autoencoders in PVDM, LVDM and VQ-VDM.

d(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2, with f_l the unit-normalised VGG-16 activations
relu1_2 ... relu5_3 and w_l the linear heads learned on human judgements. The VGG-16 backbone comes in
torchvision's layout (`features.0.weight`, ...; the file `vgg16-397923af.pth`) from a local path; the heads are the
small `weights/v0.1/vgg.pth` that the PyPI package `lpips` ships (`pip install --no-deps lpips`).
"""
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import load_state_checked
from common.errors import UserError

VGG_FILE = "vgg16-397923af.pth"
WHERE = (f"put torchvision's VGG-16 weights ({VGG_FILE}, https://download.pytorch.org/models/{VGG_FILE}) at "
         f"~/.cache/torch/hub/checkpoints/ or point VIDIFF_VGG16 at the file, and `pip install --no-deps lpips` "
         f"for the linear heads")
# conv layers of torchvision's vgg16().features (index: channels); a ReLU follows each, 2x2 max pools between
VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
             (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
TAPS = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
POOL_BEFORE = {5, 10, 17, 24}


class LPIPS(nn.Module):
    """(N, 3, H, W) in [-1, 1] twice -> (N,) perceptual distances. Frozen: only the inputs get gradients."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, 3, padding=1) for i, cin, cout in VGG_CONVS})
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        # LPIPS's input scaling layer: inputs in [-1, 1] mapped to ImageNet-normalised pixels
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def taps(self, x):
        h, out = (x - self.shift) / self.scale, []
        for i, _, _ in VGG_CONVS:
            if i in POOL_BEFORE:
                h = F.max_pool2d(h, 2)
            h = F.relu(self.features[str(i)](h))
            if i in TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))   # unit length per pixel
        return out

    def forward(self, x, y):
        d = 0
        for lin, fx, fy in zip(self.lins, self.taps(x), self.taps(y)):
            d = d + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return d


def vgg_path(path=None):
    """The VGG-16 file: `path`, $VIDIFF_VGG16, or torch hub's cache where torchvision downloads it."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    candidates = [path, os.environ.get("VIDIFF_VGG16"), hub / VGG_FILE]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    return None


def heads_path():
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    return p if p.exists() else None


def load_lpips(vgg=None, device="cpu") -> LPIPS:
    """LPIPS-VGG with real weights, or a UserError saying where to get them."""
    backbone, heads = vgg_path(vgg), heads_path()
    if backbone is None or heads is None:
        missing = "VGG-16 weights" if backbone is None else "the lpips package's linear heads"
        raise UserError(f"LPIPS needs {missing}: {WHERE}")
    vgg_sd = torch.load(backbone, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in vgg_sd.items() if k.startswith("features.")}   # the classifier is not used
    for k, v in torch.load(heads, map_location="cpu", weights_only=True).items():   # lin0.model.1.weight
        sd[f"lins.{k[3]}.weight"] = v
    model = LPIPS()
    sd["shift"], sd["scale"] = model.shift, model.scale
    return load_state_checked(model, sd, f"{backbone} + {heads}").to(device).eval().requires_grad_(False)


_warned = False


def perceptual_loss_or_none(device, vgg=None):
    """LPIPS for an autoencoder's loss, or None after one warning when its weights are not on this machine."""
    global _warned
    try:
        return load_lpips(vgg, device)
    except UserError as e:
        if not _warned:
            warnings.warn(f"training without the perceptual loss: {e}", stacklevel=2)
            _warned = True
        return None
