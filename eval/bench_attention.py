"""Attention backends side by side: speed (TFLOP/s and the ratio to SDPA), JVP memory, and a whole UNet step.

For attention shapes of SD1.5 (head dim 40/80/160, self-attention over 64x64..8x8 latent tokens, cross-attention
over 77 prompt tokens), SDXL (head dim 64) and FLUX (head dim 128, 4096 image + 512 text tokens), and longer
sequences, each backend of ``diffdistill.kernels`` is timed in

* ``fwd``: the forward; ``bwd``: the backward alone (forward excluded); ``jvp``: ``torch.func.jvp`` (forward
  and tangent) — compared with math attention's JVP, since SDPA's fused kernels have no forward-mode rule.

TFLOP/s use nominal counts: forward ``4 B H Nq Nk D``, backward 2.5x that (FlashAttention's convention), JVP
3.5x (the forward's two matmuls plus the tangent's five). ``vs_sdpa`` is SDPA's time over the row's time in the
same mode (> 1: faster than SDPA); JVP rows compare with math attention. On CUDA the JVP table adds the peak
memory of ``triton_jvp`` vs math attention; a last table times one training step (forward + backward of an
MSE loss) of an SD1.5-shaped UNet with each backend installed by ``use_attention``.

The Triton rows (``triton``, ``triton_jvp``, ``block_sparse``) need CUDA; on CPU the script runs the PyTorch
rows (``sdpa``, ``math``, ``block_sparse_ref`` = the block mask applied to dense math attention) and says so.
``--quick`` runs a few tiny shapes and a tiny UNet in seconds (what the tests run)::

    python eval/bench_attention.py --quick                      # CPU smoke run
    python eval/bench_attention.py --dtype float16 --json out.json   # one GPU: every table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

# (name, B, H, Nq, Nk, D)
SHAPES = [
    ("sd15-self-64x64", 2, 8, 4096, 4096, 40), ("sd15-cross-64x64", 2, 8, 4096, 77, 40),
    ("sd15-self-32x32", 2, 8, 1024, 1024, 80), ("sd15-self-16x16", 2, 8, 256, 256, 160),
    ("sd15-self-8x8", 2, 8, 64, 64, 160),
    ("sdxl-self-64x64", 2, 10, 4096, 4096, 64), ("sdxl-self-32x32", 2, 20, 1024, 1024, 64),
    ("sdxl-cross-32x32", 2, 20, 1024, 77, 64),
    ("flux-joint-1024px", 1, 24, 4608, 4608, 128), ("long-16k", 1, 8, 16384, 16384, 64),
]
QUICK_SHAPES = [("tiny-self", 1, 2, 64, 64, 40), ("tiny-self-256", 1, 2, 256, 256, 64), ("tiny-cross", 1, 2, 64, 77, 80)]
TRITON = ("triton", "triton_jvp", "block_sparse")
FLOPS = {"fwd": 4.0, "bwd": 10.0, "jvp": 14.0}  # x B H Nq Nk D
SD15_UNET = {  # diffusers' stable-diffusion-v1-5 unet/config.json, the shape-defining entries
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
TINY_UNET = {"layers_per_block": 1, "block_out_channels": [32, 64], "cross_attention_dim": 32, "attention_head_dim": 2,
             "norm_num_groups": 32, "in_channels": 4, "out_channels": 4,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and a tiny UNet on CPU, seconds")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (forced by --quick)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backends", nargs="*", default=None,
                   help="subset of sdpa math triton triton_jvp block_sparse xformers (default: all)")
    p.add_argument("--density", type=float, default=0.5, help="block_sparse: fraction of key tiles kept")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (median; default 20, quick 3)")
    p.add_argument("--no-unet", action="store_true", help="skip the whole-UNet training step table")
    p.add_argument("--unet-latent", type=int, default=64, help="UNet step: latent side (64 = 512 px SD1.5)")
    p.add_argument("--json", default=None, help="also write every row to this JSON file")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _runner(backend: str, density: float, keep=None):
    """``f(q, k, v) -> O`` for a backend name; ``block_sparse_ref`` is the mask applied to dense math."""
    from diffdistill.kernels import attention
    from diffdistill.kernels.block_sparse import block_mask, block_sparse_reference

    if backend == "block_sparse_ref":
        def ref(q, k, v):
            mask = block_mask(q, k, density, 64, 64, keep)
            return block_sparse_reference(q, k, v, mask, keep)
        return ref
    return lambda q, k, v: attention(q, k, v, backend, keep, density=density)


def bench_shape(shape, backend: str, mode: str, args, device, dtype) -> dict | None:
    name, B, H, NQ, NK, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (NQ, NK, NK))
    f = _runner(backend, args.density)
    row = {"shape": name, "backend": backend, "mode": mode, "B": B, "H": H, "Nq": NQ, "Nk": NK, "D": D}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode == "fwd":
        with torch.no_grad():
            ms = timed(lambda: f(q, k, v), device, args.iters)
    elif mode == "bwd":
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        def step():
            out = f(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)
        with torch.no_grad():
            fwd_ms = timed(lambda: f(q, k, v), device, args.iters)
        ms = max(timed(step, device, args.iters) - fwd_ms, 1e-6)
    else:
        tangents = tuple(torch.randn_like(x) for x in (q, k, v))
        ms = timed(lambda: torch.func.jvp(f, (q, k, v), tangents), device, args.iters)
    row["ms"] = ms
    row["tflops"] = FLOPS[mode] * B * H * NQ * NK * D / (ms * 1e-3) / 1e12
    if device.type == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def attention_tables(args, device, dtype, backends) -> list[dict]:
    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for mode in ("fwd", "bwd", "jvp"):
        for shape in shapes:
            for backend in backends:
                if mode == "jvp" and backend in ("sdpa", "xformers", "triton"):
                    continue  # no forward-mode rule
                if mode == "fwd" and backend == "triton_jvp":
                    continue  # the same forward as triton
                try:
                    rows.append(bench_shape(shape, backend, mode, args, device, dtype))
                except torch.OutOfMemoryError:
                    rows.append({"shape": shape[0], "backend": backend, "mode": mode, "ms": math.nan,
                                 "tflops": math.nan, "note": "out of memory"})
                    torch.cuda.empty_cache()
    base = {(r["shape"], r["mode"]): r["ms"] for r in rows if r["backend"] == ("math" if r["mode"] == "jvp"
                                                                              else "sdpa")}
    for r in rows:
        ref = base.get((r["shape"], r["mode"]))
        r["vs_sdpa"] = ref / r["ms"] if ref and r["ms"] == r["ms"] else math.nan
    return rows


def unet_table(args, device, dtype, backends) -> list[dict]:
    from diffusers import UNet2DConditionModel

    from diffdistill.kernels import use_attention

    cfg, latent, B = (TINY_UNET, 8, 2) if args.quick else (SD15_UNET, args.unet_latent, 2)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg, sample_size=latent).to(device, dtype).train()
    x = torch.randn(B, 4, latent, latent, device=device, dtype=dtype)
    cond = torch.randn(B, 77, cfg["cross_attention_dim"], device=device, dtype=dtype)
    t = torch.tensor([500] * B, device=device)
    rows = []
    for backend in backends:
        use_attention(unet, backend, density=args.density)

        def step():
            unet.zero_grad(set_to_none=True)
            unet(x, t, cond).sample.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = timed(step, device, max(1, args.iters // 4))
        row = {"shape": f"unet-{'tiny' if args.quick else 'sd15'}-{latent}x{latent}", "backend": backend,
               "mode": "train_step", "ms": ms}
        if device.type == "cuda":
            row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)
    sdpa = next((r["ms"] for r in rows if r["backend"] == "sdpa"), None)
    for r in rows:
        r["vs_sdpa"] = sdpa / r["ms"] if sdpa else math.nan
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    print("| shape | backend | mode | ms | TFLOP/s | vs SDPA (JVP: vs math) | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['backend']} | {r['mode']} | {r['ms']:.3f} | {r.get('tflops', math.nan):.3f} | "
              f"{r.get('vs_sdpa', math.nan):.2f} | {r.get('peak_mb', math.nan):.0f} |" + (
                  f" {r['note']}" if "note" in r else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffdistill.kernels import BACKENDS

    device = torch.device("cpu" if args.quick else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    args.iters = args.iters or (3 if args.quick else 20)
    wanted = args.backends or [*BACKENDS]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; one of {list(BACKENDS)}")
    available = [b for b in wanted if b in ("sdpa", "math") or (
        BACKENDS[b].refuses(_request(device, dtype)) is None)]
    skipped = [b for b in wanted if b not in available]
    if device.type != "cuda":
        if args.quick:
            torch.set_num_threads(1)
        print("Triton rows need CUDA: on CPU only the PyTorch rows run (sdpa, math, block_sparse_ref = the "
              "block-sparse mask applied to dense math attention)")
        available = [b for b in available if b not in TRITON]
        if "block_sparse" in wanted:
            available.append("block_sparse_ref")
    if skipped:
        print(f"not available here: {', '.join(skipped)}")
    print(f"device {device}, dtype {dtype}, backends {available}, density {args.density}, median of {args.iters}")
    rows = attention_tables(args, device, dtype, available)
    print_table(rows, "attention (fwd / bwd / jvp)")
    if not args.no_unet:
        unet_rows = unet_table(args, device, dtype, [b for b in available if b != "block_sparse_ref"])
        print_table(unet_rows, "whole UNet training step (forward + backward)")
        rows += unet_rows
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "dtype": str(dtype), "rows": rows}, indent=1))
    return 0


def _request(device, dtype):
    from diffdistill.kernels.backends import Request

    return Request(device, dtype, 64, needs_jvp=False)


if __name__ == "__main__":
    sys.exit(main())
