"""One denoiser interface over any diffusers denoiser.

:class:`DiffusionBackbone` hides the network's native prediction type and its timestep convention:
objectives call ``backbone(x_t, t, cond, out="x0")`` with continuous ``t in [0, 1]`` and get whichever
prediction they ask for. :class:`Cond` carries the conditioning: prompt embeddings, plus in ``extra``
SDXL's pooled ``text_embeds`` and ``time_ids`` or SD3's / FLUX's pooled projections (``text_embeds``). How
the denoiser is called -- a UNet (``added_cond_kwargs``), an SD3-style MM-DiT (``pooled_projections``) or
FLUX's transformer (2x2-packed latent tokens with their position ids, timesteps in ``[0, 1]``, a guidance
embedding) -- is decided here, in :meth:`DiffusionBackbone._denoise`, and nowhere else: every caller sees
latents ``(B, C, H, W)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import lora
from .schedule import PREDICTION_TYPES, FlowSchedule, Schedule, _as_time, _bcast


@dataclass
class Cond:
    """Conditioning for a batch: ``embeds`` ``(B, L, D)`` plus backbone-specific ``extra`` tensors
    (each with batch dimension first), e.g. SDXL's ``text_embeds`` and ``time_ids``; ``guidance``
    ``(B,)``: the CFG scale (diffusers convention) a guidance-embedded denoiser is conditioned on
    (LCM's ``w``-conditioning); denoisers without a guidance embedding ignore it."""

    embeds: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    guidance: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def with_guidance(self, scale) -> Cond:
        """This conditioning with guidance scale ``scale`` (a number or ``(B,)``)."""
        g = torch.as_tensor(scale, dtype=torch.float32, device=self.embeds.device)
        return Cond(self.embeds, self.extra, g.expand(self.batch_size) if g.ndim == 0 else g)

    def pooled(self) -> torch.Tensor:
        """``(B, D)``: one vector per prompt, for conditioning discriminator heads -- the backbone's pooled text
        embedding where it carries one (SDXL's ``text_embeds``), else the mean of the token embeddings."""
        if "text_embeds" in self.extra:
            return self.extra["text_embeds"].flatten(1)
        return self.embeds.mean(dim=1)

    def select(self, i: int) -> Cond:
        """Sample ``i`` as a conditioning of batch 1, in storage of its own (not a view of this batch)."""
        g = None if self.guidance is None else self.guidance[i:i + 1].clone()
        return Cond(self.embeds[i:i + 1].clone(), {k: v[i:i + 1].clone() for k, v in self.extra.items()}, g)

    @property
    def nbytes(self) -> int:
        tensors = [self.embeds, *self.extra.values()] + ([] if self.guidance is None else [self.guidance])
        return sum(t.numel() * t.element_size() for t in tensors)

    def expand(self, n: int) -> Cond:
        """This conditioning for a batch of ``n``: unchanged if it already has ``n``; a batch of 1 repeats."""
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise ValueError(f"conditioning has batch {self.batch_size} but the latents have batch {n}; "
                             "pass one prompt per latent (or a single prompt for all)")
        return Cond(self.embeds.expand(n, *self.embeds.shape[1:]),
                    {k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()},
                    None if self.guidance is None else self.guidance.expand(n))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        keys = set(conds[0].extra)
        if any(set(c.extra) != keys for c in conds):
            raise ValueError("cannot batch conditionings with different extra keys")
        guided = [c.guidance is not None for c in conds]
        if any(guided) and not all(guided):
            raise ValueError("cannot batch conditionings with and without a guidance scale")
        return Cond(torch.cat([c.embeds for c in conds]), {k: torch.cat([c.extra[k] for c in conds]) for k in keys},
                    torch.cat([c.guidance for c in conds]) if all(guided) else None)

    def to(self, *args, **kwargs) -> Cond:
        g = None if self.guidance is None else self.guidance.to(*args, **kwargs)
        return Cond(self.embeds.to(*args, **kwargs), {k: v.to(*args, **kwargs) for k, v in self.extra.items()}, g)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of ``w`` ``(B,)`` that guidance-embedded UNets take as ``timestep_cond``
    (LCM, after VDM's Fourier features): ``1000 w`` times ``exp(-log(10^4) i / (dim/2 - 1))``, sines then
    cosines, zero-padded to an odd ``dim``. ``w`` is in Ho & Salimans' form (diffusers scale - 1), as
    diffusers' pipelines pass it."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(torch.log(torch.tensor(1e4)) / (half - 1)))
    angles = (1000.0 * w.float())[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# diffusers UNet ``addition_embed_type`` -> the ``added_cond_kwargs`` it reads
ADDED_CONDITIONING = {"text_time": ("text_embeds", "time_ids")}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's token layout: ``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4 C)``, each token one 2x2 patch (channel-major
    within the patch), tokens in row-major order -- as ``FluxPipeline._pack_latents``."""
    B, C, H, W = x.shape
    if H % 2 or W % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {H}x{W}")
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of side ``height`` x ``width``."""
    B, _, D = tokens.shape
    x = tokens.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """``(H/2 * W/2, 3)`` rotary position ids of FLUX's packed latent tokens: ``(0, row, column)``."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the requested features are captured."""


class DiffusionBackbone(nn.Module):
    """A diffusers denoiser + its :class:`~diffdistill.schedule.Schedule` + its native prediction type.

    ``pred_type`` is one of ``x0 | eps | v | flow`` (``pipeline.py`` translates diffusers' names).
    """

    def __init__(self, denoiser: nn.Module, schedule: Schedule, pred_type: str):
        super().__init__()
        if pred_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction type {pred_type!r}; expected one of {PREDICTION_TYPES}")
        self.denoiser = denoiser
        self.schedule = schedule
        self.pred_type = pred_type

    # -- what must agree between networks that share latents, prompts and LoRA files -----------------
    def signature(self) -> dict:
        """The denoiser's interface: its class, latent channels in and out, the width of the text embeddings
        it attends to (``cross_attention_dim``; ``joint_attention_dim`` for MM-DiT transformers) and its
        added conditioning (SDXL's ``text_time``). Networks with different signatures cannot stand in for
        each other (student vs teacher) nor share a LoRA file."""
        cfg = getattr(self.denoiser, "config", None)
        if cfg is None:
            raise TypeError(f"signature() needs a diffusers model with a config, got {type(self.denoiser).__name__}")
        width = cfg.get("cross_attention_dim", cfg.get("joint_attention_dim"))
        return {"denoiser": type(self.denoiser).__name__, "latent_channels": self.latent_channels,
                "out_channels": cfg.get("out_channels"), "cross_attention_dim": width,
                "addition_embed_type": cfg.get("addition_embed_type")}

    def check_compatible(self, other: DiffusionBackbone | dict, what: str = "student", against: str = "teacher") -> None:
        """Raise ``ValueError`` naming every field where this backbone (``what``) and ``other`` (``against``; a
        backbone or a recorded :meth:`signature`) differ, e.g. latent channels or cross-attention width."""
        mine = self.signature()
        theirs = other.signature() if isinstance(other, DiffusionBackbone) else dict(other)
        diff = [f"{k}: {what} {mine[k]!r} vs {against} {theirs.get(k)!r}" for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise ValueError(f"the {what} and {against} denoisers differ (" + "; ".join(diff) + "): they come from "
                             "different backbones (e.g. SD1.5 vs SDXL)")

    # -- the raw network call: the one place that knows the denoiser's signature --------------------
    @property
    def guidance_embedding_dim(self) -> int | None:
        """The width of the denoiser's guidance embedding (``time_cond_proj_dim``), None if it has none."""
        return getattr(getattr(self.denoiser, "config", None), "time_cond_proj_dim", None)

    @property
    def is_flux(self) -> bool:
        """FLUX's transformer (``FluxTransformer2DModel``): 2x2-packed latent tokens with rotary position ids."""
        return getattr(getattr(self.denoiser, "config", None), "axes_dims_rope", None) is not None

    @property
    def is_mmdit(self) -> bool:
        """A transformer over latent tokens with joint text-image attention and pooled projections: SD3's
        ``SD3Transformer2DModel`` or FLUX's ``FluxTransformer2DModel``."""
        return getattr(getattr(self.denoiser, "config", None), "pooled_projection_dim", None) is not None

    @property
    def token_stride(self) -> int:
        """Latent pixels per image token side: the patch size (SD3), 2 (FLUX's packing); 1 for UNets."""
        if self.is_flux:  # FluxPipeline always packs 2x2 patches; the transformer's own patch_size stays 1
            return 2
        return self.denoiser.config.patch_size if self.is_mmdit else 1

    @property
    def latent_channels(self) -> int:
        """Channels of the latents ``(B, C, H, W)`` this backbone takes (FLUX's transformer sees 4 C packed)."""
        channels = self.denoiser.config.in_channels
        return channels // 4 if self.is_flux else channels

    @property
    def embeds_guidance(self) -> bool:
        """Whether the denoiser is told the guidance scale instead of running CFG's two branches: LCM's
        ``w``-embedding (``time_cond_proj_dim``) or a guidance-distilled FLUX (``guidance_embeds``, FLUX.1-dev).
        :meth:`cfg` then runs one pass conditioned on the scale, as diffusers' pipelines do for them."""
        if self.guidance_embedding_dim is not None:
            return True
        return bool(self.is_flux and self.denoiser.config.guidance_embeds)

    def randn_like(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise shaped like latents ``x``, drawn as the stock pipeline's scheduler draws its
        step noise, so that a sampler drawing from the same generator matches it: in the denoiser's own layout
        (FLUX: packed tokens, then unpacked) and, for flow schedules, in float32 (``FlowMatchEulerDiscreteScheduler``
        upcasts the sample before drawing), else in ``x``'s dtype (``LCMScheduler``, ``TCDScheduler``)."""
        dtype = torch.float32 if isinstance(self.schedule, FlowSchedule) else x.dtype
        if self.is_flux:
            B, C, H, W = x.shape
            packed = torch.randn((B, (H // 2) * (W // 2), 4 * C), generator=generator, device=x.device, dtype=dtype)
            return unpack_latents(packed, H, W).to(x.dtype)
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype).to(x.dtype)

    @property
    def required_extra(self) -> tuple[str, ...]:
        """The ``Cond.extra`` keys the denoiser needs besides ``embeds`` (SDXL: ``text_embeds``, ``time_ids``;
        SD3: ``text_embeds``, its pooled projections)."""
        if self.is_mmdit:
            return ("text_embeds",)
        added = getattr(getattr(self.denoiser, "config", None), "addition_embed_type", None)
        return ADDED_CONDITIONING.get(added, ())

    def _denoise(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        missing = [k for k in self.required_extra if k not in cond.extra]
        if missing:
            raise ValueError(f"this denoiser's added conditioning needs Cond.extra keys {list(self.required_extra)}, "
                             f"missing {missing}: encode prompts with the teacher's encode_prompt / empty_cond")
        x_t, cond = self._in_weight_dtype(x_t, cond)
        if self.is_flux:
            return self._denoise_flux(x_t, timestep, cond)
        if self.is_mmdit:
            return self.denoiser(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.embeds,
                                 pooled_projections=cond.extra["text_embeds"], return_dict=False)[0]
        kwargs = {"added_cond_kwargs": cond.extra} if cond.extra else {}
        dim = self.guidance_embedding_dim
        if dim is not None:
            if cond.guidance is None:
                raise ValueError("this denoiser embeds the guidance scale (time_cond_proj_dim); give it one with "
                                 "Cond.with_guidance(scale)")
            kwargs["timestep_cond"] = guidance_embedding(cond.guidance.to(x_t.device) - 1, dim).to(x_t.dtype)
        return self.denoiser(x_t, timestep, encoder_hidden_states=cond.embeds, return_dict=False, **kwargs)[0]

    def _denoise_flux(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``FluxTransformer2DModel`` as ``FluxPipeline`` calls it: packed latents, text ids all zero, image ids
        ``(0, row, column)``, the timestep divided by ``num_train_timesteps`` (the transformer scales it back),
        and, for a guidance-distilled model, the guidance scale (``cond.guidance``; 1 = no guidance when unset)."""
        B, _, H, W = x_t.shape
        guidance = None
        if self.denoiser.config.guidance_embeds:
            g = cond.guidance if cond.guidance is not None else torch.ones(B)
            guidance = g.to(x_t.device, torch.float32).expand(B)
        # as FluxPipeline: the timestep cast to the latents' dtype, then divided (the transformer multiplies back)
        step = timestep.to(x_t.dtype) / self.schedule.num_train_timesteps
        out = self.denoiser(hidden_states=pack_latents(x_t), timestep=step,
                            guidance=guidance, pooled_projections=cond.extra["text_embeds"],
                            encoder_hidden_states=cond.embeds,
                            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                            img_ids=flux_image_ids(H, W, x_t.device, x_t.dtype), return_dict=False)[0]
        return unpack_latents(out, H, W)

    def _in_weight_dtype(self, x_t: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, Cond]:
        """Latents and text embeddings in the dtype of the denoiser's weights: an fp32 master student (or fake
        score) beside a half-precision teacher takes the teacher's half-precision latents and embeddings, and the
        teacher the students' fp32 samples (under autocast, autocast then picks the compute dtype). The guidance
        scale keeps its own dtype."""
        weight = next((p.dtype for p in self.denoiser.parameters() if p.is_floating_point()), None)
        if weight is None or (x_t.dtype == weight and cond.embeds.dtype == weight):
            return x_t, cond
        extra = {k: v.to(weight) if v.is_floating_point() else v for k, v in cond.extra.items()}
        return x_t.to(weight), Cond(cond.embeds.to(weight), extra, cond.guidance)

    def _timesteps(self, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` as a ``(B,)`` float64 tensor and the matching diffusers timesteps in float32."""
        t = _as_time(t, x_t)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.ndim != 1 or t.shape[0] != x_t.shape[0]:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected a scalar or ({x_t.shape[0]},)")
        return t, self.schedule.to_timestep(t).float()

    def raw(self, x_t: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        """The network's native prediction (type ``self.pred_type``)."""
        t, timestep = self._timesteps(x_t, t)
        return self._denoise(x_t, timestep, cond.expand(x_t.shape[0]))

    def forward(self, x_t: torch.Tensor, t, cond: Cond, out: str = "x0") -> torch.Tensor:
        """The prediction of type ``out`` (``x0 | eps | v | flow``) at ``(x_t, t)`` under ``cond``."""
        return self.schedule.convert(self.raw(x_t, t, cond), x_t, t, self.pred_type, out)

    def cfg(self, x_t: torch.Tensor, t, cond: Cond, uncond: Cond | None, scale, out: str = "x0"):
        """Classifier-free guidance, diffusers convention: ``uncond + scale * (cond - uncond)``
        (``scale = 1``: no guidance, one forward); ``scale`` a number or one per sample ``(B,)``.
        Both branches run as one batch ``[uncond, cond]`` as diffusers' pipelines do; the combination
        is affine, so doing it in the native prediction space and converting afterwards equals doing
        it in any other space. A denoiser that embeds the guidance (:attr:`embeds_guidance`: LCM's
        ``w``-conditioned UNets, FLUX.1-dev) is instead told ``scale`` in one pass (``uncond`` unused), as
        diffusers' pipelines run them; at ``scale = 1`` it keeps ``cond``'s own ``guidance`` if it has one."""
        unguided = bool(torch.all(torch.as_tensor(scale) == 1.0))
        if self.embeds_guidance and (not unguided or cond.guidance is None):
            return self(x_t, t, cond.with_guidance(scale), out=out)
        if unguided or uncond is None:
            if not unguided:
                raise ValueError(f"guidance scale {scale} needs an unconditional embedding (uncond)")
            return self(x_t, t, cond, out=out)
        B = x_t.shape[0]
        t64 = _as_time(t, x_t)
        t2 = t64.repeat(2) if t64.ndim == 1 else t64
        both = Cond.cat([uncond.expand(B), cond.expand(B)])
        raw_u, raw_c = self.raw(torch.cat([x_t, x_t]), t2, both).chunk(2)
        guided = raw_u + _bcast(torch.as_tensor(scale, dtype=torch.float64), raw_u) * (raw_c - raw_u)
        return self.schedule.convert(guided, x_t, t, self.pred_type, out)

    def _feature_blocks(self) -> dict[str, nn.Module]:
        """UNets: ``down_i`` and ``mid`` (the bottleneck). MM-DiTs: ``block_i`` (FLUX: then its single-stream
        ``single_i``) and ``mid``, the block at half depth (the same module under two names)."""
        net = self.denoiser
        if self.is_mmdit:
            blocks = {f"block_{i}": b for i, b in enumerate(net.transformer_blocks)}
            blocks.update({f"single_{i}": b for i, b in enumerate(getattr(net, "single_transformer_blocks", []))})
            blocks["mid"] = list(blocks.values())[len(blocks) // 2]
            return blocks
        blocks = {f"down_{i}": b for i, b in enumerate(getattr(net, "down_blocks", []))}
        if getattr(net, "mid_block", None) is not None:
            blocks["mid"] = net.mid_block
        return blocks

    def feature_levels(self) -> tuple[str, ...]:
        """Every level :meth:`features` offers, one name per block in forward order (aliases such as an
        MM-DiT's ``mid`` left out): the default set of discriminator heads."""
        names, seen = [], set()
        for name, module in self._feature_blocks().items():
            if id(module) not in seen:
                seen.add(id(module))
                names.append(name)
        return tuple(names)

    DISC_BLOCKS = 6  # an MM-DiT's default number of discriminator levels

    def default_disc_levels(self) -> tuple[str, ...]:
        """The default levels of discriminator heads: every UNet block; on an MM-DiT :attr:`DISC_BLOCKS` blocks
        evenly spaced over its depth, the last included (ours: LADD's text does not say which of SD3's blocks carry
        heads; PCM's SD3 discriminator uses all 24 with 1x1 heads, FastGen's DiT discriminator the middle block;
        one of our heads per block of a 24-block SD3-medium would hold 4.2 B parameters)."""
        levels = self.feature_levels()
        n, k = len(levels), self.DISC_BLOCKS
        if not self.is_mmdit or n <= k:
            return levels
        return tuple(levels[-(-(i + 1) * n // k) - 1] for i in range(k))

    def _feature_map(self, output, x_t: torch.Tensor) -> torch.Tensor:
        """A block's output as ``(B, C, H, W)``: UNet blocks give maps (or tuples led by one); an MM-DiT block
        gives ``(text tokens, image tokens)``, whose image tokens ``(B, N, C)`` are laid back on the token grid
        (the patch grid; FLUX's 2x2 packing grid)."""
        if not self.is_mmdit:
            return output[0] if isinstance(output, tuple) else output
        tokens = output[1]
        p = self.token_stride
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def features(self, x_t: torch.Tensor, t, cond: Cond, levels: tuple[str, ...] | None = None):
        """Intermediate activations for discriminator heads: ``{"down_0": ..., "mid": ...}`` (each
        ``(B, C, H, W)``; see :meth:`_feature_blocks` for the names). The forward stops after the deepest
        requested level (a UNet's decoder half never runs)."""
        blocks = self._feature_blocks()
        if not blocks:
            raise NotImplementedError(f"features() does not know the blocks of {type(self.denoiser).__name__}")
        levels = tuple(blocks) if levels is None else levels
        unknown = [name for name in levels if name not in blocks]
        if unknown:
            raise ValueError(f"unknown feature levels {unknown}; this backbone has {list(blocks)}")
        feats: dict[str, torch.Tensor] = {}
        order = list(dict.fromkeys(blocks.values()))  # modules in forward order (an alias counts once)
        last = max((blocks[name] for name in levels), key=order.index)

        def hook(module):
            names = [name for name in levels if blocks[name] is module]

            def capture(_module, _inputs, output):
                for name in names:
                    feats[name] = self._feature_map(output, x_t)
                if module is last:
                    raise _StopForward
            return capture

        handles = [module.register_forward_hook(hook(module)) for module in order]
        try:
            self.raw(x_t, t, cond)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return feats

    @contextlib.contextmanager
    def adapter(self, name: str | None):
        """Run with LoRA adapter ``name`` active (``None``: adapters off, i.e. the frozen teacher).
        Gradient-safe: never touches ``requires_grad`` (see ``lora.py``)."""
        with lora.active_adapter(self.denoiser, name):
            yield self
