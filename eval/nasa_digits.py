"""Does a negative prompt steer a one-step digits student away from a concept? SNOOPI's NASA, measured.

For each digit ``d`` the student's *typical confusion* ``c(d)`` is the other digit whose class embedding
(the embedded evaluator's, mean over the held-out caption wordings) its own samples of ``d`` resemble
most. The script samples the protocol's prompts for ``d`` with the negative prompt "a handwritten digit
c(d)" at each NASA weight (same seeds, so the images are paired), and reports per weight: the concept's
CLIP score (cosine of the images to ``c(d)``'s class embedding; lower = steered away), the prompt's CLIP
score, prompt accuracy, the paired change of the concept score (mean and standard error over images) and
the share of images whose concept score fell. Writes ``nasa.json`` and
``grid.png`` (one row per weight, the same seeds across rows).

    python eval/nasa_digits.py runs/demo/snoopi --scales 0.25 0.5 1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def confusions(sims: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """For each digit, the other class with the highest mean similarity among that digit's images."""
    out = []
    for d in range(sims.shape[1]):
        mean = sims[labels == d].mean(0).clone()
        mean[d] = -float("inf")
        out.append(int(mean.argmax()))
    return out


def measure(model_spec: str, scales: list[float], n_per_digit: int, seed: int, out: Path) -> dict:
    from diffdistill.data import TRAIN_TEMPLATES, caption, eval_prompts
    from diffdistill.eval.evaluator import DigitsEvaluator
    from diffdistill.eval.harness import resolve_models, sampler
    from diffdistill.images import save_grid

    [model] = resolve_models(model_spec)
    _, student = model.load()
    if student is None:
        raise SystemExit(f"{model_spec} is a teacher; NASA is for students (a teacher takes negative prompts in CFG)")
    evaluator = DigitsEvaluator.load()
    classes = evaluator.class_embeddings()  # (10, D) unit
    prompts, labels = eval_prompts(n_per_digit)
    labels = torch.tensor(labels)

    def run(negatives: dict[int, str] | None, scale: float) -> torch.Tensor:
        images = []
        for d in range(10):  # one negative prompt per digit: sample each digit's prompts as a batch
            idx = (labels == d).nonzero().flatten().tolist()
            neg = None if negatives is None else negatives[d]
            sample = sampler(model, negative_prompt=neg, nasa_scale=scale)
            images.append(sample([prompts[i] for i in idx], torch.Generator().manual_seed(seed + d)))
        return torch.cat(images)

    def scores(images: torch.Tensor, concept: list[int]) -> dict:
        x = images * 2 - 1
        feats = evaluator.image_features(x, normalize=True)
        sims = feats @ classes.T
        target = torch.tensor(concept)[labels]
        text = evaluator.text_features(prompts)
        return {"concept_clip": sims.gather(1, target[:, None]).squeeze(1), "prompt_clip": (feats * text).sum(1),
                "correct": (sims.argmax(1) == labels).float()}

    base = run(None, 0.0)
    base_feats = evaluator.image_features(base * 2 - 1, normalize=True)
    concept = confusions(base_feats @ classes.T, labels)
    negatives = {d: caption(concept[d], TRAIN_TEMPLATES[0]) for d in range(10)}
    ref = scores(base, concept)
    rows = [{"scale": 0.0, "concept_clip": float(ref["concept_clip"].mean()),
             "prompt_clip": float(ref["prompt_clip"].mean()), "prompt_accuracy": float(ref["correct"].mean()),
             "concept_lower_share": None, "concept_delta": 0.0, "concept_delta_se": 0.0}]
    grids = [base]
    for scale in scales:
        images = run(negatives, scale)
        s = scores(images, concept)
        delta = s["concept_clip"] - ref["concept_clip"]  # paired: same seeds, same prompts
        rows.append({"scale": scale, "concept_clip": float(s["concept_clip"].mean()),
                     "concept_delta": float(delta.mean()), "concept_delta_se": float(delta.std() / len(delta) ** 0.5),
                     "prompt_clip": float(s["prompt_clip"].mean()), "prompt_accuracy": float(s["correct"].mean()),
                     "concept_lower_share": float((s["concept_clip"] < ref["concept_clip"]).float().mean())})
        grids.append(images)
    out.mkdir(parents=True, exist_ok=True)
    shown = [torch.cat([g[labels == d][:2] for d in range(10)]) for g in grids]  # 2 per digit, per weight
    save_grid(torch.cat(shown), out / "grid.png", nrow=20, upscale=2)
    result = {"model": model_spec, "n_per_digit": n_per_digit, "seed": seed, "confusion": concept,
              "negative_prompts": negatives, "rows": rows}
    (out / "nasa.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an exported one-step student, or a run folder with final/")
    p.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0], help="NASA weights alpha")
    p.add_argument("--n-per-digit", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/eval/nasa")
    args = p.parse_args(argv)
    if any(s <= 0 for s in args.scales) or args.n_per_digit < 1:
        print("nasa_digits: --scales must be > 0 and --n-per-digit >= 1", file=sys.stderr)
        return 2
    with torch.no_grad():
        result = measure(args.model, args.scales, args.n_per_digit, args.seed, Path(args.out))
    print("confusion (digit -> negative concept):", result["confusion"])
    print("| NASA weight | concept CLIP | paired change (s.e.) | prompt CLIP | prompt acc | images with lower concept score |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        share = "-" if r["concept_lower_share"] is None else f"{r['concept_lower_share']:.2f}"
        change = f"{r['concept_delta']:+.4f} ({r['concept_delta_se']:.4f})"
        print(f"| {r['scale']:g} | {r['concept_clip']:.4f} | {change} | {r['prompt_clip']:.4f} | "
              f"{r['prompt_accuracy']:.3f} | {share} |")
    print(f"nasa.json and grid.png in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
