"""common/nn.py: the pieces every paper script shares."""
import math

import torch

from common.nn import norm, timestep_embedding, zero


def test_group_norm_is_groupnorm32_where_each_group_keeps_four_channels():
    assert {c: norm(c).num_groups for c in (16, 32, 48, 128, 256, 384)} == {16: 4, 32: 8, 48: 12, 128: 32, 256: 32,
                                                                             384: 32}


def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    e = timestep_embedding(torch.tensor([0, 7]), 8)
    assert e.shape == (2, 8) and e.dtype == torch.float32
    assert torch.equal(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))                      # t = 0: cos 0, sin 0
    freqs = [10_000 ** (-k / 4) for k in range(4)]
    expected = [math.cos(7 * f) for f in freqs] + [math.sin(7 * f) for f in freqs]
    assert torch.allclose(e[1], torch.tensor(expected), atol=1e-5)


def test_zero_initialised_layers_start_as_nothing():
    layer = zero(torch.nn.Conv2d(3, 4, 3, padding=1))
    assert layer(torch.randn(1, 3, 5, 5)).abs().max() == 0
