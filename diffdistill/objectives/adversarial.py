"""Adversarial distillation: LADD (Sauer et al., "Fast High-Resolution Image Synthesis with Latent Adversarial
Diffusion Distillation", 2024) and ADD (Sauer et al., "Adversarial Diffusion Distillation", 2023). No public
training code exists for either; the defaults below are the papers' where they state them.

Networks: the student G (initialised from the teacher); the frozen teacher; a discriminator = trainable heads
on the *teacher's own features* at a noised copy of its input (:class:`~diffdistill.objectives.gan.Adversary`,
the GAN component DMD2 uses too).

Data ``x0`` with prompts: ``data: teacher`` -- latents the teacher generated (guided DDIM, ``guidance``,
``teacher_steps``), a pool of ``num_pairs`` made once into the run folder (LADD sec. 3.3: synthetic data; the
run needs no images); ``data: images`` -- ``data.images`` encoded by the VAE (ADD's real images).

Phases (in this order, each ``every`` 1):

* ``student``: a student timestep ``s_k`` is drawn per sample from ``student.timesteps`` -- the first with
  probability ``first_step_prob`` (LADD: 0.7 of ``[1, 0.75, 0.5, 0.25]``, the rest 0.1 each), the others
  sharing the remainder equally; ADD: uniform. Its input is ``x0`` noised at ``s_k`` (ADD eq. 1, LADD), or pure
  noise at the first timestep (the sampler's input; see deviations). Loss: the generator's GAN loss on the
  output ``x = G(x_s, s_k)`` through the frozen teacher features (hinge: ``-E[D(x)]``, ADD eq. 3), plus
  ``distill_weight`` x ADD's distillation loss ``c(t) ||x - x0_teacher(sg(x_t), t)||^2`` at ``t ~ U[min_t,
  max_t]`` with the teacher at CFG ``distill_guidance`` and ``c(t) = alpha_t`` (ADD eq. 4-5, its exponential
  weighting; ADD: lambda = 2.5; LADD drops this term: 0).
* ``disc``: the heads' hinge loss on ``x0`` (real) vs ``sg(x)`` (fake), both noised at the discriminator's
  noise levels (LADD: logit-normal with ``m = 1, s = 1``), heads conditioned on the noise level and the pooled
  prompt; optional R1 (``exact``; ADD: weight 1e-5) or approximated R1 (``approx``).

Feature network (``disc_network``): ``teacher`` (default; offline) or ``dinov2:<hub id or folder>`` -- ADD's
discriminator, a DINOv2 ViT (``facebook/dinov2-small`` is ADD's ViT-S) on the VAE-decoded images, heads on four
of its layers. DINOv2 weights come from the hub, so offline runs (and ours) use the teacher's features: ADD
then has LADD's discriminator, noised as LADD's.

Deviations (also in the README): at the first student
timestep the input is pure noise, not data noised to ``s_1`` (SD's ``alpha_999 = 0.068`` would leak the data
into the 1-step student's input, which inference never gives it). Times are continuous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import _check
from ..student import Student
from . import functional as fn
from .base import Batch, LossOut, Objective, ObjectiveConfig, Phase, noised
from .gan import (
    LOSSES,
    NOISE_KINDS,
    R1_KINDS,
    Adversary,
    DenoiserFeatures,
    PixelFeatures,
    latent_probe,
    load_pixel_network,
)
from .regression import Regression, RegressionConfig

DATA_KINDS = ("teacher", "images")


@dataclass
class LADDConfig(ObjectiveConfig):
    name: ClassVar[str] = "ladd"
    data: str = "teacher"                 # teacher (synthetic latents, image-free) | images (data.images)
    guidance: float = 2.0                 # data: teacher -- its CFG (diffusers convention) ...
    teacher_steps: int = 25               # ... DDIM steps ...
    num_pairs: int = 1000                 # ... and pool size (0: generate every batch on the fly)
    first_step_prob: float | None = 0.7   # P(first student timestep); None: uniform (ADD)
    loss: str = "hinge"                   # hinge (ADD, LADD) | nonsaturating
    disc_network: str = "teacher"         # teacher (its own features, offline) | dinov2:<hub id or folder> (ADD's)
    disc_levels: list[str] | None = None  # levels with a head; None: every UNet block / 6 MM-DiT blocks / 4 DINOv2 layers
    disc_head_width: int | None = None    # heads project wider features to this many channels first (None: no)
    disc_noise: str = "logit_normal"      # logit_normal(disc_t_mean, disc_t_std) | uniform (U[0, 1))
    disc_t_mean: float = 1.0
    disc_t_std: float = 1.0
    head_conditioning: bool = True        # heads see the noise level and the pooled prompt
    r1: str = "none"                      # none | exact | approx
    r1_weight: float = 0.0
    r1_sigma: float = 0.01                # approx: the input perturbation's std
    disc_lr: float | None = None          # the disc phase's learning rate (None: train.lr)
    distill_weight: float = 0.0           # ADD's lambda (2.5); LADD: 0
    distill_guidance: float = 2.0         # the teacher's CFG for the distillation target
    min_t: float = 0.02                   # distillation: t ~ U[min_t, max_t]
    max_t: float = 0.98

    def validate(self, p: str) -> None:
        _check(self.data in DATA_KINDS, f"{p}.data", f"must be one of {DATA_KINDS}, got {self.data!r}")
        _check(self.guidance >= 1.0 and self.distill_guidance >= 1.0, f"{p}.guidance",
               f"guidance / distill_guidance are diffusers CFG scales (>= 1), got {self.guidance}, {self.distill_guidance}")
        _check(self.teacher_steps > 0, f"{p}.teacher_steps", f"must be positive, got {self.teacher_steps}")
        _check(self.disc_head_width is None or self.disc_head_width > 0, f"{p}.disc_head_width",
               f"must be positive or null, got {self.disc_head_width}")
        _check(self.num_pairs >= 0, f"{p}.num_pairs", f"must be >= 0, got {self.num_pairs}")
        _check(self.first_step_prob is None or 0 < self.first_step_prob <= 1, f"{p}.first_step_prob",
               f"must be in (0, 1] or null, got {self.first_step_prob}")
        _check(self.disc_network == "teacher" or (self.disc_network.startswith("dinov2:") and len(self.disc_network) > 7),
               f"{p}.disc_network", f"must be 'teacher' or 'dinov2:<hub id or folder>', got {self.disc_network!r}")
        _check(self.loss in LOSSES, f"{p}.loss", f"must be one of {sorted(LOSSES)}, got {self.loss!r}")
        _check(self.disc_noise in NOISE_KINDS, f"{p}.disc_noise", f"must be one of {NOISE_KINDS}, got {self.disc_noise!r}")
        _check(self.disc_t_std > 0, f"{p}.disc_t_std", f"must be positive, got {self.disc_t_std}")
        _check(self.r1 in R1_KINDS, f"{p}.r1", f"must be one of {R1_KINDS}, got {self.r1!r}")
        for key in ("r1_weight", "r1_sigma", "distill_weight"):
            _check(getattr(self, key) >= 0, f"{p}.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.disc_lr is None or self.disc_lr > 0, f"{p}.disc_lr", f"must be positive, got {self.disc_lr}")
        _check(0.0 <= self.min_t < self.max_t <= 1.0, f"{p}.min_t",
               f"need 0 <= min_t < max_t <= 1, got {self.min_t}, {self.max_t}")

    def validate_run(self, config) -> None:
        self.check_unguided_sampler(config)
        self.check_renoising_sampler(config, "trains later steps on data re-noised with fresh noise")
        if self.data == "images":
            self.check_images(config, "with data: images trains on real images")

    def trains_on_prompts(self) -> bool:
        return self.data == "teacher"  # teacher samples of the prompts; with images, their captions


@dataclass
class ADDConfig(LADDConfig):
    name: ClassVar[str] = "add"
    data: str = "images"                  # ADD trains on real images
    first_step_prob: float | None = None  # timesteps drawn uniformly
    r1: str = "exact"                     # R1 with weight 1e-5 (ADD sec. 4)
    r1_weight: float = 1.0e-5
    distill_weight: float = 2.5           # lambda (ADD sec. 4)


class LADD(Objective):
    Config = LADDConfig

    def __init__(self, cfg: LADDConfig, teacher, student: Student, prompt_pool: list[str]):
        super().__init__()
        cfg.check_unguided_student(student)
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.pool = None
        if cfg.data == "teacher":
            self.pool = Regression(RegressionConfig(teacher_steps=cfg.teacher_steps, guidance=cfg.guidance,
                                                    num_pairs=cfg.num_pairs), teacher, student, prompt_pool)
        if cfg.disc_network == "teacher":
            noise = (cfg.disc_noise, cfg.disc_t_mean, cfg.disc_t_std) if cfg.disc_noise == "logit_normal" else ("uniform", 0.0, 1.0)
            network = DenoiserFeatures(teacher.backbone, None, cfg.disc_levels, noise)
        else:
            network = PixelFeatures(teacher, load_pixel_network(cfg.disc_network, teacher.device), cfg.disc_levels)
        self.adversary = Adversary(network, latent_probe(teacher), loss=cfg.loss, conditioned=cfg.head_conditioning, r1=cfg.r1,
                                   r1_weight=cfg.r1_weight, r1_sigma=cfg.r1_sigma, head_width=cfg.disc_head_width)

    def phases(self) -> list[Phase]:
        return [Phase("student", ["student"]), Phase("disc", ["disc"], lr=self.cfg.disc_lr)]

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return {"student": self.student.named_parameters_to_train(), "disc": dict(self.adversary.heads.named_parameters())}

    def prepare(self, run_dir, device) -> None:
        if self.pool is not None:
            self.pool.prepare(run_dir, device)

    # -- pieces ---------------------------------------------------------------------------------------
    def data(self, batch: Batch) -> tuple[list[str], torch.Tensor]:
        """``(prompts, x0)``: this batch's data latents -- teacher samples or encoded real images."""
        if self.pool is not None:
            prompts, _, x0 = self.pool.batch_pairs(batch)
            return prompts, x0
        with torch.no_grad():
            x0 = self.teacher.encode_images(batch.images, sample=False)
        return batch.image_captions, x0.to(self.teacher.device, self.teacher.dtype)

    def student_times(self, batch: Batch) -> torch.Tensor:
        """``(B,)`` indices into ``student.timesteps``: the first with ``first_step_prob``, the rest equally."""
        n = len(self.student.timesteps)
        p0 = self.cfg.first_step_prob if self.cfg.first_step_prob is not None else 1.0 / n
        u = batch.rand()
        if n == 1:
            return torch.zeros(len(batch), dtype=torch.long)
        later = 1 + ((u - p0) / (1 - p0) * (n - 1)).floor().long().clamp(0, n - 2)
        return torch.where(u < p0, torch.zeros_like(later), later)

    def student_sample(self, batch: Batch, x0: torch.Tensor, cond, grad: bool) -> torch.Tensor:
        """The student's output from ``x0`` noised at its drawn timestep (pure noise at the first)."""
        k = self.student_times(batch)
        t = torch.tensor(self.student.timesteps, dtype=torch.float64)[k].to(x0.device)
        eps = batch.randn(*x0.shape[1:]).to(x0)
        x_s = torch.where((k == 0).view(-1, 1, 1, 1).to(x0.device), eps, self.student.backbone.schedule.add_noise(x0, eps, t))
        with torch.set_grad_enabled(grad):
            return self.student(x_s, t, cond, out="x0")

    def distillation(self, batch: Batch, x: torch.Tensor, cond) -> torch.Tensor:
        """ADD eq. 4-5: ``alpha_t ||x - x0_teacher(sg(x_t), t)||^2``."""
        c, sched = self.cfg, self.teacher.backbone.schedule
        x_t, t, _ = noised(batch, sched, x.detach(), c.min_t, c.max_t)
        with torch.no_grad(), self.teacher.backbone.adapter(None):
            target = self.teacher.backbone.cfg(x_t, t, cond, self.teacher.empty_cond(len(batch)), c.distill_guidance)
        return fn.add_distillation_loss(x, target, sched.alpha(t))

    # -- losses ---------------------------------------------------------------------------------------
    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        if phase not in ("student", "disc"):
            raise ValueError(f"{self.cfg.name} has phases 'student' and 'disc'; got {phase!r}")
        prompts, x0 = self.data(batch)
        cond = self.teacher.encode_prompt(prompts)
        x = self.student_sample(batch, x0, cond, grad=phase == "student")  # (B, C, H, W)
        if phase == "disc":
            total, terms = self.adversary.discriminator_loss(batch, x0, cond, x, cond)
            return LossOut(total, terms, images=x.detach())
        gen = self.adversary.generator_loss(batch, x, cond)
        total, terms = gen, {"gan_generator": gen.detach()}
        if self.cfg.distill_weight > 0:
            distill = self.distillation(batch, x, cond)
            total = total + self.cfg.distill_weight * distill
            terms["distillation"] = distill.detach()
        return LossOut(total, terms, images=x.detach())


class ADD(LADD):
    """ADD: LADD's machinery on real images, with the distillation term and R1 (see the module docstring)."""

    Config = ADDConfig
