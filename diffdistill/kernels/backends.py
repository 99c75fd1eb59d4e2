"""The attention backend registry and :func:`attention`, the one entry point every processor calls.

Backends (``BACKENDS``): ``sdpa`` (PyTorch's fused scaled-dot-product attention), ``math`` (the O(N^2)
reference), ``triton`` (our flash attention, forward and backward), ``triton_jvp`` (the same plus a
forward-mode JVP rule in O(N) memory, for sCM-style consistency training under ``torch.func.jvp``),
``block_sparse`` (Video-BLADE-style adaptive block-sparse attention in the same Triton kernels; forward,
backward and JVP) and ``xformers`` (``memory_efficient_attention``, when installed and on CUDA).

``auto`` takes the first backend of its preference list that can serve the request: for plain attention SDPA
(FlashAttention-2 speed already, so our kernels do not replace it there), then xformers, then math; when a
forward-mode derivative is being taken (``torch.func.jvp`` or ``torch.autograd.forward_ad``; SDPA's fused
kernels have no JVP) ``triton_jvp``, then math. An explicitly named backend that cannot serve a request is an
error naming the reason, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .reference import check_keep, math_attention

AUTO_PLAIN = ("sdpa", "xformers", "math")
AUTO_JVP = ("triton_jvp", "math")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # = flash.SUPPORTED_DTYPES (a test checks)
TRITON_MAX_HEAD_DIM = 256                                       # = flash.MAX_HEAD_DIM


@dataclass(frozen=True)
class Request:
    """What a call needs from a backend."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    needs_jvp: bool


@dataclass(frozen=True)
class Backend:
    """``run(q, k, v, keep, scale, density) -> O``; ``refuses(request)``: why it cannot serve, or None."""

    name: str
    run: Callable
    refuses: Callable[[Request], str | None]


def _needs_jvp(*xs: torch.Tensor) -> bool:
    return any(forward_ad.unpack_dual(x).tangent is not None for x in xs)


def _run_sdpa(q, k, v, keep, scale, density):
    bias = None if keep is None else keep[:, None, None, :]  # bool: True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def _run_math(q, k, v, keep, scale, density):
    return math_attention(q, k, v, keep, scale)


def _run_triton(q, k, v, keep, scale, density):
    from . import flash

    flash.check_inputs(q, k, v, keep)
    return flash.FlashAttention.apply(q, k, v, scale, keep, None)[0]


def _run_triton_jvp(q, k, v, keep, scale, density):
    from . import flash

    flash.check_inputs(q, k, v, keep)
    return flash.FlashAttentionJVP.apply(q, k, v, scale, keep, None)[0]


def _run_block_sparse(q, k, v, keep, scale, density):
    from .block_sparse import block_sparse_attention

    return block_sparse_attention(q, k, v, density, keep, scale)


def _run_xformers(q, k, v, keep, scale, density):
    import xformers.ops as xops

    bias = None
    if keep is not None:  # xformers takes an additive (B, H, Nq, Nk) bias
        zeros = torch.zeros(keep.shape, dtype=q.dtype, device=q.device)
        bias = zeros.masked_fill(~keep, float("-inf"))[:, None, None, :].expand(
            q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
                                          scale=scale)  # (B, N, H, D) layout
    return out.transpose(1, 2)


def _refuse_sdpa(r: Request) -> str | None:
    return "SDPA's fused kernels have no forward-mode (JVP) rule; use triton_jvp or math" if r.needs_jvp else None


def _interpreting() -> bool:
    """Whether the Triton kernels run (or, once imported, will run) on CPU in Triton's interpreter. Decided
    without importing them: their import fixes the mode for the process."""
    flash = sys.modules.get(f"{__package__}.flash")
    if flash is not None:
        return flash.interpreted()
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _refuse_triton_common(r: Request) -> str | None:
    if r.device.type != "cuda" and not _interpreting():
        return f"Triton kernels need CUDA tensors (got {r.device}; on CPU only under TRITON_INTERPRET=1)"
    if r.dtype not in TRITON_DTYPES:
        return f"dtype {r.dtype} is not one of {TRITON_DTYPES}"
    if r.head_dim > TRITON_MAX_HEAD_DIM:
        return f"head dim {r.head_dim} > {TRITON_MAX_HEAD_DIM}"
    return None


def _refuse_triton(r: Request) -> str | None:
    if r.needs_jvp:
        return "the triton backend has no forward-mode (JVP) rule; use triton_jvp"
    return _triton_importable() or _refuse_triton_common(r)


def _refuse_triton_jvp(r: Request) -> str | None:
    return _triton_importable() or _refuse_triton_common(r)


def _refuse_xformers(r: Request) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if r.device.type != "cuda":
        return f"xformers needs CUDA tensors (got {r.device})"
    return "xformers has no forward-mode (JVP) rule" if r.needs_jvp else None


def _triton_importable() -> str | None:
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("sdpa", _run_sdpa, _refuse_sdpa),
    Backend("math", _run_math, lambda r: None),
    Backend("triton", _run_triton, _refuse_triton),
    Backend("triton_jvp", _run_triton_jvp, _refuse_triton_jvp),
    Backend("block_sparse", _run_block_sparse, _refuse_triton_jvp),
    Backend("xformers", _run_xformers, _refuse_xformers),
)}
NAMES = ("auto", *BACKENDS)


def resolve(backend: str, request: Request) -> str:
    """The backend that will serve ``request``: ``backend`` itself (if it can) or ``auto``'s choice."""
    if backend == "auto":
        for name in AUTO_JVP if request.needs_jvp else AUTO_PLAIN:
            if BACKENDS[name].refuses(request) is None:
                return name
        raise AssertionError("math attention serves every request")
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; one of {list(NAMES)}")
    reason = BACKENDS[backend].refuses(request)
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} cannot serve this call: {reason}")
    return backend


def available_backends(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       head_dim: int = 64) -> list[str]:
    """Backends that can run plain attention on ``device`` here and now."""
    request = Request(torch.device(device), dtype, head_dim, needs_jvp=False)
    return [n for n, b in BACKENDS.items() if b.refuses(request) is None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              mask: torch.Tensor | None = None, scale: float | None = None, density: float = 0.5) -> torch.Tensor:
    """``softmax(scale q k^T) v`` for ``q`` ``(B, H, Nq, D)`` and ``k, v`` ``(B, H, Nk, D)`` (self- or
    cross-attention). ``mask``: ``(B, Nk)`` bool key-padding mask, True = attend. ``scale`` defaults to
    ``1/sqrt(D)``. ``density``: the fraction of key tiles ``block_sparse`` keeps per query tile (other
    backends ignore it)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    check_keep(mask, q.shape[0], k.shape[2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    request = Request(q.device, q.dtype, q.shape[-1], _needs_jvp(q, k, v))
    name = resolve(backend, request)
    return BACKENDS[name].run(q, k, v, mask, scale, density)
