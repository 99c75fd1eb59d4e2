"""The objective contract (DESIGN §2): an objective declares its phases once and computes one loss per
phase; the trainer derives everything else (optimizers, update ratios, ``requires_grad``) from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..batch import Batch


@dataclass
class Phase:
    name: str            # "student" | "fake_score" | "disc"
    modules: list[str]   # names of what this phase trains (keys of Objective.trainable)
    every: int = 1       # update ratio: this phase runs on steps where step % every == 0
    lr: float | None = None  # this phase's learning rate; None: ``train.lr``


def noised(batch: Batch, schedule, x: torch.Tensor, lo: float, hi: float):
    """``(x_t, t, eps)``: ``x`` noised by ``schedule`` at ``t ~ U[lo, hi)``, one draw of ``t`` then of ``eps`` per
    sample (the per-sample generators of ``batch``)."""
    t = (lo + (hi - lo) * batch.rand()).double().to(x.device)
    eps = batch.randn(*x.shape[1:]).to(x)
    return schedule.add_noise(x, eps, t), t, eps


@dataclass
class LossOut:
    total: torch.Tensor                       # the scalar to backpropagate
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, for logging: batch means,
    # so that averaging them over processes gives the global-batch value
    images: torch.Tensor | None = None        # optional latents/images to show


@dataclass
class ObjectiveConfig:
    """Base for each objective's nested ``Config``; ``name`` is the registry key."""

    name: ClassVar[str] = ""

    def validate(self, prefix: str) -> None:
        pass

    def validate_run(self, config) -> None:
        """Checks against the other sections (e.g. an objective that needs ``data.images``)."""

    def trains_on_prompts(self) -> bool:
        """Whether the student learns from ``data.prompts`` alone (no image or its caption): then the prompt set
        is the training set, and a small one is refused (``data.min_prompts``)."""
        return True

    # -- checks several objectives share ------------------------------------------------------------
    def check_unguided_sampler(self, config) -> None:
        """At config load, where the teacher is a local folder: the student samples without CFG unless its
        network embeds the guidance (then ``student.guidance`` is the scale it is told). Hub ids are checked at
        set-up (:meth:`check_unguided_student`), once the teacher is loaded."""
        from ..config import ConfigError
        from ..pipeline import embeds_guidance_locally

        if config.student.guidance != 1.0 and embeds_guidance_locally(config.teacher.path) is False:
            raise ConfigError("student.guidance", f"{self.name} students sample without CFG (the teacher's guidance "
                              f"is distilled into them); got {config.student.guidance}")

    def check_unguided_student(self, student) -> None:
        """The student samples without CFG: the teacher's guidance is distilled into it. Checked at set-up, with
        the student built, because a guidance-embedded network (FLUX.1-dev) takes ``student.guidance`` as the
        scale it is *told* (one pass, no CFG branch), which any value may be."""
        from ..config import ConfigError

        if student.guidance != 1.0 and not student.backbone.embeds_guidance:
            raise ConfigError("student.guidance", f"{self.name} students sample without CFG (the teacher's guidance "
                              f"is distilled into them); got {student.guidance}")

    def check_renoising_sampler(self, config, how: str) -> None:
        """A multi-step student whose later inputs are trained as fresh-noise re-noisings (``how`` says of
        what) must sample that way: the sampler of ``student.gamma`` 1."""
        from ..config import ConfigError

        if config.student.gamma != 1.0 and len(config.student.timesteps) > 1:
            raise ConfigError("student.gamma", f"{self.name} {how}, the sampler of gamma 1; got {config.student.gamma}")

    def check_images(self, config, why: str) -> None:
        from ..config import ConfigError

        if config.data.images is None:
            raise ConfigError("data.images", f"objective {self.name!r} {why}: set data.images (e.g. 'digits')")


class Objective(nn.Module):
    """Subclasses set ``Config`` and implement :meth:`phases`, :meth:`loss` and :meth:`trainable`."""

    Config: ClassVar[type] = ObjectiveConfig

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def forward(self, phase: str, batch: Batch, step: int) -> LossOut:
        """The trainer calls the module (so DDP sees the forward); it is :meth:`loss`."""
        return self.loss(phase, batch, step)

    def loss(self, phase: str, batch: Batch, step: int) -> LossOut:
        raise NotImplementedError

    def trainable(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every trainable parameter group (``{parameter name: parameter}``) by group name, the names
        ``Phase.modules`` refers to. The group ``student`` is the one EMA tracks and export ships."""
        raise NotImplementedError

    def prepare(self, run_dir, device) -> None:
        """One-time work before training (e.g. caching teacher pairs in the run folder). Default: none."""

    def after_update(self, phase: str) -> None:
        """Called after each optimizer step of ``phase`` that was taken (not after a skipped one), e.g. to
        move a consistency target network towards the student. Default: nothing."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Training state that is neither a trainable parameter nor the student's EMA (e.g. an EMA target
        network); checkpoints save it and :meth:`load_extra_state` restores it. Default: none."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__} keeps no extra state, but the checkpoint holds "
                             f"{sorted(tensors)[:3]}...")
