"""The student network: a full trainable copy of the teacher's denoiser, or a LoRA adapter named
``student`` on the teacher's own (frozen) denoiser -- shared-base mode, where the teacher is the same
network with adapters off."""

from __future__ import annotations

import copy
from pathlib import Path

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

    @property
    def cfg_scale(self) -> float:
        """The CFG scale its sampler applies: ``guidance``, or 1 when the network embeds the guidance."""
        return 1.0 if self.backbone.embeds_guidance else self.guidance

    def forward(self, x_t: torch.Tensor, t, cond: Cond, out: str = "x0") -> torch.Tensor:
        """A guidance-embedded student is conditioned on ``cond.guidance``, by default its own ``guidance``."""
        if self.backbone.embeds_guidance and cond.guidance is None:
            cond = cond.with_guidance(self.guidance)
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
        """Latents from the student's few-step recipe (its ``timesteps``, ``guidance`` and ``gamma``): CFG
        with ``uncond``, or, for a guidance-embedded network, one pass conditioned on ``guidance``."""
        if self.backbone.embeds_guidance:
            cond, uncond = cond.with_guidance(self.guidance), None
        with self.backbone.adapter(self.adapter):
            return sample_student(self.backbone, noise, cond, self.timesteps, uncond=uncond,
                                  guidance=self.cfg_scale, generator=generator, gamma=self.gamma)


def with_guidance_embedding(denoiser: nn.Module, dim: int) -> nn.Module:
    """A copy of ``denoiser`` with a guidance embedding of width ``dim`` (``time_cond_proj_dim``, LCM's
    ``w``-conditioning), every other weight the denoiser's. The new projection starts at zero, so the
    copy computes exactly what the denoiser does until it trains (LCM's script leaves it random)."""
    config = {k: v for k, v in denoiser.config.items() if not k.startswith("_")}
    grown = type(denoiser).from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = grown.load_state_dict(denoiser.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj.") for k in missing):
        raise ValueError(f"adding a guidance embedding changed more than time_embedding.cond_proj: missing {missing}, "
                         f"unexpected {unexpected}")
    torch.nn.init.zeros_(grown.time_embedding.cond_proj.weight)
    param = next(denoiser.parameters())
    return grown.to(param.device, param.dtype).requires_grad_(True).train()


def build_student(teacher, cfg) -> Student:
    """From the teacher and a ``StudentConfig``: ``full`` copies the denoiser (trainable), ``lora`` adds
    adapter ``student`` to the teacher's denoiser (the base stays frozen)."""
    tb = teacher.backbone
    if cfg.guidance_embedding_dim and tb.is_mmdit:
        from .config import ConfigError

        raise ConfigError("student.guidance_embedding_dim", f"LCM's guidance embedding is a UNet's time_cond_proj_dim; "
                          f"this teacher's denoiser is a {type(tb.denoiser).__name__} (a guidance-distilled FLUX "
                          "embeds the scale already: set student.guidance)")
    if cfg.kind == "full":
        denoiser = copy.deepcopy(tb.denoiser).requires_grad_(True).train()
        if cfg.guidance_embedding_dim and tb.guidance_embedding_dim is None:
            denoiser = with_guidance_embedding(denoiser, cfg.guidance_embedding_dim)
        student = Student(DiffusionBackbone(denoiser, tb.schedule, tb.pred_type), None, cfg.timesteps, cfg.guidance,
                          cfg.gamma)
    else:
        targets = cfg.lora_targets or lora.DEFAULT_TARGETS
        lora.add_lora(tb.denoiser, STUDENT_ADAPTER, cfg.lora_rank, cfg.lora_alpha, targets)
        student = Student(tb, STUDENT_ADAPTER, cfg.timesteps, cfg.guidance, cfg.gamma)
    if cfg.init:
        start_from_export(student, teacher, cfg.init)
    return student


def start_from_export(student: Student, teacher, folder) -> None:
    """Overwrite the trainable weights of a freshly built ``student`` with those of an exported student
    (``diffdistill export`` or a run's ``final/``; config key ``student.init``): the whole denoiser of a full
    student, the ``student`` adapter of a LoRA one. The export must be of the same kind and fit exactly
    (same layers and shapes; for LoRA the same rank and alpha); its recipe (timesteps, guidance) is not taken:
    the run's config decides those. A staged recipe, e.g. a one-step student continued as the first step of a
    multi-step one, or DMD2's regression pre-training followed by distribution matching."""
    from .config import ConfigError
    from .export import ExportError, exported_denoiser, read_recipe

    folder = Path(folder)
    try:
        recipe = read_recipe(folder)
    except ExportError as err:
        raise ConfigError("student.init", str(err)) from None
    kind = "full" if student.adapter is None else "lora"
    if recipe["kind"] != kind:
        raise ConfigError("student.init", f"{folder} holds a {recipe['kind']} student; this run trains a {kind} "
                          "student (student.kind)")
    denoiser = student.backbone.denoiser
    try:
        if kind == "lora":
            lora.fill_lora(denoiser, STUDENT_ADAPTER, folder / recipe["lora"]["weights"],
                           prefix=teacher.family.denoiser[1])
            return
        missing, unexpected = denoiser.load_state_dict(exported_denoiser(folder, teacher).state_dict(), strict=False)
    except (ExportError, lora.LoraFileError) as err:
        raise ConfigError("student.init", str(err)) from None
    except RuntimeError as err:  # torch: size mismatches
        raise ConfigError("student.init", f"{folder}'s denoiser does not fit this student: {err}") from None
    if missing or unexpected:
        raise ConfigError("student.init", f"{folder}'s denoiser does not fit this student: {len(missing)} weights "
                          f"missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
