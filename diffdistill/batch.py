"""One micro-batch of training input, with randomness that belongs to each *sample*, not to a process.

Every sample of the global batch has its own generator, seeded from ``(seed, step, global sample
index)``. Whatever draws an objective makes through :class:`Batch` (noise, times, choices) are
therefore the same whether the global batch runs on one process or is split over many, in one
micro-batch or several (gradient accumulation), and whether the run was resumed or not: the sample
with global index ``i`` of step ``s`` always sees the same prompt, image and noise.

Global index of local sample ``j`` of micro-step ``m`` on rank ``r`` of ``W``, local batch ``B``:
``(m * W + r) * B + j``. ``Batch.shared`` is one generator per step for choices that hold for the whole
global batch (e.g. DMD2's backward-simulation step), equal on every process and micro-step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def sample_seed(seed: int, step: int, index: int, stream: str = "") -> int:
    """A 60-bit seed for one sample's generator (``stream`` separates independent draws)."""
    key = hashlib.sha256(f"{seed}/{step}/{index}/{stream}".encode()).hexdigest()
    return int(key[:15], 16)


@dataclass
class Batch:
    prompts: list[str]
    generators: list[torch.Generator]  # one per sample (CPU), see the module docstring
    step: int
    shared: torch.Generator | None = None  # one per step, the same on every process and micro-step
    images: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]: real images, when the run has an image source
    image_captions: list[str] = field(default_factory=list)  # their captions

    def __len__(self) -> int:
        return len(self.prompts)

    def randn(self, *shape: int, device=None, dtype=None) -> torch.Tensor:
        """``(B, *shape)`` standard normal, sample ``i`` drawn from its own generator."""
        out = torch.stack([torch.randn(shape, generator=g) for g in self.generators])
        return out.to(device=device, dtype=dtype or out.dtype)

    def rand(self, *shape: int, device=None) -> torch.Tensor:
        """``(B, *shape)`` uniform in [0, 1)."""
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators]).to(device)

    def drop_captions(self, captions: Sequence[str], prob: float) -> list[str]:
        """``captions``, each replaced by "" with probability ``prob`` (one draw per sample when ``prob > 0``)."""
        if prob == 0:
            return list(captions)
        drop = self.rand() < prob
        return ["" if d else c for d, c in zip(drop.tolist(), captions)]

    def randint(self, high: int, device=None) -> torch.Tensor:
        """``(B,)`` integers in ``[0, high)``."""
        return torch.cat([torch.randint(high, (1,), generator=g) for g in self.generators]).to(device)


def micro_batch(pool: Sequence[str], batch_size: int, seed: int, step: int, micro: int = 0, rank: int = 0,
                world: int = 1, images=None) -> Batch:
    """This process's part of micro-step ``micro`` of ``step``: prompts drawn from ``pool`` and, with an
    image source, real images with their captions -- each from its sample's own generators."""
    first = (micro * world + rank) * batch_size
    index = range(first, first + batch_size)
    gens = [torch.Generator().manual_seed(sample_seed(seed, step, i)) for i in index]
    prompts = [pool[int(torch.randint(len(pool), (1,), generator=g))] for g in gens]
    shared = torch.Generator().manual_seed(sample_seed(seed, step, -1, "shared"))
    batch = Batch(prompts, gens, step, shared)
    if images is not None:
        picks = [images.pick(torch.Generator().manual_seed(sample_seed(seed, step, i, "image"))) for i in index]
        batch.images = torch.stack([img for img, _ in picks])
        batch.image_captions = [cap for _, cap in picks]
    return batch
