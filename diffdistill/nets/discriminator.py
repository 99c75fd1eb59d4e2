"""A GAN classification head on a denoiser's bottleneck features (DMD2, Yin et al. 2024, sec. 4.2:
"a classification branch on top of the fake diffusion denoiser's bottleneck").

DMD2's SD1.5 head: strided 4x4 convolutions with GroupNorm + SiLU from the 8x8 bottleneck down to 1x1,
then a 1x1 convolution to one logit. Ours keeps that shape for any bottleneck size: strided 4x4 blocks
while the side is above 4, one 3x3 block, global average pooling, a 1x1 projection (deviation: the pooling
replaces the final 4x4/stride-4 convolution so small teachers fit). The last layer starts at zero, so
the head is neutral (logit 0, D = 1/2) at initialisation.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(channels: int, stride: int) -> list[nn.Module]:
    kernel, pad = (4, 1) if stride == 2 else (3, 1)
    groups = 32 if channels % 32 == 0 else 1
    return [nn.Conv2d(channels, channels, kernel, stride=stride, padding=pad), nn.GroupNorm(groups, channels), nn.SiLU()]


class DiscriminatorHead(nn.Module):
    def __init__(self, channels: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        while size > 4:
            layers += _block(channels, 2)
            size //= 2
        layers += _block(channels, 1)
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` bottleneck features -> ``(B,)`` logits (real > 0)."""
        h = self.body(features.float()).mean(dim=(2, 3), keepdim=True)
        return self.out(h).flatten()
