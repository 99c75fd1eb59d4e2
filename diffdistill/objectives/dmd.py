"""Distribution matching distillation: DMD (Yin et al., "One-step Diffusion with Distribution Matching
Distillation", CVPR 2024) and DMD2 (Yin et al., "Improved Distribution Matching Distillation for Fast
Image Synthesis", NeurIPS 2024). Numerical reference: the authors' code (tianweiy/DMD2).

Networks: the student G; the real score = the frozen teacher with CFG ``real_guidance``; the fake score
= a copy of the teacher (full students) or adapter ``fake_score`` on the shared frozen base (LoRA
students; ``objective.fake_score`` chooses otherwise, see score_distillation.py), trained online on G's
samples; for DMD2 a classification head on the fake score's bottleneck.

Phases (the trainer runs them in this order; DMD2's two-time-scale rule is ``student_every``):

* ``student`` (every ``student_every`` steps): ``x = G(z)``; noise it at ``t ~ U[min_t, max_t]``; the
  distribution-matching gradient ``(x0_fake - x0_real) / mean|x - x0_real|`` (DMD eq. 7-8,
  :func:`functional.dmd_gradient`) through the surrogate ``0.5 ||x - sg(x - grad)||^2``; plus
  ``gan_weight`` x the non-saturating generator loss on the head's logits for ``x`` (DMD2 eq. 5), plus
  ``regression_weight`` x the regression loss on teacher ODE pairs (DMD eq. 9; DMD2 drops it).
* ``fake_score`` (every step): denoising score matching of the fake score on ``sg(G(z))`` at
  ``t ~ U(0, 1]``, epsilon loss (DMD eq. 6, as the authors' code); plus ``disc_weight`` x the
  discriminator loss of the head on real images vs ``sg(G(z))`` (DMD2 eq. 5), both noised at
  ``t ~ U[0, gan_max_t)`` (DMD2's "diffusion GAN" option, on in its SD configs).

Multi-step students (e.g. ``student.timesteps: [1.0, 0.75, 0.5, 0.25]``, = diffusers 999, 749, 499,
249) are trained with backward simulation (DMD2 sec. 4.5): for a step index ``k`` drawn once per batch,
the student's input is produced by running the student's own first ``k`` steps from pure noise
(no gradient), exactly as at inference -- never by noising real data.

Defaults are DMD2's SD1.5 recipe (experiments/sdv1.5 scripts): real guidance 1.75, fake guidance 1,
``student_every`` 10, t in [0.02, 0.98] for the DM term, GAN weights 1e-3 (generator) / 1e-2
(discriminator), diffusion-GAN noise over the whole range. The ``dmd`` registry entry sets
``regression_weight`` 0.25 (DMD's lambda_reg), no GAN, ``student_every`` 1.

Deviations: times are continuous (``t`` uniform, where the code draws integer timesteps); the
regression term is latent MSE, not LPIPS (see regression.py); the head pools globally (see
nets/discriminator.py); real images are encoded with the VAE posterior mean; where the authors' code
zeroes non-finite DM gradients, ours leaves them: the trainer's guard skips and counts that update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigError, _check
from ..nets import DiscriminatorHead
from ..student import Student
from . import functional as fn
from .base import Batch, LossOut, Phase
from .regression import Regression, RegressionConfig
from .score_distillation import ScoreDistillation, ScoreDistillationConfig


@dataclass
class DMD2Config(ScoreDistillationConfig):
    name: ClassVar[str] = "dmd2"
    real_guidance: float = 1.75      # teacher CFG for the real score, diffusers convention
    student_every: int = 10          # two-time-scale update rule: fake score every step, student every N
    min_t: float = 0.02              # DM term: t ~ U[min_t, max_t]
    max_t: float = 0.98
    gan_weight: float = 1e-3         # generator-side GAN weight (0: no GAN)
    disc_weight: float = 1e-2        # discriminator loss weight in the fake-score phase
    gan_max_t: float = 1.0           # classifier inputs noised at t ~ U[0, gan_max_t); 0: clean images
    regression_weight: float = 0.0   # > 0: DMD's regression term on teacher ODE pairs
    teacher_steps: int = 25          # regression pairs: teacher DDIM steps, guidance, cached count
    pair_guidance: float = 1.75
    num_pairs: int = 0

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(self.real_guidance >= 1.0, f"{p}.real_guidance", f"is a diffusers CFG scale (>= 1), got {self.real_guidance}")
        _check(self.student_every >= 1, f"{p}.student_every", f"must be >= 1, got {self.student_every}")
        _check(0.0 <= self.min_t < self.max_t <= 1.0, f"{p}.min_t",
               f"need 0 <= min_t < max_t <= 1, got {self.min_t}, {self.max_t}")
        for key in ("gan_weight", "disc_weight", "regression_weight", "gan_max_t"):
            _check(getattr(self, key) >= 0, f"{p}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.gan_max_t <= 1.0, f"{p}.gan_max_t", f"must be <= 1, got {self.gan_max_t}")

    def validate_run(self, config) -> None:
        if (self.gan_weight > 0 or self.disc_weight > 0) and config.data.images is None:
            raise ConfigError("data.images", f"objective {self.name!r} with a GAN term (gan_weight / disc_weight > 0) "
                              "needs real images: set data.images (e.g. 'digits'), or set both weights to 0")
        if config.student.guidance != 1.0:
            raise ConfigError("student.guidance", f"{self.name} students sample without CFG (the real score carries "
                              f"the guidance); got {config.student.guidance}")
        if config.student.gamma != 1.0 and len(config.student.timesteps) > 1:
            raise ConfigError("student.gamma", f"{self.name}'s backward simulation re-noises with fresh noise, the "
                              f"sampler of gamma 1; got {config.student.gamma}")


@dataclass
class DMDConfig(DMD2Config):
    name: ClassVar[str] = "dmd"
    student_every: int = 1
    gan_weight: float = 0.0
    disc_weight: float = 0.0
    regression_weight: float = 0.25
    num_pairs: int = 1000


class DMD2(ScoreDistillation):
    Config = DMD2Config

    def __init__(self, cfg: DMD2Config, teacher, student: Student, prompt_pool: list[str]):
        super().__init__(cfg, teacher, student)
        self.disc = DiscriminatorHead(*self._bottleneck()) if self.gan else None
        self.regression = None
        if cfg.regression_weight > 0:
            reg_cfg = RegressionConfig(teacher_steps=cfg.teacher_steps, guidance=cfg.pair_guidance, num_pairs=cfg.num_pairs)
            self.regression = Regression(reg_cfg, teacher, student, prompt_pool)

    @property
    def gan(self) -> bool:
        return self.cfg.gan_weight > 0 or self.cfg.disc_weight > 0

    @torch.no_grad()
    def _bottleneck(self) -> tuple[int, int]:
        x = torch.zeros((1, *self.teacher.latent_shape), device=self.teacher.device, dtype=self.teacher.dtype)
        with self.fake.backbone.adapter(self.fake.adapter):
            mid = self.fake.backbone.features(x, 0.5, self.teacher.empty_cond(1), levels=("mid",))["mid"]
        return mid.shape[1], mid.shape[-1]

    def phases(self) -> list[Phase]:
        fake = ["fake_score", "disc"] if self.gan else ["fake_score"]
        return [Phase("student", ["student"], every=self.cfg.student_every), Phase("fake_score", fake, lr=self.cfg.fake_lr)]

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        groups = super().trainable()
        if self.gan:
            groups["disc"] = dict(self.disc.named_parameters())
        return groups

    def prepare(self, run_dir, device) -> None:
        if self.regression is not None:
            self.regression.prepare(run_dir, device)

    # -- pieces ---------------------------------------------------------------------------------------
    def logits(self, x: torch.Tensor, cond, batch: Batch) -> torch.Tensor:
        """The head's realism logits for latents ``x`` (noised at ``t ~ U[0, gan_max_t)``)."""
        x_t, t, _ = self.noised(batch, x, 0.0, self.cfg.gan_max_t)
        with self.fake.backbone.adapter(self.fake.adapter):
            mid = self.fake.backbone.features(x_t, t, cond, levels=("mid",))["mid"]
        return self.disc(mid)

    # -- losses ---------------------------------------------------------------------------------------
    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        cond = self.teacher.encode_prompt(batch.prompts)
        if phase == "student":
            return self._student_loss(batch, cond, step)
        if phase == "fake_score":
            return self._fake_loss(batch, cond)
        raise ValueError(f"{self.cfg.name} has phases 'student' and 'fake_score'; got {phase!r}")

    def _student_loss(self, batch: Batch, cond, step: int) -> LossOut:
        c = self.cfg
        x = self.generate(batch, cond, grad=True)  # (B, C, H, W) latents
        x_t, t, _ = self.noised(batch, x.detach(), c.min_t, c.max_t)
        with torch.no_grad():
            with self.teacher.backbone.adapter(None):
                x0_real = self.teacher.backbone.cfg(x_t, t, cond, self.teacher.empty_cond(len(batch)), c.real_guidance)
            x0_fake = self.fake(x_t, t, cond, out="x0")
            grad = fn.dmd_gradient(x.detach(), x0_real, x0_fake)
        dm = fn.score_surrogate_loss(x, grad)
        total, terms = dm, {"dm_loss": dm.detach(), "dm_grad_norm": grad.float().flatten(1).norm(dim=1).mean().detach()}
        if c.gan_weight > 0:
            gen = fn.gan_generator_loss(self.logits(x, cond, batch))
            total = total + c.gan_weight * gen
            terms["gan_generator"] = gen.detach()
        if self.regression is not None:
            reg = self.regression.loss("student", batch, step).total
            total = total + c.regression_weight * reg
            terms["regression_mse"] = reg.detach()
        return LossOut(total, terms, images=x.detach())

    def _fake_loss(self, batch: Batch, cond) -> LossOut:
        x = self.generate(batch, cond, grad=False)
        sched = self.teacher.backbone.schedule
        t = batch.rand().double().clamp_min(1.0 / sched.num_train_timesteps).to(x.device)  # U(0, 1], as randint(0, N)
        eps = batch.randn(*x.shape[1:]).to(x)
        x_t = sched.add_noise(x, eps, t)
        denoise = fn.denoising_loss(self.fake(x_t, t, cond, out="eps"), eps)
        total, terms = denoise, {"fake_denoising": denoise.detach()}
        if self.gan and self.cfg.disc_weight > 0:
            with torch.no_grad():
                real = self.teacher.encode_images(batch.images, sample=False).to(x)
                real_cond = self.teacher.encode_prompt(batch.image_captions)
            disc = fn.gan_discriminator_loss(self.logits(real, real_cond, batch), self.logits(x, cond, batch))
            total = total + self.cfg.disc_weight * disc
            terms["gan_discriminator"] = disc.detach()
        return LossOut(total, terms, images=x)


class DMD(DMD2):
    """DMD (v1): distribution matching + regression on teacher ODE pairs, fake score updated every step."""

    Config = DMDConfig
