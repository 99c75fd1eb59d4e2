"""How much one later step of a multi-step student changes the sample it is given, next to the teacher.

A multi-step student (LCM / DMD2 sampler) predicts ``x0``, re-noises it to its next time ``t`` with fresh
noise and predicts again. This script takes the student's first-step samples ``x0`` (``--per-digit`` per
digit prompt "a handwritten digit D": it is meant for students of the embedded digits teacher), noises
them to ``t`` and prints the RMS (latent space) of

* ``x0`` itself,
* the student's change: ``student(x_t, t) - x0``,
* the teacher's change: its own clean estimate at ``t`` (CFG ``--guidance``) minus ``x0``,
* the difference between the two estimates.

A student whose change is far above the teacher's redraws what it is given; one near it does what the teacher's
one-step denoising from the same input does (which, at moderate noise on small latents, already loses detail)::

    python eval/renoise_change.py runs/demo/dmd2_4step/final --t 0.75 --base assets/teachers/digits-sd
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", help="an exported full or LoRA student (diffdistill export, or a run's final/)")
    ap.add_argument("--base", default=None, help="the teacher (default: the base recorded in the export; full "
                    "students need it)")
    ap.add_argument("--t", type=float, default=None, help="the time to re-noise to (default: the student's second)")
    ap.add_argument("--guidance", type=float, default=1.5, help="the teacher's CFG scale (diffusers convention)")
    ap.add_argument("--per-digit", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from diffdistill.export import load_student

    teacher, student = load_student(args.student, base=args.base)
    if args.t is None and len(student.timesteps) < 2:
        raise SystemExit(f"{args.student} is a one-step student: give --t")
    t = args.t if args.t is not None else student.timesteps[1]
    if not 0.0 < t < 1.0:
        raise SystemExit(f"--t must lie in (0, 1), got {t}")
    g = torch.Generator().manual_seed(args.seed)
    prompts = [f"a handwritten digit {d}" for d in range(10)] * args.per_digit
    cond, sched = teacher.encode_prompt(prompts), teacher.backbone.schedule
    rms = lambda a: a.float().pow(2).mean().sqrt().item()
    with torch.no_grad():
        z = torch.randn((len(prompts), *teacher.latent_shape), generator=g).to(teacher.device, teacher.dtype)
        x0 = student(z, student.timesteps[0], cond, out="x0")
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), t)
        ours = student(x_t, t, cond, out="x0")
        with teacher.backbone.adapter(None):
            theirs = teacher.backbone.cfg(x_t, t, cond, teacher.empty_cond(len(prompts)), args.guidance)
    print(f"t = {t} ({len(prompts)} samples): RMS of x0 {rms(x0):.3f}, student's change {rms(ours - x0):.3f}, "
          f"teacher's change (CFG {args.guidance}) {rms(theirs - x0):.3f}, student - teacher {rms(ours - theirs):.3f}")


if __name__ == "__main__":
    main()
