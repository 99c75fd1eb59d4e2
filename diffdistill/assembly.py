"""What a run trains, assembled from its config and a loaded teacher: the student, the objective, the trainable
groups (fp32 masters) and the phases, with gradient checkpointing where asked. One construction, shared by the
trainer (:class:`~diffdistill.trainer.Trainer`) and the memory planner (:mod:`diffdistill.plan`), so that what is
planned is what trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objectives import OBJECTIVES, Objective, Phase
from .student import Student, build_student


@dataclass
class Assembly:
    student: Student
    objective: Objective
    groups: dict[str, dict[str, torch.nn.Parameter]]  # what each phase module trains: name -> {param name: param}
    phases: list[Phase]


def assemble(cfg, teacher, prompts: list[str], student_config=None) -> Assembly:
    """Build the run of ``cfg`` on ``teacher`` (``student_config``: in place of ``cfg.student``)."""
    from .kernels import use_attention

    student = build_student(teacher, student_config or cfg.student)
    # attention.backend: teacher and student now; the fake score and EMA targets, copied from them, inherit it
    for net in (teacher.backbone.denoiser, student.backbone.denoiser):
        use_attention(net, cfg.attention.backend, cfg.attention.density)
    objective: Objective = OBJECTIVES[type(cfg.objective).name](cfg.objective, teacher, student, prompts)
    groups = objective.trainable()
    fp32_masters(groups)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(objective, groups)
    phases = objective.phases()
    for phase in phases:
        unknown = [m for m in phase.modules if m not in groups]
        if unknown:
            raise ValueError(f"phase {phase.name!r} trains unknown modules {unknown}; known: {list(groups)}")
    return Assembly(student, objective, groups, phases)


def check_prompt_set(cfg, prompts: list[str]) -> None:
    """An objective that trains on prompts alone (no images) learns the prompt set: refuse one smaller than
    ``data.min_prompts``, before any model loads (the shipped real recipes name a 16-line example file)."""
    from .config import ConfigError

    d = cfg.data
    if d.prompts != "digits" and cfg.objective.trains_on_prompts() and len(prompts) < d.min_prompts:
        raise ConfigError("data.prompts", f"{d.prompts!r} holds {len(prompts)} prompts; {cfg.objective.name} trains on "
                          f"prompts alone and needs at least {d.min_prompts} (data.min_prompts). Point data.prompts at "
                          "a real prompt set: a .txt with one prompt a line, or a .csv / .jsonl with a caption column "
                          "(data.caption_column), e.g. LAION or COCO captions; or set data.min_prompts=0 to train on "
                          "these anyway")


def fp32_masters(groups: dict) -> None:
    """Every trainable tensor is an fp32 master whatever ``teacher.dtype`` (as diffusers' training scripts
    require): copies of a half-precision teacher (full students, fake-score copies) and adapters on it are cast
    in place, so an AdamW step of lr 1e-5 is not rounded away. The frozen teacher keeps its dtype; the compute
    dtype is autocast's (``train.mixed_precision``), and each network takes its inputs in its weights' dtype."""
    with torch.no_grad():
        for group in groups.values():
            for p in group.values():
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()


def enable_checkpointing(objective: Objective, groups: dict) -> None:
    """``train.gradient_checkpointing``: on every diffusers network a phase trains (the student's, and a fake
    score's own copy), adapter-safe (:func:`lora.enable_checkpointing`). After the objective is built, so that
    networks copied from the student's do not share its checkpointing closure."""
    from . import lora

    trained = {id(p) for group in groups.values() for p in group.values()}
    for module in objective.modules():  # parents first: a network's own blocks are then already on
        if getattr(module, "_supports_gradient_checkpointing", False) and not module.is_gradient_checkpointing \
                and any(id(p) in trained for p in module.parameters()):
            lora.enable_checkpointing(module)
