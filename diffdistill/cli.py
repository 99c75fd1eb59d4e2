"""The ``diffdistill`` command line. Sub-commands land with the features they drive
(``train``, ``eval`` and ``export`` come with the engine, evaluation and export work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EMBEDDED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "teachers" / "digits-sd"


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


def _demo(args) -> int:
    """Until the distillation demo exists: sample the embedded teacher if it is there; say what runs."""
    if not EMBEDDED_TEACHER.joinpath("model_index.json").is_file():
        print("diffdistill demo: the embedded digits teacher (assets/teachers/digits-sd) is not in this checkout yet,\n"
              "and no distillation objective has landed, so there is nothing to distill. What exists today:\n"
              "  diffdistill sample <diffusers folder or hub id> \"a prompt\"   (teacher sampling)\n"
              "  make test                                                   (schedules, backbone, samplers)")
        return 0
    print("diffdistill demo: no distillation objective has landed yet; sampling the embedded teacher instead.")
    ns = argparse.Namespace(model=str(EMBEDDED_TEACHER), prompt=args.prompt, num_images=16, steps=25,
                            guidance=4.0, seed=0, out=args.out, upscale=2)
    return _sample(ns)


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

    p = sub.add_parser("demo", help="the embedded default, end to end")
    p.add_argument("--prompt", default="a handwritten digit 7")
    p.add_argument("--out", default="runs/demo/teacher_grid.png")
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
