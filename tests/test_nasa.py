"""SNOOPI's negative-away steer attention: the processor against a hand-written reference, on a whole UNet."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffdistill.nasa import NegativeAwayAttnProcessor, cross_attention_layers, negative_away_attention


def _attend(attn, x, ctx):
    """softmax(Q K^T / sqrt(d)) V per head, written out."""
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    B, H = x.shape[0], attn.heads

    def heads(t):
        return t.view(B, t.shape[1], H, -1).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, x.shape[1], -1)


@pytest.mark.parametrize("neg_batch", [1, 3])
def test_processor_matches_the_formula(neg_batch):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    x, pos, neg = torch.randn(3, 10, 16), torch.randn(3, 5, 8), torch.randn(neg_batch, 7, 8)
    alpha = 0.3
    with torch.no_grad():
        z = _attend(attn, x, pos) - alpha * _attend(attn, x, neg.expand(3, -1, -1))  # SNOOPI eq. 9
        ref = attn.to_out[0](z)
        attn.set_processor(NegativeAwayAttnProcessor(neg, alpha))
        out = attn(x, encoder_hidden_states=pos)
        assert torch.allclose(out, ref, atol=1e-5)
        attn.set_processor(NegativeAwayAttnProcessor(neg, 0.0))  # weight 0: plain attention
        plain = attn(x, encoder_hidden_states=pos)
        attn.set_processor(AttnProcessor2_0())
        assert torch.allclose(plain, attn(x, encoder_hidden_states=pos), atol=1e-6)
    with pytest.raises(ValueError, match="cross-attention"):
        attn.set_processor(NegativeAwayAttnProcessor(neg, alpha))
        attn(x)
    with pytest.raises(ValueError, match="batch"):
        attn.set_processor(NegativeAwayAttnProcessor(torch.randn(2, 7, 8), alpha))
        attn(x, encoder_hidden_states=pos)


def test_whole_unet_only_cross_attention_and_restored(tiny_teacher):
    unet = tiny_teacher.backbone.denoiser
    before = dict(unet.attn_processors)
    cross = cross_attention_layers(unet)
    assert cross and all(name.endswith("attn2") for name in cross)
    x = torch.randn(2, *tiny_teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = tiny_teacher.encode_prompt(["a digit 1", "a digit 2"])
    neg = tiny_teacher.encode_prompt(["a digit 7"]).embeds
    with torch.no_grad():
        plain = tiny_teacher.backbone(x, 0.5, cond)
        with negative_away_attention(unet, neg, scale=0.0):
            same = tiny_teacher.backbone(x, 0.5, cond)
        with negative_away_attention(unet, neg, scale=0.5):
            procs = unet.attn_processors
            assert all(isinstance(procs[f"{n}.processor"], NegativeAwayAttnProcessor) for n in cross)
            assert sum(isinstance(p, NegativeAwayAttnProcessor) for p in procs.values()) == len(cross)
            steered = tiny_teacher.backbone(x, 0.5, cond)
    assert torch.allclose(plain, same, atol=1e-5) and (plain - steered).abs().max() > 1e-3
    assert all(unet.attn_processors[k] is p for k, p in before.items())  # every previous processor is back
