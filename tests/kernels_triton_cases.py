"""The Triton kernels of diffdistill.kernels on CPU in Triton's interpreter, against fp64 math attention: flash
forward, gradients and JVP (self- and cross-attention, Nq != Nk, key padding, SD head dims, fp32/fp16/bf16),
block-sparse attention, and the diffusers processor on a tiny UNet (outputs, gradients, ``torch.func.jvp``).

Error rule (FlashAttention's tests): a kernel's max error against the fp64 reference is at most 2x that of
PyTorch math attention in the same precision against the same reference.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so ``test_kernels.py`` runs this file in a
child process with it set (``TRITON_INTERPRET=1 pytest tests/kernels_triton_cases.py`` does the same by hand;
without the variable it refuses to load). Its name keeps pytest's default collection from picking it up.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_kernels import _err, _grads, _jvp, _keep, _qkv, _tiny_unet, _unet_inputs, _unet_out_and_grads

from diffdistill.kernels import attention, use_attention
from diffdistill.kernels.reference import math_attention

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("kernels_triton_cases.py needs TRITON_INTERPRET=1 set before triton's import: "
                       "run `TRITON_INTERPRET=1 pytest tests/kernels_triton_cases.py` (test_kernels.py does)")


@pytest.fixture(scope="module")
def flash():
    from diffdistill.kernels import flash

    assert flash.interpreted(), "triton was imported before TRITON_INTERPRET=1 was set"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield flash
    torch.set_num_threads(n)


def test_constants_match_registry(flash):
    from diffdistill.kernels import backends

    assert backends.TRITON_DTYPES == flash.SUPPORTED_DTYPES and backends.TRITON_MAX_HEAD_DIM == flash.MAX_HEAD_DIM


# (B, H, Nq, Nk, D, masked): self-attention, cross-attention with Nq != Nk (neither a tile multiple) and a
# key-padding mask, and the non-power-of-two head dims SD/SDXL/FLUX use (padded inside the kernel)
SHAPES = [(1, 2, 128, 128, 64, False), (2, 1, 100, 77, 40, True), (1, 1, 70, 70, 80, True), (1, 1, 64, 20, 160, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}q{}k{}d{}{}".format(*s[:5], "m" if s[5] else ""))
def test_forward_backward_jvp_match_fp64(flash, shape):
    B, H, NQ, NK, D, masked = shape
    q, k, v = _qkv(B, H, NQ, NK, D)
    keep = _keep(B, NK) if masked else None
    do = _qkv(B, H, NQ, NQ, D, seed=2)[0]
    tangents = _qkv(B, H, NQ, NK, D, seed=3)
    ref, ref_g = _grads(lambda a, b, c: math_attention(a, b, c, keep), *(x.double() for x in (q, k, v)), do)
    low, low_g = _grads(lambda a, b, c: math_attention(a, b, c, keep), q, k, v, do)
    tri, tri_g = _grads(lambda a, b, c: attention(a, b, c, "triton_jvp", keep), q, k, v, do)
    assert tri.dtype == torch.float32
    assert _err(tri, ref) <= 2 * _err(low, ref)
    for name, g, gl, gr in zip("qkv", tri_g, low_g, ref_g):
        assert _err(g, gr) <= 2 * _err(gl, gr), f"d{name}"
    t_ref = _jvp(lambda a, b, c: math_attention(a, b, c, keep), [x.double() for x in (q, k, v)],
                 [t.double() for t in tangents])
    t_low = _jvp(lambda a, b, c: math_attention(a, b, c, keep), [q, k, v], tangents)
    t_tri = _jvp(lambda a, b, c: attention(a, b, c, "triton_jvp", keep), [q, k, v], tangents)
    assert _err(t_tri, t_ref) <= 2 * _err(t_low, t_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(flash, dtype):
    """fp16/bf16 inputs (fp32 accumulation inside): forward, gradients and JVP within 2x of math attention in
    the same dtype."""
    q, k, v = _qkv(1, 2, 96, 80, 64, dtype)
    keep = _keep(1, 80)
    do = _qkv(1, 2, 96, 96, 64, dtype, seed=2)[0]
    tangents = _qkv(1, 2, 96, 80, 64, dtype, seed=3)
    fn = lambda a, b, c: math_attention(a, b, c, keep)
    ref, ref_g = _grads(fn, *(x.double() for x in (q, k, v)), do)
    low, low_g = _grads(fn, q, k, v, do)
    tri, tri_g = _grads(lambda a, b, c: attention(a, b, c, "triton_jvp", keep), q, k, v, do)
    assert tri.dtype == dtype
    assert _err(tri, ref) <= 2 * _err(low, ref)
    for name, g, gl, gr in zip("qkv", tri_g, low_g, ref_g):
        assert _err(g, gr) <= 2 * _err(gl, gr), f"d{name}"
    t_ref = _jvp(fn, [x.double() for x in (q, k, v)], [t.double() for t in tangents])
    t_low = _jvp(fn, [q, k, v], tangents)
    t_tri = _jvp(lambda a, b, c: attention(a, b, c, "triton_jvp", keep), [q, k, v], tangents)
    assert _err(t_tri, t_ref) <= 2 * _err(t_low, t_ref)


def test_triton_backend_and_forward_ad(flash):
    """``triton`` (forward + backward) equals ``triton_jvp``; it refuses a JVP by name, and ``auto`` picks
    ``triton_jvp`` under ``torch.autograd.forward_ad`` (SDPA has no forward-mode rule)."""
    from torch.autograd import forward_ad

    q, k, v = _qkv(1, 2, 64, 64, 32)
    assert torch.equal(attention(q, k, v, "triton"), attention(q, k, v, "triton_jvp"))
    with pytest.raises(ValueError, match="triton_jvp"):
        torch.func.jvp(lambda a: attention(a, k, v, "triton"), (q,), (q,))
    with pytest.raises(ValueError, match="forward-mode"):
        torch.func.jvp(lambda a: attention(a, k, v, "sdpa"), (q,), (q,))
    t = _qkv(1, 2, 64, 64, 32, seed=5)[0]
    with forward_ad.dual_level():
        out = attention(forward_ad.make_dual(q, t), k, v, "auto")
        tangent = forward_ad.unpack_dual(out).tangent
    expected = _jvp(lambda a: math_attention(a.double(), k.double(), v.double()), [q], [t])
    assert _err(tangent, expected) < 1e-5
    assert _err(_jvp(lambda a: attention(a, k, v, "auto"), [q], [t]), expected) < 1e-5
    # sCM-style: the primal of a jvp keeps its reverse-mode graph (the tangent is used under stop-gradient)
    grads = []
    for backend in ("triton_jvp", "math"):
        qq = q.clone().requires_grad_()
        out, _ = torch.func.jvp(lambda a, b=backend: attention(a, k, v, b), (qq,), (t,))
        out.square().sum().backward()
        grads.append(qq.grad)
    assert (grads[0] - grads[1]).abs().max() < 1e-5


def test_block_sparse_density_one_is_dense(flash):
    q, k, v = _qkv(1, 2, 128, 192, 32)
    keep = _keep(1, 192)
    dense = math_attention(q.double(), k.double(), v.double(), keep)
    assert _err(attention(q, k, v, "block_sparse", keep, density=1.0), dense) < 1e-5


def test_block_sparse_equals_masked_dense(flash):
    """At density 0.5 the kernels (which skip the unlisted tiles) equal dense attention with the same tile mask,
    in the forward, all three gradients and the JVP."""
    from diffdistill.kernels.block_sparse import block_mask, block_sparse_attention, block_sparse_reference

    B, H, N, D = 1, 2, 256, 32
    q, k, v = _qkv(B, H, N, N, D)
    keep = _keep(B, N)
    mask = block_mask(q, k, 0.5, flash.BLOCK_M, flash.BLOCK_N, keep)
    assert mask.shape == (B, H, 4, 4) and (mask.sum(-1) == 2).all()
    do = _qkv(B, H, N, N, D, seed=2)[0]
    tangents = _qkv(B, H, N, N, D, seed=3)
    ref_fn = lambda a, b, c: block_sparse_reference(a, b, c, mask, keep)
    sparse_fn = lambda a, b, c: block_sparse_attention(a, b, c, 0.5, keep, mask=mask)
    ref, ref_g = _grads(ref_fn, *(x.double() for x in (q, k, v)), do)
    out, g = _grads(sparse_fn, q, k, v, do)
    assert _err(out, ref) < 1e-5 and max(_err(a, b) for a, b in zip(g, ref_g)) < 1e-5
    assert _err(out, math_attention(q.double(), k.double(), v.double(), keep)) > 1e-2  # the mask did something
    t = _jvp(sparse_fn, [q, k, v], tangents)
    assert _err(t, _jvp(ref_fn, [x.double() for x in (q, k, v)], [x.double() for x in tangents])) < 1e-5
    adaptive = attention(q, k, v, "block_sparse", keep, density=0.5)  # the mask chosen inside is the same one
    assert torch.equal(adaptive, out)


def test_processor_matches_sdpa_on_tiny_unet(flash):
    """The UNet with every attention layer on the Triton kernels gives SDPA's output and parameter gradients,
    with a padded prompt in cross-attention."""
    from diffdistill.kernels import KernelAttnProcessor

    unet = _tiny_unet()
    inputs = _unet_inputs()
    ref, ref_g = _unet_out_and_grads(unet, *inputs)
    use_attention(unet, "triton")
    assert all(isinstance(p, KernelAttnProcessor) for p in unet.attn_processors.values())
    out, g = _unet_out_and_grads(unet, *inputs)
    assert (out - ref).abs().max() < 1e-5
    assert set(g) == set(ref_g)
    scale = max(x.abs().max().item() for x in ref_g.values())  # some grads are ~0 (biases before a norm)
    assert max((g[n] - ref_g[n]).abs().max().item() for n in g) < 1e-5 * scale
    unmasked, _ = _unet_out_and_grads(unet, *inputs[:3], torch.ones_like(inputs[3]))
    assert (unmasked[1] - out[1]).abs().max() > 1e-4  # the padding mask reached the kernel


def test_jvp_through_tiny_unet(flash):
    """``torch.func.jvp`` through the whole UNet with ``triton_jvp`` matches it through math attention."""
    unet = _tiny_unet().eval()
    x, t, cond, pad = _unet_inputs()
    tx = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))

    def f(sample):
        return unet(sample, t, cond, encoder_attention_mask=pad).sample

    use_attention(unet, "math")
    out_ref, t_ref = torch.func.jvp(f, (x,), (tx,))
    use_attention(unet, "triton_jvp")
    out, tangent = torch.func.jvp(f, (x,), (tx,))
    assert (out - out_ref).abs().max() < 1e-5
    assert (tangent - t_ref).abs().max() < 1e-4 * t_ref.abs().max()


