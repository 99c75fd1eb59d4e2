"""Variational score distillation: SwiftBrush (Nguyen & Tran, "SwiftBrush: One-Step Text-to-Image Diffusion
Model with Variational Score Distillation", CVPR 2024) and SNOOPI's proper guidance (Nguyen et al.,
"SNOOPI: Supercharged One-step Diffusion Distillation with Proper Guidance", arXiv 2412.02687; equation
and table numbers below are its v3's). The loss is ProlificDreamer's VSD (Wang et al., NeurIPS 2023,
eq. 9). Numerical reference: the authors' code
(VinAIResearch/SwiftBrush, ``train_swiftbrush.py``); SNOOPI has no public training code.

Image-free: only prompts. Networks: the one-step student ``G`` (initialised from the teacher, fed pure
noise at the last training timestep, 999 -- ``student.timesteps: [1.0]``); the frozen teacher; a "LoRA
teacher" (the fake score, adapter ``fake_score`` on the teacher's frozen network, whichever kind the
student is) trained online on G's samples. Phases, both every step (SwiftBrush: one LoRA update per
student update):

* ``student``: ``x = G(z)``; noise it at ``t ~ U[min_t, max_t)`` (SwiftBrush: timesteps 20..980); the
  VSD gradient ``w(t) (eps_teacher - eps_lora)`` with ``w(t) = sigma_t^2``
  (:func:`functional.vsd_gradient`), both predictions guided with the same CFG scale, diffusers
  convention, as SwiftBrush's code does (``fake_cfg: false``: the LoRA teacher unguided, as
  ProlificDreamer's), through the surrogate ``0.5 mean((x - sg(x - grad))^2)``.
* ``fake_score``: denoising score matching of the LoRA teacher on ``sg(G(z))`` at ``t ~ U(0, 1]``,
  epsilon loss weighted by ``alpha_bar_t`` (the code's ``mse(sqrt(a) eps_hat, sqrt(a) eps)``; on flow teachers an
  unweighted velocity loss, ours: ``ScoreDistillation.denoising_space``), captions
  dropped with probability ``fake_empty_prompt_prob`` (0.1) so that it has an unconditional branch.

``swiftbrush`` defaults are the SwiftBrush README's SD2.1-base run: CFG 4.5; LoRA rank 64, alpha 108 on
``to_q`` / ``to_v``; LoRA lr 1e-3 (``fake_lr``); student lr 1e-6 is ``train.lr`` in the configs.
``snoopi`` is SNOOPI's PG-SwiftBrush: the CFG scale drawn each step from ``U[guidance_min,
guidance_max]`` = U(0.5, 4) (its Table 6, SD1.5 / SD2.1), the *same* scale for teacher and LoRA teacher
(its eq. 6 has one kappa in both), which stabilises VSD across backbones; LoRA alpha 128 (its "scaling
128"). SNOOPI's negative-prompt attention (NASA) is inference-time: ``diffdistill/nasa.py``.

Deviations: times are continuous (``t`` uniform, where the code draws integer timesteps); the scale is
drawn per sample (the paper does not say per sample or per batch); the LoRA update samples ``G`` anew
from the same noise after the student's update, where the code reuses the pre-update sample; non-finite gradients are left to the trainer's guard (the code zeroes them with
``nan_to_num``); SNOOPI's clamped CLIP loss and its negative-prompt training (NASA-T) are not
implemented; the student's x0 uses the schedule's exact ``alpha_bar_999`` where the code hard-codes
0.0047.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import _check
from ..student import Student
from . import functional as fn
from .base import Batch, LossOut, Phase
from .score_distillation import ScoreDistillation, ScoreDistillationConfig


@dataclass
class SwiftBrushConfig(ScoreDistillationConfig):
    name: ClassVar[str] = "swiftbrush"
    guidance_min: float = 4.5          # CFG scale (diffusers convention) of teacher and LoRA teacher, drawn
    guidance_max: float = 4.5          # per sample from U[min, max] (equal: fixed, SwiftBrush)
    fake_cfg: bool = True              # guide the LoRA teacher too (SwiftBrush's code); false: ProlificDreamer
    min_t: float = 0.02                # VSD term: t ~ U[min_t, max_t)
    max_t: float = 0.98
    fake_empty_prompt_prob: float = 0.1  # LoRA teacher's training: captions dropped (its CFG branch)
    fake_score: str = "lora"
    fake_lora_rank: int | None = 64
    fake_lora_alpha: float | None = 108.0
    fake_lora_targets: list[str] | None = field(default_factory=lambda: ["to_q", "to_v"])
    fake_lr: float | None = 1e-3

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(0.0 < self.guidance_min <= self.guidance_max, f"{p}.guidance_min",
               f"need 0 < guidance_min <= guidance_max, got {self.guidance_min}, {self.guidance_max}")
        _check(0.0 <= self.min_t < self.max_t <= 1.0, f"{p}.min_t",
               f"need 0 <= min_t < max_t <= 1, got {self.min_t}, {self.max_t}")
        _check(0.0 <= self.fake_empty_prompt_prob < 1.0, f"{p}.fake_empty_prompt_prob",
               f"must be in [0, 1), got {self.fake_empty_prompt_prob}")
        _check(not self.fake_cfg or self.fake_empty_prompt_prob > 0, f"{p}.fake_cfg",
               "a guided LoRA teacher needs an unconditional branch: set fake_empty_prompt_prob > 0")


@dataclass
class SNOOPIConfig(SwiftBrushConfig):
    name: ClassVar[str] = "snoopi"
    guidance_min: float = 0.5
    guidance_max: float = 4.0
    fake_lora_alpha: float | None = 128.0


class VSD(ScoreDistillation):
    Config = SwiftBrushConfig

    def __init__(self, cfg: SwiftBrushConfig, teacher, student: Student, prompt_pool: list[str]):
        super().__init__(cfg, teacher, student)

    def phases(self) -> list[Phase]:
        return [Phase("student", ["student"]), Phase("fake_score", ["fake_score"], lr=self.cfg.fake_lr)]

    def guidance(self, batch: Batch, device) -> torch.Tensor:
        """This step's CFG scale per sample, ``U[guidance_min, guidance_max]`` (fixed when they are equal)."""
        lo, hi = self.cfg.guidance_min, self.cfg.guidance_max
        return (lo + (hi - lo) * batch.rand()).to(device, torch.float64) if hi > lo else \
            torch.full((len(batch),), lo, dtype=torch.float64, device=device)

    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        if phase == "student":
            return self._student_loss(batch)
        if phase == "fake_score":
            return self._fake_loss(batch)
        raise ValueError(f"{self.cfg.name} has phases 'student' and 'fake_score'; got {phase!r}")

    def _student_loss(self, batch: Batch) -> LossOut:
        c, t_ = self.cfg, self.teacher
        cond = t_.encode_prompt(batch.prompts)
        w = self.guidance(batch, t_.device)
        x = self.generate(batch, cond, grad=True)  # (B, C, H, W) latents
        x_t, t, _ = self.noised(batch, x.detach(), c.min_t, c.max_t)
        uncond = t_.empty_cond(len(batch))
        with torch.no_grad():
            with t_.backbone.adapter(None):
                eps_real = t_.backbone.cfg(x_t, t, cond, uncond, w, out="eps")
            with self.fake.backbone.adapter(self.fake.adapter):
                eps_fake = self.fake.backbone.cfg(x_t, t, cond, uncond if c.fake_cfg else None,
                                                  w if c.fake_cfg else 1.0, out="eps")
            sigma2 = t_.backbone.schedule.sigma(t).double() ** 2
            grad = fn.vsd_gradient(eps_real, eps_fake, sigma2)
        vsd = fn.score_surrogate_loss(x, grad)
        terms = {"vsd_loss": vsd.detach(), "vsd_grad_norm": grad.float().flatten(1).norm(dim=1).mean(),
                 "guidance": w.float().mean()}
        return LossOut(vsd, terms, images=x.detach())

    def _fake_loss(self, batch: Batch) -> LossOut:
        t_ = self.teacher
        x = self.generate(batch, t_.encode_prompt(batch.prompts), grad=False)
        sched = t_.backbone.schedule
        x_t, t, eps = self.fake_noised(batch, x)
        cond = t_.encode_captions(batch.drop_captions(batch.prompts, self.cfg.fake_empty_prompt_prob))
        # SwiftBrush weights its epsilon loss by alpha_bar_t; on flow teachers the velocity loss is unweighted (ours)
        weight = sched.alpha(t).double() ** 2 if self.denoising_space == "eps" else None
        denoise = self.fake_denoising(self.fake, x, x_t, t, eps, cond, weight)
        return LossOut(denoise, {"fake_denoising": denoise.detach()}, images=x)


class SNOOPI(VSD):
    """SNOOPI's PG-SwiftBrush: VSD with one random CFG scale per sample for teacher and LoRA teacher."""

    Config = SNOOPIConfig
