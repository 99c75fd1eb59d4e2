"""diffdistill.kernels without Triton: the backend registry, mask handling, block-mask selection, config names,
the diffusers processor with the PyTorch backends, the benchmark's CPU mode — and the Triton kernel tests of
``kernels_triton_cases.py``, run in a child process under ``TRITON_INTERPRET=1``.

Why a child process: ``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is defined, and triton's own
standard library (``tl.sum``, ``tl.max``, ``tl.zeros``) is defined when triton is first imported — which
diffusers does on import. In a suite where other modules have imported diffusers the variable is set too
late, and setting it globally at collection would change triton for every other test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffdistill.kernels import NAMES, attention, available_backends, use_attention
from diffdistill.kernels.processor import key_padding_mask
from diffdistill.kernels.reference import math_attention

REPO = Path(__file__).resolve().parent.parent


def test_triton_kernels_in_interpreter():
    """Runs tests/kernels_triton_cases.py (fp64-reference checks of the Triton kernels) with the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "kernels_triton_cases.py")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]


def _qkv(B, H, NQ, NK, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(dtype) for n in (NQ, NK, NK)]


def _keep(B, NK, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, NK, generator=g) > 0.3
    keep[:, 0] = True
    return keep


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


def _grads(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return out.detach(), [x.grad for x in (q, k, v)]


def _jvp(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(primals), tuple(tangents))[1]


def test_block_mask_follows_content():
    """A query tile whose queries align with one key tile's keys keeps that tile."""
    from diffdistill.kernels.block_sparse import block_lists, block_mask

    D = 16
    q = torch.zeros(1, 1, 128, D)
    k = torch.randn(1, 1, 256, D) * 0.01
    q[..., :64, 0] = 5.0          # query tile 0 points along e0 ...
    k[..., 192:, 0] = 5.0         # ... as do the keys of tile 3
    q[..., 64:, 1] = 5.0
    k[..., 64:128, 1] = 5.0
    mask = block_mask(q, k, 0.25, 64, 64)
    assert mask[0, 0].tolist() == [[False, False, False, True], [False, True, False, False]]
    lists = block_lists(mask)
    assert lists.k_count.tolist() == [[[1, 1]]] and lists.k_index[0, 0, :, 0].tolist() == [3, 1]
    assert lists.q_count.tolist() == [[[0, 1, 0, 1]]]
    with pytest.raises(ValueError, match="density"):
        block_mask(q, k, 0.0, 64, 64)


def test_registry_and_mask_errors():
    q, k, v = _qkv(2, 2, 16, 12, 8)
    keep = _keep(2, 12)
    ref = math_attention(q, k, v, keep)
    for name in ("sdpa", "math", "auto"):
        assert torch.allclose(attention(q, k, v, name, keep), ref, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, "flash3")
    with pytest.raises(ValueError, match="bool"):
        attention(q, k, v, "sdpa", keep.float())
    with pytest.raises(ValueError, match="every key"):
        attention(q, k, v, "sdpa", torch.zeros(2, 12, dtype=torch.bool))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="xformers"):
            attention(q, k, v, "xformers")
        assert {"sdpa", "math"} <= set(available_backends("cpu")) and "xformers" not in available_backends("cpu")


def test_config_backend_names_match_registry():
    from diffdistill.config import ATTENTION_BACKENDS, AttentionConfig, ConfigError
    assert set(ATTENTION_BACKENDS) == {"default", *NAMES}
    for name in ATTENTION_BACKENDS:
        AttentionConfig(backend=name).validate("attention")
    with pytest.raises(ConfigError, match="attention.backend"):
        AttentionConfig(backend="flash3").validate("attention")
    with pytest.raises(ConfigError, match="attention.density"):
        AttentionConfig(backend="block_sparse", density=1.5).validate("attention")


def test_key_padding_mask_conversion():
    bias = torch.tensor([[0.0, -10000.0, 0.0]])[:, None]  # what UNet2DConditionModel passes: (B, 1, Nk)
    assert key_padding_mask(bias, 1, 3).tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="soft"):
        key_padding_mask(torch.tensor([[[0.0, -0.5, 0.0]]]), 1, 3)
    with pytest.raises(ValueError, match="key-padding"):
        key_padding_mask(torch.zeros(1, 4, 3), 1, 3)


# -- the diffusers processor on a tiny UNet ---------------------------------------------------------------------

def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)  # 2 heads of 32


def _unet_inputs():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 7, 32, generator=g)
    pad = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # the second prompt has 3 padding tokens
    return x, torch.tensor([10, 500]), cond, pad


def _unet_out_and_grads(unet, x, t, cond, pad):
    unet.zero_grad()
    out = unet(x, t, cond, encoder_attention_mask=pad).sample
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def test_triton_refused_on_cpu_without_interpreter():
    q, k, v = _qkv(1, 1, 8, 8, 8)
    if os.environ.get("TRITON_INTERPRET") == "1":  # (a whole suite run by hand under the interpreter)
        assert attention(q, k, v, "triton").shape == q.shape
    else:
        with pytest.raises(ValueError, match="CUDA"):
            attention(q, k, v, "triton")
    assert attention(q, k, v, "auto").shape == q.shape  # auto stays on SDPA


def test_processor_with_pytorch_backends_matches_default():
    """On the tiny UNet (padded prompt in cross-attention) our processor on ``sdpa`` and ``math`` gives the stock
    processors' output and gradients."""
    unet = _tiny_unet()
    inputs = _unet_inputs()
    ref, ref_g = _unet_out_and_grads(unet, *inputs)
    for backend in ("sdpa", "math"):
        use_attention(unet, backend)
        out, g = _unet_out_and_grads(unet, *inputs)
        assert (out - ref).abs().max() < 1e-5
        scale = max(x.abs().max().item() for x in ref_g.values())  # some grads are ~0 (biases before a norm)
        assert max((g[n] - ref_g[n]).abs().max().item() for n in g) < 1e-5 * scale


def test_use_attention_refuses_foreign_processors():
    from diffdistill.nasa import NegativeAwayAttnProcessor

    unet = _tiny_unet()
    assert use_attention(unet, "default") is unet
    name = next(n for n in unet.attn_processors if "attn2" in n)
    unet.set_attn_processor({n: (NegativeAwayAttnProcessor(torch.zeros(1, 3, 32), 0.1) if n == name else p)
                             for n, p in unet.attn_processors.items()})
    with pytest.raises(ValueError, match="NegativeAwayAttnProcessor"):
        use_attention(unet, "sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        use_attention(_tiny_unet(), "flash3")


def test_bench_quick_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    script = str(REPO / "eval" / "bench_attention.py")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, timeout=120,
                           check=False)
    assert help_.returncode == 0 and "--quick" in help_.stdout
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, script, "--quick", "--json", str(out)], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Triton rows need CUDA" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {r["backend"] for r in rows} >= {"sdpa", "math", "block_sparse_ref"}
    assert all(math.isfinite(r["ms"]) for r in rows)


def test_trainer_applies_attention_backend(tiny_sd, tmp_path):
    """``attention.backend`` in a config routes the teacher's and the student's attention (and so the copies
    objectives make of them) through our processor."""
    from diffdistill.config import load_config
    from diffdistill.kernels import KernelAttnProcessor
    from diffdistill.trainer import Trainer

    cfg = load_config(REPO / "configs" / "tiny" / "regression.yaml",
                      [f"teacher.path={tiny_sd}", f"train.output_dir={tmp_path}", "attention.backend=math"])
    trainer = Trainer(cfg)
    for net in (trainer.teacher.backbone.denoiser, trainer.student.backbone.denoiser):
        procs = net.attn_processors.values()
        assert procs and all(isinstance(p, KernelAttnProcessor) and p.backend == "math" for p in procs)
    with pytest.raises(Exception, match="did you mean 'triton'"):
        load_config(REPO / "configs" / "tiny" / "regression.yaml", [f"teacher.path={tiny_sd}", "attention.backend=trition"])
