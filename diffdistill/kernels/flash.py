"""Triton flash attention: forward, backward and a forward-mode JVP rule, with optional block sparsity.

FlashAttention (Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
NeurIPS 2022; FlashAttention-2, arXiv 2307.08691) computes ``O = softmax(S) V`` with ``S = scale Q K^T`` tile
by tile with an online softmax, so no ``(Nq, Nk)`` matrix is ever stored: the forward keeps per row the
running max ``m``, the running sum ``l`` and the unnormalised output, and saves only ``O`` and the
log-sum-exp ``lse`` for the backward. The backward recomputes ``P = exp(S - lse)`` per tile (eq. of FA-2
alg. 2): ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dO * O))``, ``dQ = scale dS K``,
``dK = scale dS^T Q`` — one kernel per key tile for ``dK, dV`` and one per query tile for ``dQ`` (no atomics).

The JVP (forward-mode derivative; what continuous-time consistency models, sCM/rCM/SANA-Sprint, take
through the whole network) of ``O`` along tangents ``(dQ, dK, dV)`` is

    dO = P dV + (P * (dS - r)) V = P dV + (P * dS) V - r O,   dS = scale (dQ K^T + Q dK^T),  r = rowsum(P * dS)

Given the forward's ``lse`` every tile's ``P`` is exact, so one streaming pass over the key tiles with three
accumulators (``P dV``, ``(P * dS) V``, ``r``) gives it in O(N) memory; math attention's JVP stores ``P`` and
``dS`` (O(N^2)).

Layout: ``(B, H, N, D)`` tensors (any strides with a unit last stride). Head dims that are not a power of two
(SD's 40, 80, 160) are padded to the next one inside the kernel by masked loads. ``keep``: an optional
``(B, Nk)`` key-padding mask (True = attend). Block sparsity: for each query tile a list of key tiles to visit
(and, for the backward, the transposed lists); tiles off the list are skipped, not computed and masked.

The kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``, which must be set before
this module is imported (``triton.jit`` decides then). Written for this project after the structure of the
Triton fused-attention tutorial (kernel, autograd wrapper, reference test, benchmark); no code copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
BLOCK_M = 64
BLOCK_N = 64
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@triton.jit
def _visit_count(CNT, own, N_ALL, SPARSE: tl.constexpr):
    """How many tiles of the other axis program ``own`` (= bh * its axis' tile count + its tile) visits."""
    n = N_ALL
    if SPARSE:
        n = tl.load(CNT + own)
    return n


@triton.jit
def _visited_tile(IDX, own, N_ALL, i, SPARSE: tl.constexpr):
    """The index of the ``i``-th tile program ``own`` visits: ``i`` itself when dense, else from its list."""
    j = i
    if SPARSE:
        j = tl.load(IDX + own * N_ALL + i)
    return j


@triton.jit
def _key_columns(KEEP, b, j, NK, BLOCK_N: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Key tile ``j``: its columns, and which of them exist and are kept by the padding mask."""
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NK
    if HAS_KEEP:
        col_ok = col_ok & (tl.load(KEEP + b * NK + cols, mask=cols < NK, other=0) != 0)
    return cols, col_ok


@triton.jit
def _load_tile(PTR, b, h, sb, sh, sn, idx, dims, mask):
    """Rows ``idx`` of head ``(b, h)`` of a strided ``(B, H, N, D)`` tensor (masked entries 0)."""
    return tl.load(PTR + b * sb + h * sh + idx[:, None] * sn + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KEEP, KIDX, KCNT,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, NQ, NK, D, NQB, NKB, scale_log2,
                HAS_KEEP: tl.constexpr, SPARSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < NQ
    dim_ok = dims < D
    q = _load_tile(Q, b, h, sqb, sqh, sqn, rows, dims, row_ok[:, None] & dim_ok[None, :])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    own = bh * NQB + pid_m
    for i in range(_visit_count(KCNT, own, NKB, SPARSE)):
        cols, col_ok = _key_columns(KEEP, b, _visited_tile(KIDX, own, NKB, i, SPARSE), NK, BLOCK_N, HAS_KEEP)
        kv_mask = (cols < NK)[:, None] & dim_ok[None, :]
        k = _load_tile(K, b, h, skb, skh, skn, cols, dims, kv_mask)
        v = _load_tile(V, b, h, svb, svh, svn, cols, dims, kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BM, BN), log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no key to attend yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    o = acc / l[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * son + dims[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + bh * NQ + rows, m + tl.log2(l), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KEEP, QIDX, QCNT,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                     H, NQ, NK, D, NQB, NKB, scale, scale_log2,
                     HAS_KEEP: tl.constexpr, SPARSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    dims = tl.arange(0, HEAD_DIM)
    dim_ok = dims < D
    cols, col_ok = _key_columns(KEEP, b, pid_n, NK, BLOCK_N, HAS_KEEP)
    kv_mask = (cols < NK)[:, None] & dim_ok[None, :]
    k = _load_tile(K, b, h, skb, skh, skn, cols, dims, kv_mask)
    v = _load_tile(V, b, h, svb, svh, svn, cols, dims, kv_mask)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    own = bh * NKB + pid_n
    for i in range(_visit_count(QCNT, own, NQB, SPARSE)):
        rows = _visited_tile(QIDX, own, NQB, i, SPARSE) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < NQ
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = _load_tile(Q, b, h, sqb, sqh, sqn, rows, dims, q_mask)
        do = _load_tile(DO, b, h, sdb, sdh, sdn, rows, dims, q_mask)
        lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * NQ + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)  # (BM, BN)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = (bh * NK + cols[:, None]) * D + dims[None, :]  # DK, DV: contiguous (B, H, NK, D)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEEP, KIDX, KCNT,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                   H, NQ, NK, D, NQB, NKB, scale, scale_log2,
                   HAS_KEEP: tl.constexpr, SPARSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < NQ
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = _load_tile(Q, b, h, sqb, sqh, sqn, rows, dims, q_mask)
    do = _load_tile(DO, b, h, sdb, sdh, sdn, rows, dims, q_mask)
    lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * NQ + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    own = bh * NQB + pid_m
    for i in range(_visit_count(KCNT, own, NKB, SPARSE)):
        cols, col_ok = _key_columns(KEEP, b, _visited_tile(KIDX, own, NKB, i, SPARSE), NK, BLOCK_N, HAS_KEEP)
        kv_mask = (cols < NK)[:, None] & dim_ok[None, :]
        k = _load_tile(K, b, h, skb, skh, skn, cols, dims, kv_mask)
        v = _load_tile(V, b, h, svb, svh, svn, cols, dims, kv_mask)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    out = (bh * NQ + rows[:, None]) * D + dims[None, :]  # DQ: contiguous (B, H, NQ, D)
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _jvp_kernel(Q, K, V, TQ, TK, TV, O, LSE, TO, KEEP, KIDX, KCNT,
                H, NQ, NK, D, NQB, NKB, scale, scale_log2,
                HAS_KEEP: tl.constexpr, SPARSE: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # every tensor here is contiguous (B, H, N, D)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < NQ
    dim_ok = dims < D
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q_off = (bh * NQ + rows[:, None]) * D + dims[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    tq = tl.load(TQ + q_off, mask=q_mask, other=0.0)
    o = tl.load(O + q_off, mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + bh * NQ + rows, mask=row_ok, other=0.0)
    acc_pdv = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # P dV
    acc_dsv = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # (P * dS) V
    r = tl.zeros([BLOCK_M], tl.float32)                  # rowsum(P * dS)
    own = bh * NQB + pid_m
    for i in range(_visit_count(KCNT, own, NKB, SPARSE)):
        cols, col_ok = _key_columns(KEEP, b, _visited_tile(KIDX, own, NKB, i, SPARSE), NK, BLOCK_N, HAS_KEEP)
        kv_mask = (cols < NK)[:, None] & dim_ok[None, :]
        kv_off = (bh * NK + cols[:, None]) * D + dims[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        tk = tl.load(TK + kv_off, mask=kv_mask, other=0.0)
        tv = tl.load(TV + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)  # (BM, BN)
        ds = (tl.dot(tq, tl.trans(k), input_precision=PRECISION)
              + tl.dot(q, tl.trans(tk), input_precision=PRECISION)) * scale
        pds = p * ds
        acc_pdv += tl.dot(p.to(tv.dtype), tv, input_precision=PRECISION)
        acc_dsv += tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
        r += tl.sum(pds, 1)
    to = acc_pdv + acc_dsv - r[:, None] * o
    tl.store(TO + q_off, to.to(TO.dtype.element_ty), mask=q_mask)


# -- host side ----------------------------------------------------------------------------------------------------

def interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_fwd_kernel, InterpretedFunction)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Raise a precise error for any request these kernels cannot serve."""
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"triton attention needs one dtype of {SUPPORTED_DTYPES} for q, k, v; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[2] != v.shape[2] or k.shape[3] != D \
            or v.shape[3] != D:
        raise ValueError(f"triton attention: k, v must be (B, H, Nk, D) matching q {tuple(q.shape)}; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    if q.device.type != "cuda" and not interpreted():
        raise RuntimeError(f"triton attention runs on CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
                           "before diffdistill.kernels.flash is first imported")
    if keep is not None and (keep.shape != (B, k.shape[2]) or keep.dtype != torch.bool):
        raise ValueError(f"key padding mask must be bool (B, Nk) = {(B, k.shape[2])}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")


def _plain(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` without torch.func's wrappers: the jvp/backward rules of a ``torch.func`` transform receive the
    tensors wrapped for that transform's level, and kernels need storage. Batched (vmap) tensors are refused."""
    F = torch._C._functorch
    while x is not None and F.is_functorch_wrapped_tensor(x):
        if F.is_batchedtensor(x):
            raise NotImplementedError("torch.func.vmap over the Triton attention kernels is not supported")
        x = F.get_unwrapped(x)
    return x


def _plain_lists(a):
    """Block-sparse visiting lists (a dataclass of tensors) with their tensors unwrapped; anything else as is."""
    if not dataclasses.is_dataclass(a):
        return a
    return type(a)(**{f.name: _plain(getattr(a, f.name)) for f in dataclasses.fields(a)})


def _outside_functorch(fn):
    """Run the host code of ``fn`` with torch.func's dispatch off: inside a transform's jvp/backward rule even new
    tensors (outputs, scratch) would otherwise come back wrapped, without storage for the kernels."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = [_plain(a) if isinstance(a, torch.Tensor) else _plain_lists(a) for a in args]
        with torch._C._DisableFuncTorch():
            if args[0].dtype == torch.bfloat16 and interpreted():
                return _bf16_via_fp32(fn, args, kwargs)
            return fn(*args, **kwargs)
    return wrapper


def _bf16_via_fp32(fn, args, kwargs):
    """Triton 3.8's CPU interpreter multiplies bf16 ``tl.dot`` operands as their raw uint16 bits (garbage), so
    under the interpreter bf16 inputs are computed in fp32 and the results rounded to bf16. On CUDA the kernels
    take bf16 directly."""
    up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
    out = fn(*up, **kwargs)
    if isinstance(out, torch.Tensor):
        return out.to(torch.bfloat16)
    if fn.__name__ == "flash_forward":  # (O, lse): lse stays fp32
        return out[0].to(torch.bfloat16), out[1]
    return tuple(x.to(torch.bfloat16) for x in out)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    x = _plain(x)
    return x if x.stride(-1) == 1 else x.contiguous()


def _common(q, k, keep, sparse):
    """Launch arguments shared by every kernel: sizes, scale, mask and sparsity pointers, constexprs."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    nqb, nkb = triton.cdiv(NQ, BLOCK_M), triton.cdiv(NK, BLOCK_N)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    keep_t = dummy if keep is None else keep.to(torch.int8).contiguous()
    head_dim = max(16, triton.next_power_of_2(D))
    # fp32 inputs: exact fp32 products (the error rule), not TF32; launch sizes: the interpreter ignores them
    consts = {"HAS_KEEP": keep is not None, "SPARSE": sparse is not None, "HEAD_DIM": head_dim, "BLOCK_M": BLOCK_M,
              "BLOCK_N": BLOCK_N, "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
              "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 2 if head_dim <= 128 else 1}
    return B, H, NQ, NK, D, nqb, nkb, keep_t, dummy, consts


@_outside_functorch
def flash_forward(q, k, v, scale: float, keep=None, sparse=None):
    """``(O, lse)``: ``O`` like ``q``, ``lse`` ``(B, H, Nq)`` fp32 in log2 units. ``sparse``: a
    :class:`~diffdistill.kernels.block_sparse.BlockLists` or None (dense)."""
    q, k, v, keep = _unit_last(q), _unit_last(k), _unit_last(v), _plain(keep)
    B, H, NQ, NK, D, nqb, nkb, keep_t, dummy, consts = _common(q, k, keep, sparse)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    kidx, kcnt = (dummy, dummy) if sparse is None else (sparse.k_index, sparse.k_count)
    _fwd_kernel[(nqb, B * H)](q, k, v, o, lse, keep_t, kidx, kcnt, *q.stride()[:3], *k.stride()[:3],
                              *v.stride()[:3], *o.stride()[:3], H, NQ, NK, D, nqb, nkb, scale * LOG2E, **consts)
    return o, lse


@_outside_functorch
def flash_backward(q, k, v, o, lse, do, scale: float, keep=None, sparse=None):
    """``(dQ, dK, dV)`` for the loss gradient ``do`` of ``O``."""
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    o, lse, keep = _plain(o), _plain(lse), _plain(keep)
    B, H, NQ, NK, D, nqb, nkb, keep_t, dummy, consts = _common(q, k, keep, sparse)
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, H, NQ): rowsum(dO * O)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    sizes = (H, NQ, NK, D, nqb, nkb, scale, scale * LOG2E)
    qidx, qcnt = (dummy, dummy) if sparse is None else (sparse.q_index, sparse.q_count)
    kidx, kcnt = (dummy, dummy) if sparse is None else (sparse.k_index, sparse.k_count)
    _bwd_dkdv_kernel[(nkb, B * H)](q, k, v, do, lse, delta, dk, dv, keep_t, qidx, qcnt, *strides, *sizes, **consts)
    _bwd_dq_kernel[(nqb, B * H)](q, k, v, do, lse, delta, dq, keep_t, kidx, kcnt, *strides, *sizes, **consts)
    return dq, dk, dv


@_outside_functorch
def flash_jvp(q, k, v, o, lse, tq, tk, tv, scale: float, keep=None, sparse=None):
    """The tangent of ``O`` along ``(tq, tk, tv)`` (None = zero), in O(N) memory."""
    q, k, v, o, lse, keep, tq, tk, tv = (_plain(x) for x in (q, k, v, o, lse, keep, tq, tk, tv))
    tq = torch.zeros_like(q) if tq is None else tq.to(q.dtype)
    tk = torch.zeros_like(k) if tk is None else tk.to(k.dtype)
    tv = torch.zeros_like(v) if tv is None else tv.to(v.dtype)
    q, k, v, o, tq, tk, tv = (x.contiguous() for x in (q, k, v, o, tq, tk, tv))
    B, H, NQ, NK, D, nqb, nkb, keep_t, dummy, consts = _common(q, k, keep, sparse)
    to = torch.empty_like(q)
    kidx, kcnt = (dummy, dummy) if sparse is None else (sparse.k_index, sparse.k_count)
    _jvp_kernel[(nqb, B * H)](q, k, v, tq, tk, tv, o, lse, to, keep_t, kidx, kcnt, H, NQ, NK, D, nqb, nkb, scale,
                              scale * LOG2E, **consts)
    return to


class FlashAttention(torch.autograd.Function):
    """Flash attention with a backward (reverse mode). ``apply(q, k, v, scale, keep, sparse)`` -> ``(O, lse)``."""

    @staticmethod
    def forward(q, k, v, scale, keep, sparse):
        return flash_forward(q, k, v, scale, keep, sparse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, keep, sparse = inputs
        o, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.scale, ctx.keep, ctx.sparse = scale, keep, sparse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, o, lse, do, ctx.scale, ctx.keep, ctx.sparse)
        return dq, dk, dv, None, None, None


class FlashAttentionJVP(FlashAttention):
    """:class:`FlashAttention` plus the forward-mode rule, so ``torch.func.jvp`` and ``torch.autograd.forward_ad``
    go through it in O(N) memory. The primal output keeps its reverse-mode graph; the tangent carries none of
    its own (consistency training uses it under stop-gradient), and ``vmap`` over it is refused."""

    @staticmethod
    def jvp(ctx, tq, tk, tv, _scale, _keep, _sparse):
        q, k, v, o, lse = ctx.saved_tensors
        return flash_jvp(q, k, v, o, lse, tq, tk, tv, ctx.scale, ctx.keep, ctx.sparse), None


def default_scale(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])
