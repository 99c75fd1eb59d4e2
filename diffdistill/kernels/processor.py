"""A diffusers attention processor that routes a model's attention through :func:`~.backends.attention`.

:class:`KernelAttnProcessor` computes what diffusers' ``AttnProcessor2_0`` computes (spatial norm, group norm,
q/k/v projections, optional q/k norms, output projection and dropout, residual connection, output rescale) and
calls ``attention(q, k, v, backend, mask)`` where ``AttnProcessor2_0`` calls SDPA. It serves the classic
``Attention`` layers of UNet2DConditionModel (SD1.5, SD2, SDXL) and other models built from them: self- and
cross-attention, with the prompt's key-padding mask. It is installed with the public ``set_attn_processor``::

    from diffdistill.kernels import use_attention
    use_attention(pipe.unet, "triton_jvp")   # e.g. for torch.func.jvp through the UNet
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from .backends import NAMES, attention

REPLACEABLE = (AttnProcessor, AttnProcessor2_0)
MASKED = -1e4  # diffusers writes a dropped key as a -10000 bias


def key_padding_mask(attention_mask: torch.Tensor, batch: int, nk: int) -> torch.Tensor:
    """A diffusers attention mask as the ``(B, Nk)`` bool key-padding mask ``attention`` takes.

    Accepted: bool ``(B, Nk)`` / ``(B, 1, Nk)`` (True = attend) or an additive bias of that shape whose entries
    are 0 (attend) or <= -1e4 (dropped), as UNet2DConditionModel makes from ``encoder_attention_mask``.
    Anything else (a per-query mask, a soft bias) is not a key-padding mask and is refused."""
    m = attention_mask
    if m.ndim == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 2 or tuple(m.shape) != (batch, nk):
        raise ValueError(f"KernelAttnProcessor takes key-padding masks (B, Nk) or (B, 1, Nk) = {(batch, nk)}; got "
                         f"{tuple(attention_mask.shape)}. Use diffusers' AttnProcessor2_0 for general masks")
    if m.dtype == torch.bool:
        return m
    if not bool(((m == 0) | (m <= MASKED)).all()):
        raise ValueError("KernelAttnProcessor takes additive masks of 0 (attend) and <= -1e4 (dropped) only; this "
                         "one has soft biases. Use diffusers' AttnProcessor2_0 for general masks")
    return m == 0


class KernelAttnProcessor:
    """Diffusers attention processor calling ``attention(..., backend)``; see the module docstring."""

    def __init__(self, backend: str = "auto", density: float = 0.5):
        if backend not in NAMES:
            raise ValueError(f"unknown attention backend {backend!r}; one of {list(NAMES)}")
        self.backend, self.density = backend, density

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))  # (B, H, N, D)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        keep = None if attention_mask is None else key_padding_mask(attention_mask, batch, k.shape[2])
        out = attention(q, k, v, self.backend, keep, scale=attn.scale, density=self.density)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_attention(model: nn.Module, backend: str, density: float = 0.5) -> nn.Module:
    """Route every attention layer of the diffusers ``model`` through ``attention(..., backend)`` (in place;
    returns ``model``). ``"default"`` leaves the model's own processors. Layers with processors other than
    diffusers' plain ``AttnProcessor``/``AttnProcessor2_0`` (or ours) — FLUX/SD3 joint attention, IP-adapters,
    NASA — are refused by name rather than silently changed."""
    if backend == "default":
        return model
    processor = KernelAttnProcessor(backend, density)  # validates the name
    if not hasattr(model, "set_attn_processor"):
        raise TypeError(f"{type(model).__name__} has no set_attn_processor: not a diffusers attention model")
    procs = model.attn_processors
    if not procs:
        raise ValueError(f"{type(model).__name__} has no attention layers to route")
    foreign = {name: type(p).__name__ for name, p in procs.items()
               if not isinstance(p, (*REPLACEABLE, KernelAttnProcessor))}
    if foreign:
        raise ValueError(f"use_attention replaces only plain attention processors; these layers have others: "
                         f"{foreign}")
    model.set_attn_processor(processor)
    return model
