"""GAN discriminator heads on a frozen (or co-trained) network's intermediate features: one implementation
for DMD2's classification branch and for ADD / LADD's multi-level heads.

:class:`DiscriminatorHead` -- DMD2 (Yin et al. 2024, sec. 4.2: "a classification branch on top of the fake
diffusion denoiser's bottleneck"). DMD2's SD1.5 head: strided 4x4 convolutions with GroupNorm + SiLU from
the 8x8 bottleneck down to 1x1, then a 1x1 convolution to one logit. Ours keeps that shape for any feature
size: strided 4x4 blocks while the side is above 4, one 3x3 block, global average pooling, a 1x1 projection
(deviation: the pooling replaces the final 4x4/stride-4 convolution so small teachers fit). The last layer
starts at zero, so the head is neutral (logit 0, D = 1/2) at initialisation.

With ``cond_dim`` the head is a *projection discriminator* (Miyato & Koyama 2018), as ADD's heads (Sauer et
al. 2023, after StyleGAN-T) and LADD's noise-level- and text-conditioned heads (Sauer et al. 2024, sec. 3):
``logit = w . h + <P c, h> / sqrt(C)`` for the pooled feature ``h`` and a conditioning vector ``c``. ``P``
starts at zero too.

:class:`FeatureDiscriminator` -- one head per feature level (``{"down_0": ..., "mid": ...}``), logits
``(B, L)``; the GAN losses average over every head's logits (LADD: "independent heads" on the teacher's
features of several blocks). DMD2 is the one-level case.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _block(channels: int, stride: int) -> list[nn.Module]:
    kernel, pad = (4, 1) if stride == 2 else (3, 1)
    groups = 32 if channels % 32 == 0 else 1
    return [nn.Conv2d(channels, channels, kernel, stride=stride, padding=pad), nn.GroupNorm(groups, channels), nn.SiLU()]


class DiscriminatorHead(nn.Module):
    def __init__(self, channels: int, size: int, cond_dim: int | None = None, width: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        if width is not None and width < channels:  # ours: a 1x1 projection first, for wide features (MM-DiTs)
            layers.append(nn.Conv2d(channels, width, 1))
            channels = width
        while size > 4:
            layers += _block(channels, 2)
            size //= 2
        layers += _block(channels, 1)
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.project = None
        if cond_dim is not None:
            self.project = nn.Linear(cond_dim, channels, bias=False)
            nn.init.zeros_(self.project.weight)

    def forward(self, features: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` features (and ``(B, cond_dim)`` conditioning) -> ``(B,)`` logits (real > 0)."""
        h = self.body(features.float()).mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        logit = self.out(h).flatten()
        if self.project is not None:
            if c is None:
                raise ValueError("this head is conditioned (cond_dim given): pass its conditioning c")
            logit = logit + (h.flatten(1) * self.project(c.float())).sum(dim=1) / math.sqrt(h.shape[1])
        return logit


class FeatureDiscriminator(nn.Module):
    """Heads over several feature levels: ``shapes`` maps a level name to its ``(channels, side)``; ``width``: each
    head first projects wider features to that many channels (1x1 convolution)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], cond_dim: int | None = None, width: int | None = None):
        super().__init__()
        if not shapes:
            raise ValueError("a discriminator needs at least one feature level")
        self.heads = nn.ModuleDict({name: DiscriminatorHead(c, s, cond_dim, width) for name, (c, s) in shapes.items()})

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def forward(self, features: dict[str, torch.Tensor], c: torch.Tensor | None = None) -> torch.Tensor:
        """``{level: (B, C, H, W)}`` -> ``(B, L)`` logits, one column per level."""
        return torch.stack([head(features[name], c) for name, head in self.heads.items()], dim=1)
