"""``make demo`` / ``diffdistill demo``: the embedded default, end to end.

Until the evaluation harness wires training into it, the demo measures the baseline and says so:
the embedded digits teacher sampled with its full 25-step DDIM recipe and with a naive single DDIM
step (the quality a student has to recover), scored by the ``digits`` protocol. A student is
trained with ``diffdistill train --config configs/demo/regression_digits.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .images import save_grid

EMBEDDED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "teachers" / "digits-sd"


def run_demo(out_dir: str | Path = "runs/demo", n_per_digit: int = 30, guidance: float = 2.0) -> list[dict]:
    from .eval.protocols import digits_protocol
    from .pipeline import load_teacher
    from .sampling import generate

    if not (EMBEDDED_TEACHER / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded teacher is missing ({EMBEDDED_TEACHER}); "
                                "re-create it with trainers/train_teacher.py")
    print("diffdistill demo: this run measures the baseline a student is judged against: the embedded\n"
          "teacher at 25 DDIM steps vs a naive single step. It does not train a student yet; for that run\n"
          "  diffdistill train --config configs/demo/regression_digits.yaml   (one-step student, ~9 min)\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(str(EMBEDDED_TEACHER))
    rows = []
    for steps in (25, 1):
        def sample(prompts, generator, steps=steps):
            return generate(teacher, prompts, num_steps=steps, guidance=guidance, generator=generator)

        nfe = steps * (2 if guidance != 1.0 else 1)
        with torch.no_grad():
            result, images = digits_protocol(sample, n_per_digit=n_per_digit, nfe=nfe)
        result.update(model=f"teacher, {steps} DDIM step{'s' if steps > 1 else ''}", guidance=guidance)
        rows.append(result)
        grid = images.view(10, n_per_digit, *images.shape[1:])[:, :8].reshape(-1, *images.shape[1:])
        save_grid(grid, out / f"teacher_{steps}step.png", nrow=8, upscale=2)
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))
    header = f"{'model':<26} {'NFE':>4} {'FID':>8} {'FID/floor':>9} {'prompt acc':>10} {'CLIP':>6} {'diversity':>9} {'ms/img':>7}"
    print(header)
    for r in rows:
        print(f"{r['model']:<26} {r['nfe']:>4} {r['fid']:>8.4f} {r['fid_ratio_to_floor']:>9.2f} "
              f"{r['prompt_accuracy']:>10.3f} {r['clip_score']:>6.3f} {r['diversity']:>9.3f} {r['ms_per_image']:>7.1f}")
    print(f"\n{10 * n_per_digit} images per row; real-vs-real FID floor {rows[0]['fid_real_floor']:.4f} "
          f"(real diversity {rows[0]['diversity_real']:.3f}). Grids and metrics.json in {out}/")
    return rows
