"""The student network: a full trainable copy of the teacher's denoiser, or a LoRA adapter named
``student`` on the teacher's own (frozen) denoiser -- shared-base mode, where the teacher is the same
network with adapters off."""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import lora
from .backbone import Cond, DiffusionBackbone
from .sampling import sample_student

STUDENT_ADAPTER = "student"


class Student(nn.Module):
    """``student(x_t, t, cond, out=...)`` runs the student (its adapter, when LoRA) on ``backbone``."""

    def __init__(self, backbone: DiffusionBackbone, adapter: str | None, timesteps: list[float],
                 guidance: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.backbone, self.adapter = backbone, adapter
        self.timesteps, self.guidance, self.gamma = list(timesteps), guidance, gamma

    def forward(self, x_t: torch.Tensor, t, cond: Cond, out: str = "x0") -> torch.Tensor:
        with self.backbone.adapter(self.adapter):
            return self.backbone(x_t, t, cond, out=out)

    def named_parameters_to_train(self) -> dict[str, nn.Parameter]:
        """The full denoiser's parameters, or only the student adapter's."""
        if self.adapter is None:
            return dict(self.backbone.denoiser.named_parameters())
        return {k: p for k, p in self.backbone.denoiser.named_parameters() if f".{self.adapter}." in k}

    @torch.no_grad()
    def generate(self, noise: torch.Tensor, cond: Cond, uncond: Cond | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents from the student's few-step recipe (its ``timesteps``, ``guidance`` and ``gamma``)."""
        with self.backbone.adapter(self.adapter):
            return sample_student(self.backbone, noise, cond, self.timesteps, uncond=uncond,
                                  guidance=self.guidance, generator=generator, gamma=self.gamma)


def build_student(teacher, cfg) -> Student:
    """From the teacher and a ``StudentConfig``: ``full`` copies the denoiser (trainable), ``lora`` adds
    adapter ``student`` to the teacher's denoiser (the base stays frozen)."""
    tb = teacher.backbone
    if cfg.kind == "full":
        denoiser = copy.deepcopy(tb.denoiser).requires_grad_(True).train()
        return Student(DiffusionBackbone(denoiser, tb.schedule, tb.pred_type), None, cfg.timesteps, cfg.guidance,
                       cfg.gamma)
    targets = cfg.lora_targets or lora.DEFAULT_TARGETS
    lora.add_lora(tb.denoiser, STUDENT_ADAPTER, cfg.lora_rank, cfg.lora_alpha, targets)
    return Student(tb, STUDENT_ADAPTER, cfg.timesteps, cfg.guidance, cfg.gamma)
