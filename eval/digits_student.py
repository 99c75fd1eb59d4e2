"""Score an exported digits student with the `digits` protocol (both evaluators), sampled through STOCK diffusers
exactly as its model card says: the plain pipeline call a user makes.

    python eval/digits_student.py runs/demos/lcm_digits/final --seed 0 1 2 --out runs/demos/lcm_digits/stock

Full students: `DiffusionPipeline.from_pretrained(EXPORT)`; LoRA students: the recorded base pipeline, the export's
scheduler and `load_lora_weights(EXPORT)`. The call is `pipe(prompts, num_inference_steps=K, guidance_scale=G)`
with `timesteps=` only where the export says its scheduler cannot reproduce them from K alone, and `eta=` for
0 < gamma < 1 (TCD). One metrics.json row per seed, and their mean, in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from diffdistill.eval.protocols import digits_protocol
from diffdistill.export import read_recipe

KEYS = ("fid", "prompt_accuracy", "classifier_accuracy", "classifier_fd", "clip_score", "diversity")


def stock_pipeline(folder: str | Path):
    """``(pipe, call)``: the export's stock-diffusers pipeline and the keyword arguments of its model card's call
    (besides the prompts), as the card writes them."""
    import diffusers

    folder, recipe = Path(folder), read_recipe(folder)
    if recipe["kind"] == "full":
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    else:
        pipe = diffusers.DiffusionPipeline.from_pretrained(recipe["base"], torch_dtype=torch.float32)
        scheduler = getattr(diffusers, recipe["scheduler"]["class"])
        pipe.scheduler = scheduler.from_pretrained(str(folder), subfolder="scheduler")
        pipe.load_lora_weights(str(folder))
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": recipe["num_inference_steps"], "guidance_scale": recipe["guidance"]}
    if not recipe["scheduler"]["default_call_reproduces"]:
        call["timesteps"] = recipe["diffusers_timesteps"]
    if 0.0 < recipe.get("gamma", 1.0) < 1.0:
        call["eta"] = recipe["gamma"]
    return pipe, call


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="an exported student folder (diffdistill export, or a run's final/)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-per-digit", type=int, default=100)
    ap.add_argument("--out", default=None, help="default: EXPORT/../stock-eval")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    out = Path(args.out or Path(args.export).parent / "stock-eval")
    out.mkdir(parents=True, exist_ok=True)
    pipe, call = stock_pipeline(args.export)

    def sample(prompts, generator):  # images in [0, 1]
        return pipe(list(prompts), generator=generator, output_type="pt", **call).images

    rows = []
    for seed in args.seed:
        result, _ = digits_protocol(sample, n_per_digit=args.n_per_digit, seed=seed)
        result.update(seed=seed, export=str(args.export), call=call)
        rows.append(result)
        print(json.dumps({k: result[k] for k in ("seed", *KEYS, "evaluators_disagree")}))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in KEYS}
    (out / "metrics.json").write_text(json.dumps({"seeds": rows, "mean": mean}, indent=1, default=str))
    print("mean over seeds", json.dumps(mean))
    return rows


if __name__ == "__main__":
    main()
