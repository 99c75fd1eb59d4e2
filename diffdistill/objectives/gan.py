"""The GAN component shared by DMD2 (``dmd.py``: a head on the fake score's bottleneck) and ADD / LADD
(``adversarial.py``: heads on the frozen teacher's features, or on DINOv2's): one discriminator, its losses
and R1.

An :class:`Adversary` is a *feature network* plus trainable :class:`~diffdistill.nets.FeatureDiscriminator`
heads on chosen feature levels. Feature networks (pluggable: ``prepare(batch, x) -> (inputs, t)`` and
``network(inputs, t, cond) -> {level: (B, C, H, W)}``):

* :class:`DenoiserFeatures` -- a diffusion denoiser (under a LoRA adapter, or with adapters off: the frozen
  teacher) run on a noised copy of the latents, as DMD2's "diffusion GAN" and LADD's "generative features".
  Noise levels ``("uniform", lo, hi)``: ``t ~ U[lo, hi)`` (DMD2's option, on over the whole range in its SD
  configs); ``("logit_normal", m, s)``: ``t = sigmoid(m + s n)`` (LADD sec. 3.2: ``m = 1, s = 1`` shifts the
  discriminator towards high noise, where it judges global structure).
* :class:`PixelFeatures` -- a frozen image network (DINOv2, ADD's choice) on the VAE-decoded images.

Losses: ``nonsaturating`` (DMD2 eq. 5) or ``hinge`` (ADD, LADD), averaged over every head's logits.
Regularisers on the discriminator's real inputs: ``r1: exact`` (Mescheder et al. 2018; a double backward
through the feature network, whose attention then runs on PyTorch's math SDPA kernel -- the fused kernels
have no double backward -- so it costs O(N^2) attention memory), ``r1: approx`` (Lin et al. 2025: the change of
the logits under a ``r1_sigma`` Gaussian perturbation of the input; no double backward).

With ``conditioned`` the heads are projection discriminators on ``[pooled prompt, Fourier(t)]`` (ADD's heads
take the text embedding; LADD's take the noise level and the pooled text embedding). Deviation: the pooled
prompt of a backbone without a pooled embedding (SD1.5) is the mean of its token embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..nets import FeatureDiscriminator
from . import functional as fn
from .base import Batch, noised

LOSSES = {"nonsaturating": (fn.gan_generator_loss, fn.gan_discriminator_loss),
          "hinge": (fn.hinge_generator_loss, fn.hinge_discriminator_loss)}
NOISE_KINDS = ("uniform", "logit_normal")
R1_KINDS = ("none", "exact", "approx")
FOURIER_DIM = 32


def fourier(t: torch.Tensor, dim: int = FOURIER_DIM) -> torch.Tensor:
    """``(B,)`` times in [0, 1] -> ``(B, dim)`` sines and cosines at log-spaced frequencies 1 .. 1000."""
    freqs = torch.logspace(0, 3, dim // 2, dtype=torch.float32, device=t.device)
    angle = 2 * math.pi * t.float()[:, None] * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class DenoiserFeatures:
    """A diffusion denoiser as the feature network (run under ``adapter``; ``None``: adapters off, the frozen
    teacher): inputs are noised at ``noise`` times first; ``levels`` of :meth:`DiffusionBackbone.features`
    (``None``: :meth:`DiffusionBackbone.default_disc_levels`)."""

    def __init__(self, backbone, adapter: str | None, levels, noise: tuple = ("uniform", 0.0, 1.0)):
        if noise[0] not in NOISE_KINDS:
            raise ValueError(f"unknown discriminator noise {noise[0]!r}; choose one of {NOISE_KINDS}")
        self.backbone, self.adapter, self.noise = backbone, adapter, noise
        self.levels = backbone.default_disc_levels() if levels is None else tuple(levels)

    def prepare(self, batch: Batch, x: torch.Tensor):
        """``(x_t, t)``: latents ``x`` noised at this network's noise levels, one draw per sample."""
        kind, a, b = self.noise
        if kind == "uniform":
            x_t, t, _ = noised(batch, self.backbone.schedule, x, a, b)
            return x_t, t
        t = torch.sigmoid(a + b * batch.randn().double()).to(x.device)
        return self.backbone.schedule.add_noise(x, batch.randn(*x.shape[1:]).to(x), t), t

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> dict[str, torch.Tensor]:
        with self.backbone.adapter(self.adapter):
            return self.backbone.features(x_t, t, cond, levels=self.levels)


class PixelFeatures:
    """A frozen image network on *decoded* images as the feature network -- ADD's discriminator (a DINOv2
    ViT on pixels, Sauer et al. 2023 sec. 3.2). ``model`` is a transformers ``Dinov2Model``; latents are
    decoded by the teacher's VAE, resized (bilinear) to the model's image size and normalised with ImageNet
    statistics; ``levels`` are hidden-state indices ``"layer_<i>"`` (patch tokens reshaped to a grid). No noise:
    ``t`` is 0 (the heads' noise-level input is constant)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, teacher, model, levels=None):
        n = model.config.num_hidden_layers
        default = [f"layer_{math.ceil(i * n / 4)}" for i in range(1, 5)]  # four evenly spaced blocks, the last included
        self.levels = tuple(levels or dict.fromkeys(default))
        bad = [lv for lv in self.levels if not lv.startswith("layer_") or not lv[6:].isdigit() or not 0 < int(lv[6:]) <= n]
        if bad:
            raise ValueError(f"unknown feature levels {bad}: this network has layer_1 .. layer_{n}")
        self.teacher, self.model = teacher, model.requires_grad_(False).eval()

    def prepare(self, batch: Batch, x: torch.Tensor):
        images = (self.teacher.decode_latents(x).float().clamp(-1, 1) + 1) / 2  # (B, 3, H, W) in [0, 1]
        size = self.model.config.image_size
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.MEAN, self.STD))
        return (images - mean) / std, torch.zeros(len(x), dtype=torch.float64, device=x.device)

    def __call__(self, pixels: torch.Tensor, t: torch.Tensor, cond) -> dict[str, torch.Tensor]:
        hidden = self.model(pixel_values=pixels.to(self.model.dtype), output_hidden_states=True).hidden_states
        side = self.model.config.image_size // self.model.config.patch_size
        out = {}
        for lv in self.levels:
            tokens = hidden[int(lv[6:])][:, 1:]  # (B, N, C), the CLS token dropped
            out[lv] = tokens.transpose(1, 2).reshape(len(tokens), -1, side, side)  # (B, C, h, w)
        return out


def load_pixel_network(spec: str, device: torch.device | str = "cpu"):
    """``dinov2:<hub id or folder>`` -> a frozen transformers ``Dinov2Model`` on ``device`` (safetensors only). On
    the meta device (a teacher without weights, ``diffdistill plan``) it is the architecture only, from the
    folder's ``config.json`` or the one shipped for the hub id (:func:`diffdistill.architectures.model_config`)."""
    kind, _, path = spec.partition(":")
    if kind != "dinov2" or not path:
        raise ValueError(f"unknown discriminator network {spec!r}: use 'teacher' or 'dinov2:<hub id or folder>'")
    from transformers import Dinov2Model

    if torch.device(device).type == "meta":
        from ..architectures import model_config

        with torch.device("meta"):
            return Dinov2Model(Dinov2Model.config_class.from_dict(model_config(path)))
    return Dinov2Model.from_pretrained(path, use_safetensors=True).to(device)


def latent_probe(teacher) -> tuple[torch.Tensor, object]:
    """One zero latent and the empty prompt: what :class:`Adversary` reads its feature shapes from."""
    x = torch.zeros((1, *teacher.latent_shape), device=teacher.device, dtype=teacher.dtype)
    return x, teacher.empty_cond(1)


class Adversary(nn.Module):
    """A discriminator: trainable heads on a feature ``network``'s features (:class:`DenoiserFeatures` or
    :class:`PixelFeatures`; not this module's parameters)."""

    def __init__(self, network, probe: tuple[torch.Tensor, object], *, loss: str = "nonsaturating",
                 conditioned: bool = False, r1: str = "none", r1_weight: float = 0.0, r1_sigma: float = 0.01,
                 head_width: int | None = None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown GAN loss {loss!r}; choose one of {sorted(LOSSES)}")
        if r1 not in R1_KINDS:
            raise ValueError(f"unknown R1 kind {r1!r}; choose one of {R1_KINDS}")
        self.network, self.loss_kind, self.conditioned = network, loss, conditioned
        self.r1, self.r1_weight, self.r1_sigma = r1, r1_weight, r1_sigma
        x, cond = probe  # one latent and its conditioning, to read the feature shapes
        with torch.no_grad():
            feats = network(*network.prepare(_ProbeBatch(), x), cond)
        self.levels = tuple(feats)
        cond_dim = cond.pooled().shape[-1] + FOURIER_DIM if conditioned else None
        self.heads = FeatureDiscriminator({k: (v.shape[1], v.shape[-1]) for k, v in feats.items()}, cond_dim,
                                          head_width)

    def head_logits(self, inputs: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """``(B, L)`` logits of the heads on the network's features of prepared ``inputs`` at ``t``."""
        c = torch.cat([cond.pooled().float(), fourier(t)], dim=1) if self.conditioned else None
        return self.heads(self.network(inputs, t, cond), c)

    def logits(self, batch: Batch, x: torch.Tensor, cond) -> torch.Tensor:
        """``(B, L)`` realism logits for clean latents ``x`` (real > 0)."""
        return self.head_logits(*self.network.prepare(batch, x), cond)

    def generator_loss(self, batch: Batch, fake: torch.Tensor, cond) -> torch.Tensor:
        """The generator's loss on its samples ``fake`` (gradient flows through the feature network into them)."""
        return LOSSES[self.loss_kind][0](self.logits(batch, fake, cond))

    def discriminator_loss(self, batch: Batch, real: torch.Tensor, real_cond, fake: torch.Tensor, cond):
        """``(loss, terms)``: the heads' loss on ``real`` vs ``fake`` latents (both treated as constants), plus
        ``r1_weight`` x the R1 penalty on the network's real inputs."""
        with torch.no_grad():
            inputs, t = self.network.prepare(batch, real.detach())
        if self.r1 == "exact":  # a double backward: PyTorch's fused SDPA kernels have none, its math one has
            inputs = inputs.requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):
                logits_real = self.head_logits(inputs, t, real_cond)
        else:
            logits_real = self.head_logits(inputs, t, real_cond)
        logits_fake = self.logits(batch, fake.detach(), cond)
        loss = LOSSES[self.loss_kind][1](logits_real, logits_fake)
        terms = {"gan_discriminator": loss.detach(), "logits_real": logits_real.detach().float().mean(),
                 "logits_fake": logits_fake.detach().float().mean()}
        if self.r1 != "none" and self.r1_weight > 0:
            if self.r1 == "exact":
                penalty = fn.r1_penalty(logits_real, inputs)
            else:
                shifted = inputs.detach() + self.r1_sigma * batch.randn(*inputs.shape[1:]).to(inputs)
                penalty = fn.approx_r1_penalty(logits_real, self.head_logits(shifted, t, real_cond))
            loss = loss + self.r1_weight * penalty
            terms["r1"] = penalty.detach()
        return loss, terms


class _ProbeBatch:
    """Stands in for a :class:`Batch` of one when probing feature shapes (fixed draws)."""

    def rand(self, *shape):
        return torch.full((1, *shape), 0.5)

    def randn(self, *shape):
        return torch.zeros((1, *shape))
