"""The few network pieces that must be identical in every paper script (larger blocks live with their paper).

    timestep_embedding  the sinusoidal embedding of Vaswani et al. 2017 as ADM writes it: cos half, then sin half
    norm                GroupNorm with 32 groups (ADM's GroupNorm32) where the width leaves 4 channels or more in
                        each; narrower layers take the most groups that do (one channel per group would be an
                        instance norm, which erases each frame's mean colour)
    zero                a zero-initialised layer, so that a residual branch starts as the identity (ADM)
"""
import math

import torch
import torch.nn as nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """(N,) integer steps or positions -> (N, dim) float32: [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(ch: int) -> nn.GroupNorm:
    groups = max(g for g in range(1, min(32, max(ch // 4, 1)) + 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
