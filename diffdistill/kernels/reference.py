"""Math attention: the plain PyTorch definition every backend is tested against.

``softmax(scale Q K^T + bias) V`` with the full ``(Nq, Nk)`` score matrix in memory: slow and O(N^2), but
differentiable in both reverse and forward mode by autograd, in any dtype (fp64 for references).
"""

from __future__ import annotations

import math

import torch


def check_keep(keep: torch.Tensor | None, batch: int, nk: int) -> None:
    """A key-padding mask must be bool ``(B, Nk)`` and keep at least one key per batch row."""
    if keep is None:
        return
    if keep.dtype != torch.bool or tuple(keep.shape) != (batch, nk):
        raise ValueError(f"key padding mask must be bool (B, Nk) = {(batch, nk)} with True = attend; got "
                         f"{keep.dtype} {tuple(keep.shape)}")
    if not bool(keep.any(-1).all()):
        raise ValueError("key padding mask drops every key of some batch row: its attention is undefined")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None,
                   scale: float | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, H, Nq, D)`` attention of ``q`` over ``k, v`` ``(B, H, Nk, D)``. ``keep``: ``(B, Nk)`` bool key
    padding mask (True = attend); ``allowed``: an extra bool mask broadcastable to ``(B, H, Nq, Nk)``
    (block-sparse references)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)
