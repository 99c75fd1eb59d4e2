"""Distribution matching distillation: DMD (Yin et al., "One-step Diffusion with Distribution Matching
Distillation", CVPR 2024), DMD2 (Yin et al., "Improved Distribution Matching Distillation for Fast
Image Synthesis", NeurIPS 2024) and DP-DMD (Wu et al. 2026, :class:`DPDMD`). Numerical reference: the
authors' code (tianweiy/DMD2).

Networks: the student G; the real score = the frozen teacher with CFG ``real_guidance``; the fake score
= a trainable copy of the teacher, for full and LoRA students alike (the authors' code always trains a full fake
UNet); ``objective.fake_score: lora`` makes it adapter ``fake_score`` on the shared frozen base instead (ours,
see score_distillation.py), trained online on G's samples; for DMD2 a classification head on the fake score's
bottleneck.

Phases (the trainer runs them in this order; DMD2's two-time-scale rule is ``student_every``):

* ``student`` (every ``student_every`` steps): ``x = G(z)``; noise it at ``t ~ U[min_t, max_t]``; the
  distribution-matching gradient ``(x0_fake - x0_real) / mean|x - x0_real|`` (DMD eq. 7-8,
  :func:`functional.dmd_gradient`) through the surrogate ``0.5 ||x - sg(x - grad)||^2``; plus
  ``gan_weight`` x the non-saturating generator loss on the head's logits for ``x`` (DMD2 eq. 5), plus
  ``regression_weight`` x the regression loss on teacher ODE pairs (DMD eq. 9; DMD2 drops it).
* ``fake_score`` (every step): denoising score matching of the fake score on ``sg(G(z))`` at
  ``t ~ U(0, 1]``, epsilon loss (DMD eq. 6, as the authors' code; on flow teachers the velocity loss, see
  ``ScoreDistillation.denoising_space``); plus ``disc_weight`` x the
  discriminator loss of the head on real images vs ``sg(G(z))`` (DMD2 eq. 5), both noised at
  ``t ~ U[0, gan_max_t)`` (DMD2's "diffusion GAN" option, on in its SD configs).

Multi-step students (e.g. ``student.timesteps: [1.0, 0.75, 0.5, 0.25]``, = diffusers 999, 749, 499,
249) are trained with backward simulation (DMD2 sec. 4.5): for a step index ``k`` drawn once per batch,
the student's input is produced by running the student's own first ``k`` steps from pure noise
(no gradient), exactly as at inference -- never by noising real data. Between steps the rollout moves as the
student's sampler does: DMD2 re-noises with fresh noise (``student.gamma: 1``); ``gamma: 0`` (ours, not in
DMD2) takes a deterministic DDIM jump to the next time, ``0 < gamma < 1`` TCD's mix of the two. Then the
regression term needs ``regression_steps: first`` (its later-step pairs are fresh-noise re-noisings); on
the digits teacher gamma 0 made the 4-step student far worse (README, "Train a student"). DMD2 trains one
fake score on all steps' outputs, so it models their mixture and the DM gradient pushes the mixture, not
each step's output, towards the real distribution: a poor step (on the digits teacher, the first, from
pure noise at 999) can be compensated by distorting the others. ``fake_per_step: true`` (ours, not in DMD2)
gives step ``k`` its own fake score, a network copy trained only on step ``k``'s outputs and used only for
step ``k``'s DM gradient (full copies only, K networks in memory; the GAN head stays on the first step's
copy). On the digits
teacher it helped at real guidance 1.1, not at 1.25 alone, and at 1.25 with ``dm_below_input`` (README,
"Train a student"). Two more options of ours for multi-step students: ``dm_below_input: true`` draws step
``k``'s DM noise level below its input's time ``t_k`` (``k > 0``): above ``t_k`` the output's structure
comes from the input, and the DM gradient there pushes a late step to redo what the earlier steps made.
``regression_steps: first`` applies the regression term (below) to the first step only: a later step's
re-noised pair has a target that is not a function of its input (fresh noise), so its MSE pulls that step
towards the blurred posterior mean; DMD's eq. 9 is about the noise-to-image map. ``later_real_guidance``
sets the real score's CFG scale for the DM terms of steps ``k > 0`` (``real_guidance`` stays the first step's):
guidance acting again on every later step compounds the sharpening and the loss of diversity.

One-step students take pure noise and are told ``student.timesteps[0]``. DMD2's SD1.5 run tells them 999
(``[1.0]``); its one-step SDXL run tells them 399 (``student.timesteps: [0.4]``; authors' config
``sdxl_cond399_8node_lr5e-7_1step_...``, sampled with ``timesteps=[399]``). For an epsilon-predicting
network the clean estimate is ``(x - sigma_t eps) / alpha_t``: at 999 (SD's betas) its errors are magnified
14.6x, at 399 1.16x -- on the digits teacher that magnification is the grey speckle of a 999 student (see
``configs/demo/dmd2_digits.yaml``). The authors also pre-train that SDXL student with the regression loss.

Defaults are DMD2's SD1.5 recipe (experiments/sdv1.5 scripts): real guidance 1.75, fake guidance 1,
``student_every`` 10, t in [0.02, 0.98] for the DM term, GAN weights 1e-3 (generator) / 1e-2
(discriminator), diffusion-GAN noise over the whole range. The ``dmd`` registry entry sets
``regression_weight`` 0.25 (DMD's lambda_reg), no GAN, ``student_every`` 1.

Deviations: times are continuous (``t`` uniform, where the code draws integer timesteps; on flow teachers on
the shifted training grid); the regression term is latent MSE by default (``regression_loss: lpips`` is DMD's
LPIPS on decoded images, regression.py); the head pools globally (see
nets/discriminator.py); real images are encoded with the VAE posterior mean; where the authors' code
zeroes non-finite DM gradients, ours leaves them: the trainer's guard skips and counts that update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import ConfigError, _check
from ..sampling import sample_ode, step_landing
from ..student import Student
from . import functional as fn
from .base import Batch, LossOut, Phase
from .gan import Adversary, DenoiserFeatures, latent_probe
from .regression import Regression, RegressionConfig
from .score_distillation import ScoreDistillation, ScoreDistillationConfig, build_fake_score


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
    regression_steps: str = "all"    # multi-step students: regression on every step's input (all) or step 0 (first)
    regression_loss: str = "mse"     # mse (latents, ours) | lpips (decoded images, DMD's; regression.py)
    lpips_weights: str | None = None  # regression_loss lpips: the LPIPS-VGG safetensors file (perceptual.py)
    fake_per_step: bool = False      # multi-step students: one fake score per student step (not in DMD2)
    dm_below_input: bool = False     # multi-step students: step k's DM term at t < its input's time t_k (not in DMD2)
    later_real_guidance: float | None = None  # multi-step students: real-score CFG of steps k > 0 (not in DMD2)

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(self.real_guidance >= 1.0, f"{p}.real_guidance", f"is a diffusers CFG scale (>= 1), got {self.real_guidance}")
        _check(self.later_real_guidance is None or self.later_real_guidance >= 1.0, f"{p}.later_real_guidance",
               f"is a diffusers CFG scale (>= 1), got {self.later_real_guidance}")
        _check(self.student_every >= 1, f"{p}.student_every", f"must be >= 1, got {self.student_every}")
        _check(0.0 <= self.min_t < self.max_t <= 1.0, f"{p}.min_t",
               f"need 0 <= min_t < max_t <= 1, got {self.min_t}, {self.max_t}")
        _check(self.regression_loss in ("mse", "lpips"), f"{p}.regression_loss",
               f"must be mse or lpips, got {self.regression_loss!r}")
        _check(self.regression_steps in ("all", "first"), f"{p}.regression_steps",
               f"must be 'all' or 'first', got {self.regression_steps!r}")
        for key in ("gan_weight", "disc_weight", "regression_weight", "gan_max_t"):
            _check(getattr(self, key) >= 0, f"{p}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.gan_max_t <= 1.0, f"{p}.gan_max_t", f"must be <= 1, got {self.gan_max_t}")

    def check_gan_images(self, config) -> None:
        if self.gan_weight > 0 or self.disc_weight > 0:
            self.check_images(config, "with a GAN term (gan_weight / disc_weight > 0) needs real images (or set both "
                              "weights to 0)")

    def validate_run(self, config) -> None:
        self.check_gan_images(config)
        if self.later_real_guidance is not None and len(config.student.timesteps) < 2:
            raise ConfigError("objective.later_real_guidance", f"needs a multi-step student (it sets the real score's "
                              f"guidance of steps 2..K); got {config.student.timesteps}")
        if self.dm_below_input:
            later = config.student.timesteps[1:]
            if not later or min(later) <= self.min_t:
                raise ConfigError("objective.dm_below_input", f"needs a multi-step student whose later timesteps lie "
                                  f"above min_t {self.min_t}; got {config.student.timesteps}")
        if self.regression_weight > 0 and self.regression_steps == "all":
            self.check_renoising_sampler(config, "with regression_steps: all (set first, or regression_weight: 0) "
                                         "trains later steps on teacher samples re-noised with fresh noise")
        if self.fake_per_step and self.fake_score != "full":
            raise ConfigError("objective.fake_per_step", "needs fake scores that are network copies "
                              "(objective.fake_score: full)")
        super().validate_run(config)


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
        self.adversary = None
        if self.gan:  # the shared GAN component, on the fake score's bottleneck (DMD2 sec. 4.2)
            network = DenoiserFeatures(self.fake.backbone, self.fake.adapter, ("mid",), ("uniform", 0.0, cfg.gan_max_t))
            self.adversary = Adversary(network, latent_probe(teacher), loss="nonsaturating")
        self.step_fakes = None  # fake_per_step: the fake score of step k is step_fakes[k] (step_fakes[0] = fake)
        if cfg.fake_per_step and len(student.timesteps) > 1:
            extra = [build_fake_score(cfg, teacher, student) for _ in student.timesteps[1:]]
            self.step_fakes = torch.nn.ModuleList([self.fake, *extra])
        self.regression = None
        if cfg.regression_weight > 0:
            reg_cfg = RegressionConfig(teacher_steps=cfg.teacher_steps, guidance=cfg.pair_guidance, num_pairs=cfg.num_pairs,
                                       steps=cfg.regression_steps, loss=cfg.regression_loss,
                                       lpips_weights=cfg.lpips_weights)
            self.regression = Regression(reg_cfg, teacher, student, prompt_pool)

    @property
    def gan(self) -> bool:
        return self.cfg.gan_weight > 0 or self.cfg.disc_weight > 0

    def phases(self) -> list[Phase]:
        fake = ["fake_score", "disc"] if self.gan else ["fake_score"]
        return [Phase("student", ["student"], every=self.cfg.student_every), Phase("fake_score", fake, lr=self.cfg.fake_lr)]

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        groups = super().trainable()
        if self.step_fakes is not None:
            for k, fake in enumerate(self.step_fakes):
                if k:
                    groups["fake_score"].update({f"step{k}.{n}": p for n, p in fake.named_parameters_to_train().items()})
        if self.gan:
            groups["disc"] = dict(self.adversary.heads.named_parameters())
        return groups

    def fake_at(self, k: int) -> Student:
        """The fake score that models the outputs of student step ``k``."""
        return self.fake if self.step_fakes is None else self.step_fakes[k]

    def prepare(self, run_dir, device) -> None:
        if self.regression is not None:
            self.regression.prepare(run_dir, device)

    # -- losses ---------------------------------------------------------------------------------------
    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        cond = self.teacher.encode_prompt(batch.prompts)
        if phase == "student":
            return self._student_loss(batch, cond, step)
        if phase == "fake_score":
            return self._fake_loss(batch, cond)
        raise ValueError(f"{self.cfg.name} has phases 'student' and 'fake_score'; got {phase!r}")

    def _student_loss(self, batch: Batch, cond, step: int) -> LossOut:
        x, k = self.generate_at_step(batch, cond, grad=True)  # (B, C, H, W) latents
        total, terms = self._dm_terms(batch, cond, x, step, k)
        return LossOut(total, terms, images=x.detach())

    def _dm_terms(self, batch: Batch, cond, x: torch.Tensor, step: int, k: int = 0) -> tuple[torch.Tensor, dict]:
        """The student-phase loss on its sample ``x``, the output of step ``k``: distribution matching (+ GAN,
        + regression)."""
        c = self.cfg
        below = float(self.teacher.backbone.schedule.training_draw(self.student.timesteps[k]))  # the draw that lands on t_k
        hi = min(c.max_t, below) if (c.dm_below_input and k > 0) else c.max_t
        guidance = c.later_real_guidance if (k > 0 and c.later_real_guidance is not None) else c.real_guidance
        x_t, t, _ = self.noised(batch, x.detach(), c.min_t, hi)
        with torch.no_grad():
            with self.teacher.backbone.adapter(None):
                x0_real = self.teacher.backbone.cfg(x_t, t, cond, self.teacher.empty_cond(len(batch)), guidance)
            x0_fake = self.fake_at(k)(x_t, t, cond, out="x0")
            grad = fn.dmd_gradient(x.detach(), x0_real, x0_fake)
        dm = fn.score_surrogate_loss(x, grad)
        total, terms = dm, {"dm_loss": dm.detach(), "dm_grad_norm": grad.float().flatten(1).norm(dim=1).mean().detach()}
        if c.gan_weight > 0:
            gen = self.adversary.generator_loss(batch, x, cond)
            total = total + c.gan_weight * gen
            terms["gan_generator"] = gen.detach()
        if self.regression is not None:
            reg = self.regression.loss("student", batch, step)
            total = total + c.regression_weight * reg.total
            terms.update(reg.terms)  # regression_mse or regression_lpips
        return total, terms

    def _fake_loss(self, batch: Batch, cond) -> LossOut:
        x, k = self.generate_at_step(batch, cond, grad=False)
        x_t, t, eps = self.fake_noised(batch, x)
        denoise = self.fake_denoising(self.fake_at(k), x, x_t, t, eps, cond)
        total, terms = denoise, {"fake_denoising": denoise.detach()}
        if self.gan and self.cfg.disc_weight > 0:
            with torch.no_grad():
                real = self.teacher.encode_images(batch.images, sample=False).to(x)
                real_cond = self.teacher.encode_prompt(batch.image_captions)
            disc, disc_terms = self.adversary.discriminator_loss(batch, real, real_cond, x, cond)
            total = total + self.cfg.disc_weight * disc
            terms.update(disc_terms)
        return LossOut(total, terms, images=x)


class DMD(DMD2):
    """DMD (v1): distribution matching + regression on teacher ODE pairs, fake score updated every step."""

    Config = DMDConfig


@dataclass
class DPDMDConfig(DMD2Config):
    name: ClassVar[str] = "dpdmd"
    real_guidance: float = 3.5       # the authors' SD3.5-M teacher CFG (anchor and real score)
    student_every: int = 5           # 5 fake-score updates per student update (per_train_fake_num)
    min_t: float = 0.001             # DM term over all training timesteps
    max_t: float = 1.0
    gan_weight: float = 0.0          # DP-DMD adds no GAN, LPIPS or other module
    disc_weight: float = 0.0
    diversity_weight: float = 0.05   # the first step's target-prediction loss
    anchor_steps: int = 10           # teacher ODE steps from noise to the anchor ...
    anchor_grid: int = 30            # ... on its DDIM grid of this many steps

    def validate(self, p: str) -> None:
        super().validate(p)
        _check(self.diversity_weight >= 0, f"{p}.diversity_weight", f"must be >= 0, got {self.diversity_weight}")
        _check(0 < self.anchor_steps < self.anchor_grid, f"{p}.anchor_steps",
               f"need 0 < anchor_steps < anchor_grid, got {self.anchor_steps}, {self.anchor_grid}")

    def validate_run(self, config) -> None:
        if len(config.student.timesteps) < 2:
            raise ConfigError("student.timesteps", f"{self.name} trains a multi-step student (its first step is the "
                              f"diversity step); got {config.student.timesteps}")
        if config.student.gamma != 0.0:
            raise ConfigError("student.gamma", f"{self.name} trains the deterministic rollout the student samples "
                              f"with: set student.gamma: 0, got {config.student.gamma}")
        for key, what in (("fake_per_step", "one fake score"), ("dm_below_input", "no later step to restrict"),
                          ("later_real_guidance", "one guidance, real_guidance")):
            if getattr(self, key) not in (False, None):
                raise ConfigError(f"objective.{key}", f"{self.name} applies its DM term to the final sample only: {what}")
        self.check_unguided_sampler(config)
        self.check_gan_images(config)


class DPDMD(DMD2):
    """DP-DMD (Wu et al., "Diversity-Preserved Distribution Matching Distillation for Fast Visual Synthesis",
    2026; numerical reference: the authors' SD3.5-M code, Multimedia-Analytics-Laboratory/dpdmd,
    ``train_sd35_dpdmd.py``). A K-step student samples by deterministic DDIM (``student.gamma: 0``). Its
    *first* step is trained to predict a target instead of by DMD: the teacher runs ``anchor_steps`` guided
    DDIM steps of its ``anchor_grid``-step schedule from the same noise to an anchor ``z`` at ``t_k``; the
    target is the clean prediction whose DDIM step from the noise passes through ``z``
    (:func:`functional.ddim_secant_x0`, the VP form of the code's secant velocity ``(x1 - z) / (1 - sigma_k)``),
    squared error x ``diversity_weight`` 0.05. The latent after the first step is detached -- no DMD
    gradient reaches the first step -- and the student's own steps 2..K continue from it with gradients;
    the DM gradient acts on the final output only (no backward simulation, no re-noising). The fake score
    learns the no-grad K-step rollout's samples; 5 fake-score updates per student update; no GAN.

    Deviations: the code is a flow model's (velocity MSE); here the loss is the clean-prediction MSE of the
    same straight-path target, equal to the velocity MSE for a flow model; the teacher's anchor starts at
    the first time of its own DDIM grid (SD's pipeline convention), the student at ``student.timesteps[0]``;
    DMD's normaliser is DMD2's ``mean|x - x0_real|`` (the code: ``mean|x_t - x0_real|``).
    """

    Config = DPDMDConfig

    def noise(self, batch: Batch) -> torch.Tensor:
        t_ = self.teacher
        return batch.randn(*t_.latent_shape, device=t_.device, dtype=t_.dtype)

    def rollout(self, batch: Batch, cond, grad: bool, noise: torch.Tensor | None = None):
        """``(first, final)``: the student's clean prediction at its first step, and its K-step sample from
        ``noise`` (default: the batch's next draw) by deterministic DDIM (the sampler of ``student.gamma =
        0``: the last step lands on timestep 0, or ``t = 0`` on a flow teacher), detached after the first step."""
        ts, sched = self.student.timesteps, self.student.backbone.schedule
        x = self.noise(batch) if noise is None else noise
        first = None
        for i, t in enumerate(ts):
            with torch.set_grad_enabled(grad):
                x0 = self.student(x, t, cond, out="x0")
                eps = sched.convert(x0, x, t, "x0", "eps")
                x = sched.add_noise(x0, eps, step_landing(sched, ts, i, 0.0)[1])  # as sample_student at gamma 0
            if i == 0:
                first, x = x0, x.detach()  # DMD's gradient stops here: the first step learns only its target
        return first, x

    def generate_at_step(self, batch: Batch, cond, grad: bool) -> tuple[torch.Tensor, int]:
        return self.rollout(batch, cond, grad)[1], 0  # one fake score, for the final samples

    @torch.no_grad()
    def anchor_target(self, noise: torch.Tensor, cond) -> torch.Tensor:
        """The first step's target: the clean prediction whose DDIM step from ``noise`` hits the teacher's
        anchor (the teacher's guided ODE from the same ``noise``)."""
        from ..pipeline import sampling_grid

        t_, c = self.teacher, self.cfg
        grid = sampling_grid(t_, c.anchor_grid)[:c.anchor_steps + 1]
        with t_.backbone.adapter(None):
            z = sample_ode(t_.backbone, noise, cond, grid, uncond=t_.empty_cond(len(noise)), guidance=c.real_guidance)
        sched, t0, tk = t_.backbone.schedule, self.student.timesteps[0], grid[-1]
        return fn.ddim_secant_x0(noise, sched.alpha(t0), sched.sigma(t0), z, sched.alpha(tk), sched.sigma(tk)).to(z)

    def _student_loss(self, batch: Batch, cond, step: int) -> LossOut:
        noise = self.noise(batch)
        target = self.anchor_target(noise, cond)
        first, x = self.rollout(batch, cond, grad=True, noise=noise)
        total, terms = self._dm_terms(batch, cond, x, step)
        div = torch.nn.functional.mse_loss(first.float(), target.float())
        terms["diversity_mse"] = div.detach()
        return LossOut(total + self.cfg.diversity_weight * div, terms, images=x.detach())
