"""Negative prompts for one-step students: SNOOPI's Negative-Away Steer Attention (NASA; Nguyen et al.,
"SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance", arXiv 2412.02687; sec. 5.1 and
eqs. 7-9 of its v3, retitled "Supercharged One-step Text-to-Image Diffusion Models with Negative Prompts").

A one-step student has no classifier-free guidance to put a negative prompt into. NASA steers in the
cross-attention layers instead: with the queries ``Q`` of the image tokens, the keys and values of the
prompt ``(K+, V+)`` and of the negative prompt ``(K-, V-)`` (the layer's own projections of both),

    Z = softmax(Q K+^T / sqrt(d)) V+  -  alpha * softmax(Q K-^T / sqrt(d)) V-

and ``Z`` goes on through the layer's output projection as the plain attention output would. No
training, no normalisation or clamping (as the paper). SNOOPI's inference weights: alpha 0.1 on SD1.5,
0.2 on SD2.1, 0.5 on PixArt-alpha. It is an attention processor on stock diffusers models, so it works
on any exported student (and on the teacher, though there CFG is the usual route)::

    from diffdistill.nasa import negative_away_attention
    neg = pipe.encode_prompt("blurry", device, 1, False)[0]
    with negative_away_attention(pipe.unet, neg, scale=0.1):
        image = pipe("a cat", num_inference_steps=1, guidance_scale=1).images[0]
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class NegativeAwayAttnProcessor:
    """A diffusers attention processor for cross-attention layers computing NASA's ``Z+ - scale * Z-``.

    ``negative``: the negative prompt's encoder hidden states ``(1, L, D)`` (broadcast over the batch) or
    ``(B, L, D)``. A layer called without encoder hidden states (self-attention) is refused: install it on
    cross-attention layers only (:func:`negative_away_attention` does)."""

    def __init__(self, negative: torch.Tensor, scale: float):
        if negative.ndim != 3:
            raise ValueError(f"negative prompt embeddings must be (batch, tokens, dim), got shape {tuple(negative.shape)}")
        self.negative, self.scale = negative, float(scale)

    def _heads(self, attn, x: torch.Tensor, batch: int) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError("NegativeAwayAttnProcessor is for cross-attention layers; this layer got no "
                             "encoder_hidden_states")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        negative = self.negative.to(encoder_hidden_states)
        if negative.shape[0] not in (1, batch):
            raise ValueError(f"negative prompt embeddings have batch {negative.shape[0]}; expected 1 or {batch}")
        negative = negative.expand(batch, *negative.shape[1:])
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            negative = attn.norm_encoder_hidden_states(negative)
        if attention_mask is not None:  # a padding mask of the prompt's tokens; the negative prompt runs unmasked
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        q = self._heads(attn, attn.to_q(hidden_states), batch)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        outs = []
        for states, mask in ((encoder_hidden_states, attention_mask), (negative, None)):
            k, v = self._heads(attn, attn.to_k(states), batch), self._heads(attn, attn.to_v(states), batch)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False))
        z = outs[0] - self.scale * outs[1]
        z = z.transpose(1, 2).reshape(batch, -1, z.shape[1] * z.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](z))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(denoiser: nn.Module) -> list[str]:
    """Names of the denoiser's cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``)."""
    return [name for name, m in denoiser.named_modules() if getattr(m, "is_cross_attention", False)
            and hasattr(m, "set_processor")]


@contextlib.contextmanager
def negative_away_attention(denoiser: nn.Module, negative: torch.Tensor, scale: float = 0.1):
    """Context in which ``denoiser``'s cross-attention layers apply NASA with the negative prompt's embeddings
    ``negative`` at weight ``scale``; every layer's previous processor is restored on exit."""
    layers = cross_attention_layers(denoiser)
    if not layers:
        raise ValueError(f"{type(denoiser).__name__} has no cross-attention layers for a negative prompt to steer")
    if not hasattr(denoiser, "attn_processors"):
        raise ValueError(f"{type(denoiser).__name__} does not expose diffusers' attn_processors")
    previous = dict(denoiser.attn_processors)
    nasa = NegativeAwayAttnProcessor(negative, scale)
    cross = {f"{name}.processor" for name in layers}
    denoiser.set_attn_processor({k: (nasa if k in cross else p) for k, p in previous.items()})
    try:
        yield denoiser
    finally:
        denoiser.set_attn_processor(previous)
