"""Saving image batches as PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    """Save images in ``[0, 1]`` ``(B, 3, H, W)`` as one PNG grid (``nrow`` per row, nearest upscaling)."""
    from torchvision.utils import save_image

    if images.ndim != 4:
        raise ValueError(f"save_grid expects (B, C, H, W), got {tuple(images.shape)}")
    if upscale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=upscale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float().clamp(0, 1), path, nrow=nrow or math.ceil(math.sqrt(len(images))), padding=2)
    return path
