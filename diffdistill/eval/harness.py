"""The evaluation harness: one way to score a teacher, an exported student, or a training run's
checkpoints under a named protocol, with speed beside quality.

``resolve_models(spec)`` turns what the user names into :class:`Model` s *before* anything heavy loads
(so a wrong folder fails fast): a diffusers pipeline folder or hub id (sampled with the teacher's ODE
at ``steps`` / ``guidance``), an exported student (``diffdistill.json``; full or LoRA, its recipe), or
a run folder (its ``final/`` export, a chosen checkpoint, or every checkpoint). ``evaluate(model,
protocol)`` samples the protocol's prompts, scores them and times the model (text encoder, denoiser,
VAE; median after warm-up); ``write_report`` writes ``metrics.json``, ``report.md`` and ``grid.png``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .protocols import get_protocol

# the digits teacher's tuned recipe (issue notes: guidance 2 gives the best FID at >= 95% accuracy)
TEACHER_DEFAULTS = {"digits": (25, 2.0)}


class EvalInputError(ValueError):
    """A model, protocol or data input that cannot be evaluated; raised before any model loads."""


@dataclass
class Model:
    """Something to evaluate. ``kind``: ``teacher`` (diffusers folder / hub id), ``export`` (an exported
    student folder) or ``checkpoint`` (a run's checkpoint, EMA weights)."""

    label: str
    kind: str
    path: str
    base: str | None = None
    checkpoint: str | None = None
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None  # teachers: image side in pixels (default: the pipeline's native size)
    student_steps: int | None = None  # students: sample with only the first N of the trained timesteps
    loaded: tuple = field(default=(), repr=False)

    def load(self):
        """``(teacher, student or None)``; cached."""
        if not self.loaded:
            from ..export import load_run_student, load_student
            from ..pipeline import load_teacher

            if self.kind == "teacher":
                self.loaded = (load_teacher(self.path, resolution=self.resolution), None)
            elif self.kind == "export":
                self.loaded = load_student(self.path, base=self.base)
            else:
                teacher, student, _ = load_run_student(self.path, self.checkpoint, ema=True)
                self.loaded = (teacher, student)
            student = self.loaded[1]
            if student is not None and self.student_steps is not None:
                _check_student_steps(self.student_steps, len(student.timesteps), self.label)
                student.timesteps = student.timesteps[:self.student_steps]
        return self.loaded


def _check_student_steps(n: int, trained: int, what: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= trained:
        raise EvalInputError(f"--student-steps must be a whole number from 1 to the student's {trained} trained "
                             f"step(s) ({what}); got {n!r}")


def _trained_steps(folder: Path, kind: str) -> int:
    """How many timesteps the student in ``folder`` (an export, or a run folder) was trained to sample with."""
    from ..export import RECIPE_FILE

    if kind == "export":
        return len(json.loads((folder / RECIPE_FILE).read_text())["timesteps"])
    from ..config import load_config

    return len(load_config(folder / "config.yaml").student.timesteps)


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()


def resolve_models(spec: str, *, base: str | None = None, checkpoint: str | None = None,
                   all_checkpoints: bool = False, steps: int | None = None,
                   guidance: float | None = None, resolution: int | None = None,
                   student_steps: int | None = None) -> list[Model]:
    """What ``MODEL`` names, checked without loading weights. ``steps``, ``guidance`` and ``resolution`` apply
    to teachers only (students sample with their trained recipe, at their trained size). ``student_steps``
    applies to students only: sample with the first N of the trained timesteps, the last of them landing on
    the clean image -- a multi-step student's result after N steps (each step of a backward-simulation or
    consistency student outputs an image)."""
    if resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1):
        raise EvalInputError(f"--resolution must be a positive number of pixels, got {resolution!r}")
    models = _resolve_models(spec, base, checkpoint, all_checkpoints, steps, guidance, resolution)
    if student_steps is None:
        return models
    first = models[0]
    if first.kind == "teacher":
        raise EvalInputError(f"{spec} is a teacher: --student-steps applies to students only (teachers: --steps)")
    trained = _trained_steps(Path(first.path), first.kind)
    _check_student_steps(student_steps, trained, spec)
    for m in models:
        m.student_steps = student_steps
        m.label = f"{m.label}, first {student_steps} of {trained} steps"
    return models


def _resolve_models(spec, base, checkpoint, all_checkpoints, steps, guidance, resolution) -> list[Model]:
    from .. import checkpoint as ckpt
    from ..export import RECIPE_FILE

    folder = Path(spec)
    if resolution is not None and (_is_run(folder) or (folder / RECIPE_FILE).is_file()):
        raise EvalInputError(f"{spec} is a student: it samples at its trained size (teacher.resolution of its run, "
                             "recorded in diffdistill.json); --resolution applies to teachers only")
    if _is_run(folder):
        if all_checkpoints:
            found = sorted(ckpt.complete_checkpoints(folder))
            if not found:
                raise EvalInputError(f"run folder {folder} holds no complete checkpoint")
            return [Model(f"{folder.name} {c.name}", "checkpoint", str(folder), checkpoint=str(c)) for c in found]
        if checkpoint is not None:
            return [Model(f"{folder.name} {Path(str(checkpoint)).name}", "checkpoint", str(folder),
                          checkpoint=checkpoint)]
        if (folder / "final" / RECIPE_FILE).is_file():
            return [Model(f"{folder.name} final", "export", str(folder / "final"), base=base)]
        if ckpt.complete_checkpoints(folder):
            return [Model(f"{folder.name} newest checkpoint", "checkpoint", str(folder))]
        raise EvalInputError(f"run folder {folder} has neither final/ nor a complete checkpoint")
    if all_checkpoints or checkpoint is not None:
        raise EvalInputError(f"--checkpoint / --all-checkpoints need a run folder (config.yaml + checkpoints/); "
                             f"{spec} is not one")
    if (folder / RECIPE_FILE).is_file():
        if steps is not None or guidance is not None:
            raise EvalInputError(f"{spec} is an exported student: its steps and guidance are its trained recipe "
                                 "(diffdistill.json); --steps / --guidance apply to teachers only")
        return [Model(folder.name, "export", str(folder), base=base)]
    if folder.exists():
        if not (folder / "model_index.json").is_file():
            raise EvalInputError(f"{spec} is not a diffusers pipeline folder (no model_index.json), an exported "
                                 "student (no diffdistill.json) or a run folder (no config.yaml + checkpoints/)")
    elif spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise EvalInputError(f"{spec} does not exist (and is not a hub id of the form owner/name)")
    return [Model(folder.name or spec, "teacher", spec, steps=steps, guidance=guidance, resolution=resolution)]


def check_protocol_inputs(protocol: str, captions: str | None, images: str | None, num_images: int | None):
    """Fail on an unknown protocol or unusable COCO files before any model loads."""
    p = get_protocol(protocol)
    if p.dataset == "digits":
        if num_images is not None and (num_images < 20 or num_images % 10):
            raise EvalInputError(f"the digits protocol draws the same number per digit (two or more, for "
                                 f"diversity): --num-images must be a multiple of 10 and >= 20, got {num_images}")
        return
    from .coco import check_image_folder, select_coco_pairs

    if captions is None or images is None:
        raise EvalInputError(f"protocol {protocol!r} needs your local COCO files: --captions (the annotations "
                             "captions_*.json) and --images (the matching image folder)")
    pairs = select_coco_pairs(captions, num_images or p.num_images, p.selection_seed)
    check_image_folder(images, None if p.reference == "folder" else [x.file_name for x in pairs])


def recipe(model: Model, protocol: str | None = None) -> tuple[list[float] | None, int, float]:
    """(student times, or None for a teacher's ODE; steps; guidance). Teachers: ``model.steps`` /
    ``model.guidance``, else the protocol's tuned teacher recipe, else the pipeline class's defaults
    (``Family.defaults``: SD 25 / 7.5, SDXL 25 / 5, SD3 28 / 7, FLUX.1-dev 28 / 3.5 embedded, schnell 28 / 1)."""
    teacher, student = model.load()
    if student is not None:
        return student.timesteps, len(student.timesteps), student.guidance
    steps, guidance = TEACHER_DEFAULTS.get(protocol) or teacher.family.defaults(teacher)
    return None, model.steps or steps, model.guidance if model.guidance is not None else guidance


def sampler(model: Model, protocol: str | None = None, *, negative_prompt: str | None = None,
            nasa_scale: float = 0.1):
    """``sample(prompts, generator) -> images (B, 3, H, W) in [0, 1]`` with the model's recipe. A
    ``negative_prompt`` replaces the empty prompt of a teacher's CFG, and steers a student through its
    cross-attention with SNOOPI's NASA at weight ``nasa_scale`` (``diffdistill/nasa.py``)."""
    import contextlib

    from ..nasa import negative_away_attention
    from ..sampling import generate

    teacher, student = model.load()
    _, steps, guidance = recipe(model, protocol)

    @torch.no_grad()
    def sample(prompts, generator):
        if student is None:
            return generate(teacher, list(prompts), num_steps=steps, guidance=guidance, generator=generator,
                            negative_prompt=negative_prompt)
        noise = torch.randn((len(prompts), *teacher.latent_shape), generator=generator).to(teacher.device, teacher.dtype)
        uncond = teacher.empty_cond(len(prompts)) if student.cfg_scale != 1.0 else None
        steer = contextlib.nullcontext() if negative_prompt is None else negative_away_attention(
            student.backbone.denoiser, teacher.encode_prompt([negative_prompt]).embeds, nasa_scale)
        with steer:
            latents = student.generate(noise, teacher.encode_prompt(list(prompts)), uncond, generator=generator)
        return (teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)

    return sample


def evaluate(model: Model, protocol: str, *, num_images: int | None = None, seed: int = 0,
             captions: str | None = None, images: str | None = None, speed_batch: int = 10,
             timing: bool = True) -> tuple[dict, torch.Tensor]:
    """Sample and score ``model`` under ``protocol``; returns (metrics, images in [0, 1]). ``model``: a
    :class:`Model`, or any ``sample_fn(prompts, generator) -> images in [0, 1]`` (then neither NFE nor
    speed is measured). ``timing``: also run the speed benchmark (else ``ms_per_image`` is the
    protocol's wall time per image)."""
    from ..pipeline import sampling_grid
    from .speed import measure_speed

    if not isinstance(model, Model):
        return _run_protocol(model, protocol, num_images, seed, captions, images, nfe=None)
    teacher, student = model.load()
    times, steps, guidance = recipe(model, protocol)
    sample = sampler(model, protocol)
    p = get_protocol(protocol)
    # a guidance-embedded network (LCM's w-conditioned student, FLUX.1-dev) runs one pass per step
    cfg_scale = (1.0 if teacher.backbone.embeds_guidance else guidance) if student is None else student.cfg_scale
    result, imgs = _run_protocol(sample, protocol, num_images, seed, captions, images,
                                 nfe=steps * (2 if cfg_scale != 1.0 else 1))
    result.update(model=model.label, source=model.path, checkpoint=model.checkpoint, steps=steps, guidance=guidance,
                  student_timesteps=times)
    if not timing:
        return result, imgs
    prompts = [f"a handwritten digit {i % 10}" for i in range(speed_batch)] if p.dataset == "digits" \
        else ["a photo of a cat"] * speed_batch
    if student is None:
        speed = measure_speed(teacher, prompts, ts=sampling_grid(teacher, steps), guidance=guidance, repeats=3)
    else:  # the student's own sampler (its adapter, gamma, guidance embedding); uncond only if it uses CFG

        def student_sampler(_backbone, noise, cond, _ts, uncond=None, guidance=1.0):
            return student.generate(noise, cond, uncond)

        speed = measure_speed(dataclasses.replace(teacher, backbone=student.backbone), prompts, ts=times,
                              guidance=cfg_scale, sampler=student_sampler, repeats=3)
    result.update(nfe=speed.nfe, ms_per_image=speed.ms_per_image,
                  ms_per_image_protocol=result["ms_per_image"], speed=speed.to_dict())
    return result, imgs


def _run_protocol(sample, protocol, num_images, seed, captions, images, nfe):
    from .protocols import coco_protocol, digits_protocol

    p = get_protocol(protocol)
    if p.dataset == "digits":
        return digits_protocol(sample, n_per_digit=(num_images or p.num_images) // 10, seed=seed, nfe=nfe)
    return coco_protocol(sample, protocol, captions, images, num_images=num_images, seed=seed, nfe=nfe)


COLUMNS = [("model", "model", "{}"), ("steps", "steps", "{}"), ("NFE", "nfe", "{:g}"), ("FID", "fid", "{:.3f}"),
           ("FID/floor", "fid_ratio_to_floor", "{:.2f}"), ("CLIP", "clip_score", "{:.3f}"),
           ("prompt acc", "prompt_accuracy", "{:.3f}"), ("classifier acc", "classifier_accuracy", "{:.3f}"),
           ("classifier FD", "classifier_fd", "{:.2f}"), ("diversity", "diversity", "{:.3f}"),
           ("diversity ratio", "diversity_ratio", "{:.2f}"), ("ms/image", "ms_per_image", "{:.1f}"),
           ("speed-up", "speed_up", "{:.1f}x")]


def table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (missing values: n/a). ``diversity_ratio`` and ``speed_up`` are relative
    to the first row when it is a teacher; otherwise diversity is relative to the real images and there
    is no speed-up."""
    if rows:
        ref = rows[0]
        for r in rows:
            if r.get("diversity") is not None:
                denom = ref["diversity"] if ref.get("student_timesteps") is None else r.get("diversity_real")
                r["diversity_ratio"] = r["diversity"] / denom if denom else None
            teacher_first = ref.get("student_timesteps") is None and ref.get("ms_per_image")
            r["speed_up"] = ref["ms_per_image"] / r["ms_per_image"] if teacher_first and r.get("ms_per_image") else None
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    cell = lambda r, key, fmt: "n/a" if r.get(key) is None else fmt.format(r[key])
    return head + "".join("| " + " | ".join(cell(r, k, f) for _, k, f in COLUMNS) + " |\n" for r in rows)


def write_report(out: str | Path, rows: list[dict], grids: list[torch.Tensor], protocol: str) -> Path:
    """``metrics.json`` (one row, or a list for several models), ``report.md`` and ``grid.png`` (one band of
    images per model)."""
    from ..images import save_grid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (out / "metrics.json").write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1, default=str))
    p = get_protocol(protocol)
    floor = rows[0].get("fid_real_floor")
    notes = f"Protocol `{protocol}`: {p.description}.\n\n"
    if floor is not None:
        notes += (f"Real-vs-real FID floor at {rows[0]['num_images']} images: {floor:.3f}. "
                  f"Real images' diversity: {rows[0].get('diversity_real', float('nan')):.3f}.\n\n")
    if rows[0].get("classifier_fd_real_floor") is not None:
        notes += (f"Classifier acc / FD: the second, independent digits evaluator (a CNN trained on the held-in real "
                  f"digits with labels only; real-vs-real FD floor {rows[0]['classifier_fd_real_floor']:.2f}). Prompt "
                  "acc is the CLIP evaluator's zero-shot reading, which is lenient on broken strokes.\n\n")
    for r in rows:
        if r.get("evaluators_disagree"):
            notes += (f"**The two evaluators disagree on {r.get('model', 'this model')}**: CLIP prompt accuracy "
                      f"{r['prompt_accuracy']:.3f}, classifier accuracy {r['classifier_accuracy']:.3f}.\n\n")
    notes += ("ms/image: text encoder + denoiser + VAE decode, median of 3 timed runs after a warm-up, "
              f"batch {rows[0]['speed']['batch_size']}, {rows[0]['speed']['device']}, {rows[0]['speed']['dtype']}. "
              "NFE counts both CFG branches. Diversity ratio: against the first row when it is a teacher, else "
              "against the real images; speed-up: against the first row when it is a teacher.\n")
    (out / "report.md").write_text(f"# Evaluation\n\n{text}\n{notes}\n![samples](grid.png)\n")
    nrow = min(min(len(g) for g in grids), 10)
    spread = lambda g: g[torch.linspace(0, len(g) - 1, nrow).long()]
    save_grid(torch.cat([spread(g) for g in grids]), out / "grid.png", nrow=nrow, upscale=2)
    return out
