"""The ``diffdistill`` command line. Sub-commands land with the features they drive
(``eval`` comes with the evaluation work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sample(args) -> int:
    import torch

    from .eval.harness import EvalInputError, recipe, resolve_models, sampler
    from .images import save_grid

    try:
        [model] = resolve_models(args.model, base=args.base, steps=args.steps, guidance=args.guidance,
                                 resolution=args.resolution)
        if args.nasa_scale < 0:
            raise ValueError(f"--nasa-scale must be >= 0, got {args.nasa_scale}")
        sample = sampler(model, negative_prompt=args.negative_prompt, nasa_scale=args.nasa_scale)
    except (EvalInputError, ValueError, OSError) as err:
        print(f"diffdistill sample: {err}", file=sys.stderr)
        return 2
    _, steps, guidance = recipe(model)
    images = sample([args.prompt] * args.num_images, torch.Generator().manual_seed(args.seed))
    out = save_grid(images, args.out, upscale=args.upscale)
    negative = "" if args.negative_prompt is None else f", negative prompt {args.negative_prompt!r}"
    print(f"wrote {args.num_images} image(s) of {args.prompt!r} ({steps} step(s), guidance {guidance}{negative}) to {out}")
    return 0


def _eval(args) -> int:
    from .eval.harness import (
        EvalInputError,
        check_protocol_inputs,
        evaluate,
        resolve_models,
        table,
        write_report,
    )

    try:  # everything that can be checked without loading a model
        check_protocol_inputs(args.protocol, args.captions, args.images, args.num_images)
        models = resolve_models(args.model, base=args.base, checkpoint=args.checkpoint,
                                all_checkpoints=args.all_checkpoints, steps=args.steps, guidance=args.guidance,
                                resolution=args.resolution, student_steps=args.student_steps)
    except (EvalInputError, ValueError, OSError, KeyError) as err:
        print(f"diffdistill eval: {err}", file=sys.stderr)
        return 2
    rows, grids = [], []
    for model in models:
        print(f"evaluating {model.label} ({args.protocol})")
        result, images = evaluate(model, args.protocol, num_images=args.num_images, seed=args.seed,
                                  captions=args.captions, images=args.images)
        rows.append(result)
        grids.append(images)
    out = args.out or str(Path("runs") / "eval" / Path(args.model).name)
    write_report(out, rows, grids, args.protocol)
    print(table(rows))
    print(f"metrics.json, report.md and grid.png in {out}/")
    return 0


def _train(args) -> int:
    from .config import load_config
    from .trainer import train

    config = load_config(args.config, args.overrides)  # every config error surfaces before a model loads
    run_dir = train(config)
    print(f"run folder: {run_dir}")
    return 0


def _plan(args) -> int:
    from .config import ConfigError, load_config
    from .pipeline import TeacherLoadError
    from .plan import format_plan, plan

    if args.gpus < 1 or (args.gpu_memory is not None and args.gpu_memory <= 0):
        print("diffdistill plan: --gpus must be at least 1 and --gpu-memory positive", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
        result = plan(config, gpus=args.gpus, gpu_memory_gb=args.gpu_memory)
    except (ConfigError, TeacherLoadError, FileNotFoundError) as err:
        print(f"diffdistill plan: {err}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 0


def _export(args) -> int:
    from .export import ExportError, export_run, read_recipe

    try:
        out = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    except (ExportError, FileExistsError) as err:
        print(f"diffdistill export: {err}", file=sys.stderr)
        return 2
    recipe = read_recipe(out)
    print(f"wrote the {recipe['kind']} student (step {recipe['step']}, {recipe['num_inference_steps']} step(s), "
          f"guidance {recipe['guidance']}) to {out}; usage in {out / 'README.md'}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, n_per_digit=args.n_per_digit, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample a teacher (diffusers folder / hub id) or an exported student")
    p.add_argument("model", help="a diffusers pipeline folder or hub id, an exported student, or a run folder")
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, default=None, help="teachers: ODE steps (default: the pipeline class's, "
                   "SD 25, SD3 / FLUX 28)")
    p.add_argument("--guidance", type=float, default=None,
                   help="teachers: CFG scale, diffusers convention (1 = none; default: the pipeline class's, SD 7.5, "
                   "SDXL 5, SD3 7, FLUX 3.5 -- embedded, for FLUX.1-dev)")
    p.add_argument("--resolution", type=int, default=None,
                   help="teachers: image side in pixels (default: the pipeline's native size)")
    p.add_argument("--base", default=None, help="LoRA students: the base pipeline (default: the one recorded)")
    p.add_argument("--negative-prompt", default=None,
                   help="teachers: the CFG negative prompt; students: steered away from through cross-attention "
                   "(SNOOPI's NASA)")
    p.add_argument("--nasa-scale", type=float, default=0.1,
                   help="students with --negative-prompt: NASA's weight alpha (SNOOPI: 0.1 SD1.5, 0.2 SD2.1)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of the saved PNG")
    p.add_argument("--out", default="sample.png")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="score a teacher, an exported student or a run under a named protocol")
    p.add_argument("model", help="a diffusers folder or hub id, an exported student (full or LoRA), or a run folder")
    p.add_argument("--protocol", default="digits", help="digits | coco2014-30k-256 | coco2014-10k-512-clipg | "
                   "coco2017-5k")
    p.add_argument("--num-images", type=int, default=None, help="default: the protocol's")
    p.add_argument("--steps", type=int, default=None, help="teachers only (students use their trained recipe)")
    p.add_argument("--guidance", type=float, default=None, help="teachers only; diffusers convention")
    p.add_argument("--resolution", type=int, default=None, help="teachers only: image side in pixels")
    p.add_argument("--student-steps", type=int, default=None, help="students only: sample with the first N of the "
                   "trained timesteps (a multi-step student's result after N steps)")
    p.add_argument("--base", default=None, help="LoRA students: the base pipeline (default: the one recorded)")
    p.add_argument("--checkpoint", default=None, help="run folders: a checkpoint (step-NNNNNN or a step)")
    p.add_argument("--all-checkpoints", action="store_true", help="run folders: every complete checkpoint")
    p.add_argument("--captions", default=None, help="COCO protocols: the captions_*.json annotations file")
    p.add_argument("--images", default=None, help="COCO protocols: the matching image folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="report folder (default: runs/eval/<model name>)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("train", help="distill a teacher into a student (see configs/)")
    p.add_argument("--config", required=True, help="a YAML config (configs/<method>/<backbone>.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.set_defaults(func=_train)

    p = sub.add_parser("plan", help="a run's memory per network and per process, at real architecture, without "
                       "downloading weights")
    p.add_argument("config", help="a YAML config (configs/<method>/<backbone>.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.kind=lora")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run is launched on")
    p.add_argument("--gpu-memory", type=float, default=None, help="memory of one GPU in GB, to compare against")
    p.set_defaults(func=_plan)

    p = sub.add_parser("export", help="write a run's student (EMA weights) as a diffusers folder or LoRA")
    p.add_argument("run_dir", help="a training run folder (train.output_dir)")
    p.add_argument("--out", default=None, help="destination folder (default: RUN_DIR/final)")
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint folder or name such as step-000600 (default: the newest complete one)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR even if it is a non-empty folder that export did not create")
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="the embedded default, end to end")
    p.add_argument("--out", default="runs/demo", help="folder for grids and metrics.json")
    p.add_argument("--n-per-digit", type=int, default=30)
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo's training config")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "num_images", "student_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"diffdistill: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
