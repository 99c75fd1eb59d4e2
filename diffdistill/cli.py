"""The ``diffdistill`` command line. Sub-commands land with the features they drive
(``eval`` comes with the evaluation work)."""

from __future__ import annotations

import argparse
import sys


def _sample(args) -> int:
    import torch

    from .images import save_grid
    from .pipeline import load_teacher
    from .sampling import generate

    teacher = load_teacher(args.model)
    prompts = [args.prompt] * args.num_images
    images = generate(teacher, prompts, num_steps=args.steps, guidance=args.guidance,
                      generator=torch.Generator().manual_seed(args.seed), progress=True)
    out = save_grid(images, args.out, upscale=args.upscale)
    print(f"wrote {len(prompts)} image(s) of {args.prompt!r} ({args.steps} steps, guidance {args.guidance}) to {out}")
    return 0


def _train(args) -> int:
    from .config import load_config
    from .trainer import train

    config = load_config(args.config, args.overrides)  # every config error surfaces before a model loads
    run_dir = train(config)
    print(f"run folder: {run_dir}")
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

    run_demo(args.out, n_per_digit=args.n_per_digit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample a diffusers text-to-image model (folder or hub id)")
    p.add_argument("model", help="a diffusers pipeline folder or hub id")
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale, diffusers convention (1 = none)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscaling of the saved PNG")
    p.add_argument("--out", default="sample.png")
    p.set_defaults(func=_sample)

    p = sub.add_parser("train", help="distill a teacher into a student (see configs/)")
    p.add_argument("--config", required=True, help="a YAML config (configs/<method>/<backbone>.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    p.set_defaults(func=_train)

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
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "num_images"):
        if getattr(args, name, 1) < 1:
            print(f"diffdistill: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
