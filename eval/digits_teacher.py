"""Score the embedded digits teacher with the `digits` protocol, sampled through STOCK diffusers.

    python eval/digits_teacher.py --guidance 1.5 2 4 7.5 --steps 25 --n-per-digit 100 --out runs/teacher_eval

For each guidance scale: `StableDiffusionPipeline.from_pretrained(TEACHER)` with a `DDIMScheduler`
built from the teacher's scheduler config, N images per digit from the held-out caption templates,
scored by the embedded evaluator (FID vs held-out real, the real-vs-real floor, CLIP score, prompt
accuracy, diversity). Writes metrics.json, report.md and one grid PNG per guidance scale.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from diffdistill.config import EMBEDDED_TEACHER
from diffdistill.eval.evaluator import DigitsEvaluator
from diffdistill.eval.protocols import digits_protocol
from diffdistill.images import save_grid


def stock_sampler(path: str, steps: int, guidance: float):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def sample(prompts, generator):
        return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                    output_type="pt").images

    return sample


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(EMBEDDED_TEACHER))
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 4.0, 7.5])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--n-per-digit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/teacher_eval")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = DigitsEvaluator.load()
    rows = []
    for g in args.guidance:
        result, images = digits_protocol(stock_sampler(args.teacher, args.steps, g), evaluator,
                                         n_per_digit=args.n_per_digit, seed=args.seed, nfe=args.steps * (2 if g != 1 else 1))
        result.update(guidance=g, steps=args.steps, sampler="stock StableDiffusionPipeline + DDIMScheduler")
        rows.append(result)
        per_digit = images.view(10, args.n_per_digit, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:])
        save_grid(per_digit, out / f"grid_g{g:g}.png", nrow=10, upscale=2)
        print(json.dumps(result))
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))
    lines = ["| guidance | steps | images | FID | FID floor (real vs real) | FID / floor | prompt acc | CLIP score | "
             "diversity (real) | ms/image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['guidance']:g} | {r['steps']} | {r['num_images']} | {r['fid']:.4f} | {r['fid_real_floor']:.4f} | "
                     f"{r['fid_ratio_to_floor']:.2f} | {r['prompt_accuracy']:.3f} | {r['clip_score']:.3f} | "
                     f"{r['diversity']:.3f} ({r['diversity_real']:.3f}) | {r['ms_per_image']:.1f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
