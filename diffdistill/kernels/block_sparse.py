"""Content-adaptive block-sparse attention, after Video-BLADE's Adaptive Block-Sparse Attention (ASA; Gu et al.,
"Video-BLADE: Block-Sparse Attention Meets Step Distillation for Efficient Video Generation", arXiv 2508.10774),
which is trained jointly with step distillation.

The block mask is chosen from the content, per head: queries and keys are mean-pooled over tiles of the
flash kernel's size, the pooled scores ``scale Qp Kp^T`` rank the key tiles for each query tile, and each query
tile keeps its ``ceil(density * n_key_tiles)`` best key tiles (at least one). ASA's own selection rule
differs in detail; a fixed top-k per row is used here so that ``density`` is exactly the fraction of tiles
computed, which is what a speed target needs. Tiles whose keys are all padding rank last. The mask is a
discrete choice: no gradient flows through it (as ASA); inside the kept tiles attention is exact.

The kept tiles run in the Triton flash kernels (:mod:`.flash`), which visit only the listed key tiles for each
query tile (and, in the backward, only the listed query tiles for each key tile): skipped tiles cost nothing.
:func:`block_sparse_reference` is the same computation as dense math attention with the tile mask applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import math_attention


@dataclass
class BlockLists:
    """Tile visiting lists for the kernels (int32, contiguous): ``k_index[b, h, i, :k_count[b, h, i]]`` are
    the key tiles of query tile ``i``; ``q_index``/``q_count`` the transpose (query tiles per key tile)."""

    k_index: torch.Tensor  # (B, H, NQB, NKB)
    k_count: torch.Tensor  # (B, H, NQB)
    q_index: torch.Tensor  # (B, H, NKB, NQB)
    q_count: torch.Tensor  # (B, H, NKB)


def _pool(x: torch.Tensor, block: int, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` ``(B, H, N, D)`` over tiles of ``block`` tokens (the last tile may be short), counting only
    tokens with ``weight`` 1 (``(B, N)``, or None = all). Tiles with no token give 0."""
    B, H, N, D = x.shape
    pad = (-N) % block
    w = torch.ones(B, N, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    xs = F.pad(x * w[:, None, :, None], (0, 0, 0, pad)).view(B, H, -1, block, D).sum(3)
    n = F.pad(w, (0, pad)).view(B, -1, block).sum(-1)  # (B, NB)
    return xs / n.clamp_min(1)[:, None, :, None]


def block_mask(q: torch.Tensor, k: torch.Tensor, density: float, block_m: int, block_n: int,
               keep: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Bool ``(B, H, NQB, NKB)``: which key tiles each query tile attends to (see the module docstring)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"block-sparse density must be in (0, 1], got {density}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        qp = _pool(q.detach().float(), block_m, None)      # (B, H, NQB, D)
        kp = _pool(k.detach().float(), block_n, keep)      # (B, H, NKB, D)
        score = torch.matmul(qp, kp.transpose(-1, -2)) * scale  # (B, H, NQB, NKB)
        if keep is not None:
            any_key = F.pad(keep, (0, (-keep.shape[1]) % block_n)).view(keep.shape[0], -1, block_n).any(-1)
            score = score.masked_fill(~any_key[:, None, None, :], float("-inf"))
        nkb = score.shape[-1]
        top = max(1, math.ceil(density * nkb - 1e-9))
        chosen = score.topk(top, dim=-1).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, chosen, True)


def block_lists(mask: torch.Tensor) -> BlockLists:
    """The kernels' visiting lists for a tile mask ``(B, H, NQB, NKB)``."""
    def lists(m):
        count = m.sum(-1, dtype=torch.int32)
        # kept tiles first, in increasing order: sort by (not kept, index)
        order = (~m).to(torch.int32) * m.shape[-1] + torch.arange(m.shape[-1], device=m.device, dtype=torch.int32)
        return order.argsort(-1).to(torch.int32).contiguous(), count.contiguous()

    k_index, k_count = lists(mask)
    q_index, q_count = lists(mask.transpose(-1, -2))
    return BlockLists(k_index, k_count, q_index, q_count)


def expand_mask(mask: torch.Tensor, nq: int, nk: int, block_m: int, block_n: int) -> torch.Tensor:
    """The tile mask ``(B, H, NQB, NKB)`` as an element mask ``(B, H, Nq, Nk)``."""
    full = mask.repeat_interleave(block_m, dim=-2).repeat_interleave(block_n, dim=-1)
    return full[..., :nq, :nk]


def block_sparse_reference(q, k, v, mask: torch.Tensor, keep=None, scale=None, block_m: int = 64,
                           block_n: int = 64) -> torch.Tensor:
    """Dense math attention restricted to the tiles of ``mask`` (what the sparse kernel must equal)."""
    allowed = expand_mask(mask, q.shape[2], k.shape[2], block_m, block_n)
    return math_attention(q, k, v, keep, scale, allowed=allowed)


def block_sparse_attention(q, k, v, density: float, keep=None, scale=None, mask=None) -> torch.Tensor:
    """Block-sparse attention with the Triton kernels; ``mask`` (a tile mask) overrides the adaptive choice."""
    from . import flash

    flash.check_inputs(q, k, v, keep)
    scale = flash.default_scale(q) if scale is None else scale
    if mask is None:
        mask = block_mask(q, k, density, flash.BLOCK_M, flash.BLOCK_N, keep, scale)
    return flash.FlashAttentionJVP.apply(q, k, v, scale, keep, block_lists(mask))[0]
