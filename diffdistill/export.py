"""Export a student so that stock diffusers samples it with its trained recipe, and load exports back.

What gets written (safetensors only, never pickle):

* ``full`` student: a complete diffusers pipeline folder -- the teacher's text encoder, tokenizer and
  VAE beside the student's denoiser -- that ``DiffusionPipeline.from_pretrained(out)`` loads;
* ``lora`` student: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(out)`` on the
  base (teacher) pipeline, with the adapter's rank / alpha in the file's metadata;
* both: ``scheduler/scheduler_config.json``, a model card ``README.md`` and ``diffdistill.json`` (the
  recipe: kind, continuous timesteps, guidance, base, objective, step), which :func:`load_student` reads.

The scheduler is diffusers' own ``LCMScheduler``. Its step is our student sampler
(:func:`~diffdistill.sampling.sample_student`): predict x0, then re-noise it to the next timestep with
fresh noise from the pipeline's generator -- drawn in the same order (initial latents, then one draw
per intermediate step), so a fixed seed gives the same images. Two settings make it exact:

* ``original_inference_steps`` is chosen so that ``set_timesteps(K)`` gives exactly the trained
  timesteps (e.g. 1000 for the uniform trailing grids ``[999]``, ``[999, 749, 499, 249]``);
* ``timestep_scaling = 1e6`` turns LCM's consistency boundary scalings into ``c_skip <= 2.5e-13``,
  ``c_out = 1`` at every timestep >= 1, so the scheduler's output is the network's x0 prediction.

Flow students (SD3) use ``FlowMatchEulerDiscreteScheduler(shift=1)`` instead (see :func:`_flow_recipe`): with
``stochastic_sampling=True`` its step is the same re-noising rule (``student.gamma = 1``); without, it is the
deterministic Euler step ``x + (sigma' - sigma) v`` down to sigma 0, which is our deterministic DDIM step on the
flow schedule (``gamma = 0``, PCM's sampler). No stock flow scheduler runs ``0 < gamma < 1`` (refused). Their
LoRA files hold ``transformer.`` keys.

Timesteps that no ``original_inference_steps`` reproduces (non-uniform grids) still sample exactly
through the stock scheduler when the call passes ``timesteps=[...]``; the export then warns
(:class:`RecipeWarning`) and the model card says so. Fractional diffusers timesteps, or timestep 0,
cannot be reproduced by any stock scheduler and are refused (:class:`ExportError`).

Folders are written atomically: assembled in a hidden temporary folder beside ``out``, then renamed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import lora
from .lora import LORA_WEIGHT_NAME

RECIPE_FILE = "diffdistill.json"
TIMESTEP_SCALING = 1.0e6
_FORMAT = 1


class ExportError(ValueError):
    """A student or folder that cannot be exported or loaded as asked."""


class RecipeWarning(UserWarning):
    """The export is exact only when the diffusers call passes the trained ``timesteps=`` explicitly."""


# -- the sampling recipe as a stock scheduler config ---------------------------------------------------
def _diffusers_timesteps(student) -> list[int]:
    """The student's times as integer diffusers timesteps; refuses what no stock scheduler can run."""
    from .schedule import VPSchedule

    schedule = student.backbone.schedule
    if not isinstance(schedule, VPSchedule):
        raise ExportError("export supports VP (Stable Diffusion-style) students; this one has "
                          f"{type(schedule).__name__}")
    ks = schedule.to_timestep(torch.tensor(student.timesteps, dtype=torch.float64)).tolist()
    if any(abs(k - round(k)) > 1e-6 for k in ks):
        raise ExportError(f"student times {student.timesteps} map to fractional diffusers timesteps {ks}; stock "
                          "schedulers run integer timesteps only, so no export can reproduce this recipe")
    ks = [round(k) for k in ks]
    if min(ks) < 1:
        raise ExportError(f"student times {student.timesteps} include diffusers timestep 0, where LCMScheduler's "
                          "boundary condition returns the input unchanged (c_skip = 1); no stock scheduler fits")
    return ks


def _original_steps(scheduler, ks: list[int]) -> int | None:
    """The largest ``original_inference_steps`` for which ``set_timesteps(len(ks))`` gives ``ks`` (None if none)."""
    # set through the config, as a pipeline call does: TCDScheduler.set_timesteps treats an explicit
    # original_inference_steps argument differently from the configured value
    for original in range(scheduler.config.num_train_timesteps, len(ks) - 1, -1):
        scheduler.register_to_config(original_inference_steps=original)
        scheduler.set_timesteps(len(ks))
        if scheduler.timesteps.tolist() == ks:
            return original
    return None


def _verify_scheduler(scheduler, student, ks: list[int]) -> None:
    """The scheduler's noise levels are the student's; an LCMScheduler's step returns the model's x0 unchanged."""
    ours = student.backbone.schedule.alphas_cumprod
    gap = (scheduler.alphas_cumprod.double() - ours).abs().max().item()
    if gap > 1e-6:
        raise ExportError(f"the scheduler's alphas_cumprod differ from the student's schedule by {gap:.2e}")
    if not hasattr(scheduler, "get_scalings_for_boundary_condition_discrete"):
        return
    for k in ks:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(k))
        if float(c_skip) > 1e-9 or abs(float(c_out) - 1.0) > 1e-6:
            raise ExportError(f"LCM scalings at timestep {k}: c_skip={float(c_skip)}, c_out={float(c_out)}")


def _is_flow(student) -> bool:
    from .schedule import FlowSchedule

    return isinstance(student.backbone.schedule, FlowSchedule)


def scheduler_class(student) -> str:
    """``LCMScheduler`` for the re-noising sampler (``gamma = 1``), ``TCDScheduler`` (``eta = gamma``) otherwise;
    ``FlowMatchEulerDiscreteScheduler`` for flow students (``stochastic_sampling`` for ``gamma = 1``, the plain
    Euler step for ``gamma = 0``)."""
    if _is_flow(student):
        return "FlowMatchEulerDiscreteScheduler"
    return "LCMScheduler" if student.gamma == 1.0 else "TCDScheduler"


def _flow_recipe(teacher, student) -> tuple[dict, list[float], bool]:
    """A flow student's sampler as ``FlowMatchEulerDiscreteScheduler``. ``gamma = 1`` (``stochastic_sampling=True``):
    each step takes ``x0 = x_t - sigma * v`` and moves to ``(1 - sigma') x0 + sigma' noise`` with fresh noise -- our
    :func:`~diffdistill.sampling.sample_student` at ``gamma = 1``, drawing in the same order (SD3's pipeline does
    not hand its generator to the step: that noise comes from torch's global RNG). ``gamma = 0``
    (``stochastic_sampling=False``): the Euler step ``x_t + (sigma' - sigma) v`` = ``(1 - sigma') x0 + sigma' eps``,
    our deterministic DDIM step on the flow schedule, the last one landing on sigma 0 (x0) as ours does (PCM's
    sampler). ``shift = 1`` makes the scheduler's sigmas the student's times ``t``; for a uniform grid ending at
    ``t_K > 0``, ``shift_terminal = t_K`` stretches the default ``linspace`` onto it exactly; other grids (e.g.
    the shifted phase tops of a PCM student) need the call's ``sigmas=``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if student.gamma not in (0.0, 1.0):
        raise ExportError(f"student.gamma {student.gamma}: FlowMatchEulerDiscreteScheduler steps either with full "
                          "re-noising (stochastic_sampling, gamma = 1) or deterministically (gamma = 0); no stock flow "
                          "scheduler has TCD's partial re-noising (0 < gamma < 1), so no export reproduces this recipe")
    ts = [float(t) for t in student.timesteps]
    n = student.backbone.schedule.num_train_timesteps
    config = {"num_train_timesteps": n, "shift": 1.0, "stochastic_sampling": student.gamma == 1.0}
    if len(ts) > 1 and ts[-1] > 0:
        config["shift_terminal"] = ts[-1]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = teacher.family.sigma_kwargs(teacher, len(ts))  # as the pipeline calls it (FLUX passes sigmas)
    scheduler.set_timesteps(None if "sigmas" in kwargs else len(ts), **kwargs)
    default_call = torch.allclose(scheduler.sigmas[:-1].double(), torch.tensor(ts, dtype=torch.float64), atol=1e-6)
    ks = [t * n for t in ts]
    if not default_call:
        warnings.warn(f"no FlowMatchEulerDiscreteScheduler setting reproduces the student's times {ts} from "
                      f"num_inference_steps alone; the export samples exactly only when called with sigmas={ts} "
                      "(the model card says so)", RecipeWarning, stacklevel=3)
    return dict(scheduler.config), ks, default_call


def scheduler_recipe(teacher, student) -> tuple[dict, list[int], bool]:
    """``(scheduler config, diffusers timesteps, default_call)`` for ``student``. ``default_call``: a plain
    ``pipe(prompt, num_inference_steps=K)`` runs exactly the trained recipe; otherwise the call must pass
    ``timesteps=`` (a :class:`RecipeWarning` is issued). A ``0 < gamma < 1`` call also passes ``eta=gamma``."""
    import diffusers

    from .pipeline import PREDICTION_NAMES

    if _is_flow(student):
        return _flow_recipe(teacher, student)
    klass = getattr(diffusers, scheduler_class(student))
    ks = _diffusers_timesteps(student)
    accepted = inspect.signature(klass.__init__).parameters
    config = {k: v for k, v in teacher.scheduler_config.items() if k in accepted and not k.startswith("_")}
    config.update(prediction_type={v: k for k, v in PREDICTION_NAMES.items()}[student.backbone.pred_type],
                  clip_sample=False, thresholding=False, steps_offset=1)
    if "timestep_scaling" in accepted:
        config["timestep_scaling"] = TIMESTEP_SCALING
    scheduler = klass.from_config(config)
    original = _original_steps(scheduler, ks)
    default_call = original is not None
    config["original_inference_steps"] = original or scheduler.config.num_train_timesteps
    scheduler = klass.from_config(config)
    _verify_scheduler(scheduler, student, ks)
    if not default_call:
        warnings.warn(f"no {klass.__name__} setting reproduces the student's timesteps {ks} from num_inference_steps "
                      f"alone; the export samples exactly only when called with timesteps={ks} (the model card "
                      "says so)", RecipeWarning, stacklevel=3)
    return dict(scheduler.config), ks, default_call


# -- writing ---------------------------------------------------------------------------------------------
def _owned(folder: Path) -> bool:
    """Whether ``folder`` holds only what an earlier export wrote (its recipe lists every entry)."""
    try:
        files = set(json.loads((folder / RECIPE_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(p.name in files for p in folder.iterdir())


def _check_target(out: Path, overwrite: bool, protected: list[Path]) -> None:
    resolved = out.resolve()
    for path in protected:  # never replace (a folder holding) the run or the teacher we read from
        if resolved == path.resolve() or resolved in path.resolve().parents:
            raise ExportError(f"refusing to export into {out}: it holds {path}, which the export reads")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and (not any(out.iterdir()) or _owned(out)):
        return
    if not overwrite:
        what = "a file" if not out.is_dir() else "a non-empty folder that diffdistill export did not create"
        raise FileExistsError(f"{out} is {what}; pass overwrite=True (--overwrite) to replace it entirely")


@contextlib.contextmanager
def _atomic_folder(out: Path, overwrite: bool, protected: list[Path]):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (rename), on error it is removed."""
    _check_target(out, overwrite, protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """What a plain ``mkdir`` / ``open`` would give (``mkdtemp`` and some writers use owner-only modes)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _write_full(folder: Path, teacher, student, scheduler_config: dict) -> None:
    import diffusers

    pipeline_class = getattr(diffusers, teacher.pipeline_class)
    pipe = pipeline_class(vae=teacher.vae, **{teacher.family.denoiser[1]: student.backbone.denoiser},
                          scheduler=getattr(diffusers, scheduler_class(student)).from_config(scheduler_config),
                          **teacher.family.pipeline_modules(teacher))
    pipe.save_pretrained(str(folder), safe_serialization=True)


def _write_lora(folder: Path, teacher, student, scheduler_config: dict) -> None:
    import diffusers

    lora.save_lora(student.backbone.denoiser, student.adapter, folder, prefix=teacher.family.denoiser[1])
    getattr(diffusers, scheduler_class(student)).from_config(scheduler_config).save_pretrained(str(folder / "scheduler"))


def _recipe(teacher, student, config, step, ks: list[int], scheduler_config: dict, default_call: bool) -> dict:
    """The content of ``diffdistill.json`` (``files`` is added once the folder is written)."""
    recipe = {"format": _FORMAT, "kind": "full" if student.adapter is None else "lora",
              "timesteps": [float(t) for t in student.timesteps], "diffusers_timesteps": ks,
              "num_inference_steps": len(ks), "guidance": float(student.guidance), "gamma": float(student.gamma),
              "base": str(teacher.source), "vae": teacher.vae_source, "base_pipeline": teacher.pipeline_class,
              "base_signature": teacher.backbone.signature(), "resolution": teacher.image_size,
              "guidance_embedded": bool(student.backbone.embeds_guidance),
              "objective": config.objective.name if config is not None else None, "step": step,
              "prediction_type": student.backbone.pred_type, "dtype": str(teacher.dtype).replace("torch.", ""),
              "scheduler": {"class": scheduler_class(student), "default_call_reproduces": default_call,
                            "original_inference_steps": scheduler_config.get("original_inference_steps"),
                            "timestep_scaling": scheduler_config.get("timestep_scaling")}}
    if student.adapter is not None:
        peft_config = student.backbone.denoiser.peft_config[student.adapter]
        recipe["lora"] = {"weights": LORA_WEIGHT_NAME, "rank": peft_config.r, "alpha": peft_config.lora_alpha}
    return recipe


def export_student(teacher, student, out, *, config=None, overwrite: bool = False, eval_table=None,
                   step: int | None = None) -> Path:
    """Write ``student`` (the weights it holds now: copy EMA weights in first) to the folder ``out``.

    ``config``: the run's :class:`~diffdistill.config.Config` (for the card and recipe); ``eval_table``:
    Markdown text or ``{row: {metric: value}}`` for the card; ``step``: the training step. A non-empty
    ``out`` that an earlier export did not write is refused unless ``overwrite`` (then replaced whole).
    """
    from .model_card import model_card

    out = Path(out)
    scheduler_config, ks, default_call = scheduler_recipe(teacher, student)
    recipe = _recipe(teacher, student, config, step, ks, scheduler_config, default_call)
    protected = [Path(teacher.source)] if Path(teacher.source).exists() else []
    with _atomic_folder(out, overwrite, protected) as tmp:
        if student.adapter is None:
            _write_full(tmp, teacher, student, scheduler_config)
        else:
            _write_lora(tmp, teacher, student, scheduler_config)
        (tmp / "README.md").write_text(model_card(recipe, str(out), config=config, eval_table=eval_table))
        recipe["files"] = sorted([p.name for p in tmp.iterdir()] + [RECIPE_FILE])
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    return out


# -- loading runs and exports back into our objects -------------------------------------------------------
def _checkpoint_folder(run_dir: Path, checkpoint) -> Path:
    if checkpoint is None:
        found = ckpt.complete_checkpoints(run_dir)
        if not found:
            raise ExportError(f"{run_dir} holds no complete checkpoint (checkpoints/step-NNNNNN/{ckpt.MARKER})")
        return found[0]
    if isinstance(checkpoint, str) and checkpoint.isdigit():  # the CLI's "--checkpoint 750"
        checkpoint = int(checkpoint)
    folder = Path(checkpoint) if not isinstance(checkpoint, int) else Path(f"step-{checkpoint:06d}")
    if not folder.is_dir():
        folder = ckpt.checkpoints_dir(run_dir) / folder
    if not (folder / ckpt.MARKER).is_file():
        raise ExportError(f"{folder} is not a complete checkpoint (no {ckpt.MARKER} marker)")
    return folder


def load_run_student(run_dir, checkpoint=None, ema: bool = True, *, device="cpu"):
    """``(teacher, student, info)`` of a training run, without a Trainer (no optimizers): the config the
    checkpoint was written with, its teacher, and the student with the checkpoint's EMA (or live)
    weights. ``checkpoint``: a checkpoint folder, its name (``step-000600``), a step, or None (newest
    complete). ``info``: step, checkpoint, ema, objective, config."""
    from .config import load_config
    from .pipeline import load_teacher
    from .student import build_student
    from .trainer import DTYPES

    run_dir = Path(run_dir)
    folder = _checkpoint_folder(run_dir, checkpoint)
    config_file = folder / "config.yaml" if (folder / "config.yaml").is_file() else run_dir / "config.yaml"
    config = load_config(config_file)
    tensors, meta = ckpt.load_state(folder / ckpt.STATE_FILE)
    teacher = load_teacher(config.teacher.path, dtype=DTYPES[config.teacher.dtype], device=device,
                           resolution=config.teacher.resolution, vae=config.teacher.vae)
    student = build_student(teacher, config.student)
    prefix = "ema" if ema else "param.student"
    params = student.named_parameters_to_train()
    missing = [k for k in params if f"{prefix}.{k}" not in tensors]
    if missing:
        raise ExportError(f"{folder} lacks {len(missing)} '{prefix}.' student tensors (e.g. {missing[:2]}); "
                          "it does not match the student its config builds")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"{prefix}.{k}"])
            p.requires_grad_(False)
    student.backbone.denoiser.eval()
    info = {"step": meta["step"], "checkpoint": str(folder), "ema": ema, "objective": config.objective.name,
            "config": config}
    return teacher, student, info


def read_recipe(folder) -> dict:
    """``diffdistill.json`` of an exported folder, with a clear error for anything else."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise ExportError(f"{folder} is not a diffdistill export (no {RECIPE_FILE}); for a plain diffusers "
                          "pipeline use load_teacher")
    recipe = json.loads(path.read_text())
    if recipe.get("format") != _FORMAT or recipe.get("kind") not in ("full", "lora"):
        raise ExportError(f"{path}: unknown recipe format {recipe.get('format')!r} / kind {recipe.get('kind')!r}")
    return recipe


def _check_fits(backbone, other, what: str, against: str, context: str) -> None:
    """:meth:`DiffusionBackbone.check_compatible`, raised as :class:`ExportError` after ``context``."""
    try:
        backbone.check_compatible(other, what, against)
    except ValueError as err:
        raise ExportError(f"{context}: {err}") from None


def exported_denoiser(folder, teacher):
    """The denoiser of a full student's export ``folder``, loaded in the class and dtype of ``teacher``'s."""
    import diffusers

    from .pipeline import read_model_index

    folder = Path(folder)
    klass, subfolder = teacher.family.denoiser
    if not (folder / subfolder).is_dir():
        own = read_model_index(str(folder)).get("_class_name")
        raise ExportError(f"student {folder} ({own}) has no {subfolder}/, the denoiser of the teacher "
                          f"{teacher.source} ({teacher.pipeline_class}): they come from different backbones")
    return getattr(diffusers, klass).from_pretrained(str(folder), subfolder=subfolder, use_safetensors=True,
                                                     torch_dtype=teacher.dtype)


def load_student(folder, base=None, *, device="cpu"):
    """``(teacher, student)`` from an exported folder, with the recipe (timesteps, guidance) restored.

    LoRA: the adapter is attached as ``student`` to ``base`` (default: the base recorded at export).
    Full: with ``base``, the teacher is loaded from it; without, the teacher is the folder's own text
    encoder, tokenizer and VAE around the *student's* denoiser -- right for sampling the student, not a
    teacher to compare against.
    """
    from .backbone import DiffusionBackbone
    from .pipeline import load_teacher, read_model_index
    from .student import STUDENT_ADAPTER, Student

    folder = Path(folder)
    recipe = read_recipe(folder)
    if recipe["kind"] == "lora":
        teacher = load_teacher(base or recipe["base"], device=device, resolution=recipe.get("resolution"),
                               vae=recipe.get("vae") if base is None else None)
        if "base_signature" in recipe:  # older exports lack it; load_lora's shape check still applies
            _check_fits(teacher.backbone, recipe["base_signature"], "base", "LoRA's training base",
                        f"LoRA {folder} (trained on a {recipe.get('base_pipeline')}) cannot load onto {teacher.source}")
        lora.load_lora(teacher.backbone.denoiser, STUDENT_ADAPTER, folder / recipe["lora"]["weights"],
                       prefix=teacher.family.denoiser[1])
        teacher.backbone.denoiser.requires_grad_(False)
        return teacher, Student(teacher.backbone, STUDENT_ADAPTER, recipe["timesteps"], recipe["guidance"],
                                recipe.get("gamma", 1.0))
    if base is None:
        teacher = load_teacher(str(folder), device=device, resolution=recipe.get("resolution"))
        return teacher, Student(teacher.backbone, None, recipe["timesteps"], recipe["guidance"],
                                recipe.get("gamma", 1.0))
    teacher = load_teacher(base, device=device, resolution=recipe.get("resolution"))
    own = read_model_index(str(folder)).get("_class_name")
    denoiser = exported_denoiser(folder, teacher)
    denoiser.requires_grad_(False).eval().to(device)
    backbone = DiffusionBackbone(denoiser, teacher.backbone.schedule, teacher.backbone.pred_type)
    _check_fits(backbone, teacher.backbone, "student", "teacher",
                f"student {folder} ({own}) does not fit the teacher {teacher.source} ({teacher.pipeline_class})")
    return teacher, Student(backbone, None, recipe["timesteps"], recipe["guidance"],
                                recipe.get("gamma", 1.0))


def export_run(run_dir, out=None, *, checkpoint=None, overwrite: bool = False, eval_table=None) -> Path:
    """Export a run's student (EMA weights of the newest complete checkpoint, or ``checkpoint``) to
    ``out`` (default ``RUN_DIR/final``); see :func:`export_student`."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "final"
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise ExportError(f"refusing to export into {out}: it holds the run folder {run_dir}")
    teacher, student, info = load_run_student(run_dir, checkpoint, ema=True)
    return export_student(teacher, student, out, config=info["config"], overwrite=overwrite,
                          eval_table=eval_table, step=info["step"])

