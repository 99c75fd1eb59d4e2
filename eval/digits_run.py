"""Score a training run's student (EMA weights of its newest complete checkpoint) with the `digits`
protocol, beside nothing else: until `diffdistill eval` lands this is how a run is measured.

    python eval/digits_run.py runs/demo/regression --n-per-digit 100
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from diffdistill import checkpoint as ckpt
from diffdistill.config import load_config
from diffdistill.eval.protocols import digits_protocol
from diffdistill.images import save_grid
from diffdistill.trainer import Trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--n-per-digit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run = Path(args.run_dir)
    found = ckpt.complete_checkpoints(run)
    if not found:
        raise SystemExit(f"{run} holds no complete checkpoint")
    trainer = Trainer(load_config(run / "config.yaml"))
    trainer._restore(*ckpt.load_state(found[0] / ckpt.STATE_FILE))
    trainer.ema.copy_to(trainer.groups["student"])
    teacher, student = trainer.teacher, trainer.student

    @torch.no_grad()
    def sample(prompts, generator):
        noise = torch.randn((len(prompts), *teacher.latent_shape), generator=generator)
        uncond = teacher.empty_cond(len(prompts)) if student.guidance != 1.0 else None
        latents = student.generate(noise, teacher.encode_prompt(list(prompts)), uncond, generator=generator)
        return (teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)

    nfe = len(student.timesteps) * (2 if student.guidance != 1.0 else 1)
    result, images = digits_protocol(sample, n_per_digit=args.n_per_digit, seed=args.seed, nfe=nfe)
    result.update(checkpoint=found[0].name, student_timesteps=student.timesteps)
    out = run / "eval"
    out.mkdir(exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    grid = images.view(10, args.n_per_digit, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
    save_grid(grid, out / "grid.png", nrow=10, upscale=2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
