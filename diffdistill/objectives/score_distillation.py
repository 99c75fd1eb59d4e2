"""What the score-distillation objectives share -- DMD / DMD2 (``dmd.py``) and SwiftBrush / SNOOPI's
variational score distillation (``vsd.py``): a *fake score*, a denoiser trained online on the student's
samples, and student samples drawn as at inference (backward simulation for multi-step students).

The fake score is either a trainable copy of the teacher's denoiser or a LoRA adapter ``fake_score`` on
the teacher's own frozen network (the teacher is then that network with adapters off). ``fake_score``:
``full`` (a copy, for either student kind: DMD and DMD2 always train a full fake UNet, also beside the LoRA
student of DMD2's SDXL LoRA run) or ``lora`` (an adapter, for either kind: SwiftBrush's "LoRA teacher"; for
DMD2 ours, the memory-light option: one copy of the weights in memory for teacher, student and fake score).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import lora
from ..backbone import DiffusionBackbone
from ..config import _check
from ..sampling import next_student_input
from ..schedule import FlowSchedule, from_x0_eps
from ..student import Student
from . import functional as fn
from .base import Batch, Objective, ObjectiveConfig

FAKE_ADAPTER = "fake_score"


@dataclass
class ScoreDistillationConfig(ObjectiveConfig):
    fake_score: str = "full"                 # full | lora (module docstring); DMD / DMD2: full
    fake_lora_rank: int | None = None        # adapter fake score: rank (None: the student's, or 64 for full students)
    fake_lora_alpha: float | None = None     # None: the LoRA student's alpha, else = rank
    fake_lora_targets: list[str] | None = None  # None: the LoRA student's targets, else lora.DEFAULT_TARGETS
    fake_lr: float | None = None             # the fake-score phase's learning rate (None: train.lr)

    def validate(self, p: str) -> None:
        _check(self.fake_score != "auto", f"{p}.fake_score", "'auto' is gone: DMD2 trains a full copy (full, the "
               "default); an adapter on the shared base is 'lora'")
        _check(self.fake_score in ("lora", "full"), f"{p}.fake_score", f"must be full or lora, got {self.fake_score!r}")
        _check(self.fake_lora_rank is None or self.fake_lora_rank > 0, f"{p}.fake_lora_rank",
               f"must be positive, got {self.fake_lora_rank}")
        _check(self.fake_lr is None or self.fake_lr > 0, f"{p}.fake_lr", f"must be positive, got {self.fake_lr}")

    def validate_run(self, config) -> None:
        """Students sample without CFG (unless their network embeds the guidance). Multi-step ones are trained by
        backward simulation, which follows their own sampler (``student.gamma``)."""
        self.check_unguided_sampler(config)


def build_fake_score(cfg: ScoreDistillationConfig, teacher, student: Student) -> Student:
    """The fake score network as a :class:`Student` (run it with ``fake(x_t, t, cond, out=...)``)."""
    tb = teacher.backbone
    if cfg.fake_score == "full":
        denoiser = copy.deepcopy(tb.denoiser)
        if lora.adapter_names(denoiser):  # a LoRA student's adapter rides on the teacher's network: not in the copy
            denoiser.unload_lora()
        denoiser.requires_grad_(True).train()
        return Student(DiffusionBackbone(denoiser, tb.schedule, tb.pred_type), None, [1.0])
    base = tb.denoiser  # the teacher's frozen network, shared with a LoRA student
    own = base.peft_config[student.adapter] if student.adapter is not None else None
    rank = cfg.fake_lora_rank or (own.r if own is not None else 64)
    alpha = cfg.fake_lora_alpha if cfg.fake_lora_alpha is not None else (own.lora_alpha if own is not None else rank)
    targets = cfg.fake_lora_targets or (sorted(own.target_modules) if own is not None else lora.DEFAULT_TARGETS)
    lora.add_lora(base, FAKE_ADAPTER, rank, alpha, targets)
    return Student(tb, FAKE_ADAPTER, [1.0])


class ScoreDistillation(Objective):
    """Base of DMD2 and VSD: ``self.fake`` (the fake score), :meth:`generate` and :meth:`noised`."""

    def __init__(self, cfg: ScoreDistillationConfig, teacher, student: Student):
        super().__init__()
        cfg.check_unguided_student(student)
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.fake = build_fake_score(cfg, teacher, student)

    def trainable(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        return {"student": self.student.named_parameters_to_train(),
                "fake_score": self.fake.named_parameters_to_train()}

    def generate(self, batch: Batch, cond, grad: bool) -> torch.Tensor:
        """The student's sample ``x0`` for this batch. Multi-step students: backward simulation -- the
        input at step ``k`` (drawn once per batch) comes from the student's own first ``k`` steps."""
        return self.generate_at_step(batch, cond, grad)[0]

    def generate_at_step(self, batch: Batch, cond, grad: bool) -> tuple[torch.Tensor, int]:
        """:meth:`generate`'s sample and the step index ``k`` whose output it is. Between steps the rollout moves
        as the student's sampler does (:func:`~diffdistill.sampling.next_student_input`): DMD2's re-noising with
        fresh noise at ``student.gamma`` 1, a DDIM jump at 0 (not in DMD2), TCD's mix in between."""
        ts, t, gamma = self.student.timesteps, self.teacher, self.student.gamma
        sched = self.student.backbone.schedule
        x = batch.randn(*t.latent_shape, device=t.device, dtype=t.dtype)
        k = int(torch.randint(len(ts), (1,), generator=batch.shared)) if len(ts) > 1 else 0
        with torch.no_grad():
            for i in range(k):
                x0 = self.student(x, ts[i], cond, out="x0")
                eps = None if gamma == 1.0 else sched.convert(x0, x, ts[i], "x0", "eps")
                x = next_student_input(sched, x0, eps, ts, i, gamma, lambda like: batch.randn(*like.shape[1:]).to(like))
        with torch.set_grad_enabled(grad):
            return self.student(x, ts[k], cond, out="x0"), k

    @property
    def denoising_space(self) -> str:
        """Where the fake score's denoising loss lives: ``eps`` on VP teachers (DMD eq. 6, as DMD2's and
        SwiftBrush's code), ``flow`` (velocity ``eps - x0``) on flow teachers, their native prediction. With
        ``x_t = (1 - t) x0 + t eps`` an epsilon error is ``(1 - t)`` times the velocity error, so an epsilon loss
        on a flow model weights it by ``(1 - t)^2`` and the fake score barely learns at the high noise levels the
        DM term draws; DP-DMD's flow reference trains velocity (ours for the other objectives on flow teachers)."""
        return "flow" if isinstance(self.teacher.backbone.schedule, FlowSchedule) else "eps"

    def fake_denoising(self, fake: Student, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                       cond, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``fake``'s denoising loss at ``x_t``, the sample ``x`` noised with ``eps`` at ``t``, in
        :attr:`denoising_space` (per-sample ``weight`` as :func:`functional.denoising_loss`)."""
        space = self.denoising_space
        target = eps if space == "eps" else from_x0_eps(x, eps, t, "flow", self.teacher.backbone.schedule)
        return fn.denoising_loss(fake(x_t, t, cond, out=space), target, weight)

    def noised(self, batch: Batch, x: torch.Tensor, lo: float, hi: float):
        """``(x_t, t, eps)``: ``x`` noised by the teacher's schedule at ``t = training_time(u)``, ``u ~ U[lo, hi)``
        per sample -- on a flow teacher the shifted sigma grid it was trained on (DP-DMD's flow reference draws
        its noise levels there; ``lo``, ``hi`` bound the unshifted draw)."""
        sched = self.teacher.backbone.schedule
        u = (lo + (hi - lo) * batch.rand()).double()
        t = sched.training_time(u).to(x.device)
        eps = batch.randn(*x.shape[1:]).to(x)
        return sched.add_noise(x, eps, t), t, eps

    def fake_noised(self, batch: Batch, x: torch.Tensor):
        """The fake score's training input: ``x`` noised at ``t = training_time(u)``, ``u ~ U(0, 1]`` (the authors'
        ``randint(0, N)`` timesteps, the lowest 1 / N)."""
        sched = self.teacher.backbone.schedule
        u = batch.rand().double().clamp_min(1.0 / sched.num_train_timesteps)
        t = sched.training_time(u).to(x.device)
        eps = batch.randn(*x.shape[1:]).to(x)
        return sched.add_noise(x, eps, t), t, eps
