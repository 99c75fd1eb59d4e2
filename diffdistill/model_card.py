"""The model card (``README.md``) of an exported student: what it is, the exact diffusers call that
reproduces its trained recipe, how it was trained and, when given, how it scored."""

from __future__ import annotations

import dataclasses
import sys

import yaml


def objective_paper(name: str | None) -> str:
    """The first paragraph of the objective's module docstring (it names the paper and equation)."""
    from .objectives import OBJECTIVES

    if name not in OBJECTIVES:
        return f"{name!r} (unknown objective)" if name else "not recorded (no training config given)"
    doc = sys.modules[OBJECTIVES[name].__module__].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split()) or name


def _config_dict(config) -> dict:
    from .config import config_to_dict

    return config_to_dict(config) if dataclasses.is_dataclass(config) else dict(config)


def config_summary(config) -> dict:
    """A flat ``{dotted key: value}`` of the config fields a model card shows."""
    raw = _config_dict(config)
    keys = {"teacher": ("path", "dtype"), "student": ("kind", "lora_rank", "lora_alpha", "timesteps", "guidance"),
            "data": ("prompts",), "train": ("max_steps", "batch_size", "lr", "ema_decay", "seed", "mixed_precision")}
    summary = {f"{s}.{k}": raw.get(s, {}).get(k) for s, names in keys.items() for k in names}
    summary.update({f"objective.{k}": v for k, v in raw.get("objective", {}).items()})
    if summary.get("student.kind") != "lora":
        summary = {k: v for k, v in summary.items() if not k.startswith("student.lora")}
    return summary


def _front_matter(recipe: dict) -> str:
    from .pipeline import _is_local

    tags = ["diffdistill", "step-distillation", "text-to-image", *(["lora"] if recipe["kind"] == "lora" else [])]
    meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    if not _is_local(recipe["base"]):  # a hub id
        meta["base_model"] = recipe["base"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def _summary(recipe: dict) -> str:
    k = recipe["num_inference_steps"]
    what = "full denoiser" if recipe["kind"] == "full" else \
        f"LoRA, rank {recipe['lora']['rank']}, alpha {recipe['lora']['alpha']:g}"
    sch = recipe["scheduler"]
    scaling = "" if sch.get("timestep_scaling") is None else f", timestep_scaling={sch['timestep_scaling']:g}"
    settings = f"original_inference_steps={sch['original_inference_steps']}{scaling}" \
        if sch.get("original_inference_steps") is not None else \
        f"stochastic_sampling={recipe.get('gamma', 1.0) == 1.0}, shift=1"
    scheduler = f"`{sch.get('class', 'LCMScheduler')}` ({settings})".replace("e+0", "e")
    gamma = recipe.get("gamma", 1.0)
    rows = [("Base model (teacher)", f"`{recipe['base']}`"), ("Method", objective_paper(recipe["objective"])),
            ("Student", what), ("Sampling steps", f"{k} (diffusers timesteps {recipe['diffusers_timesteps']})"),
            ("Guidance scale", f"{recipe['guidance']:g} (diffusers convention; 1 = no classifier-free guidance)"),
            ("Sampler", "re-noising (LCM)" if gamma == 1.0 else "deterministic DDIM" if gamma == 0.0
             else f"stochastic DDIM, gamma (TCD's eta) {gamma:g}"),
            ("Training step", recipe["step"] if recipe["step"] is not None else "not recorded"),
            ("Scheduler", scheduler)]
    title = f"# {recipe['objective'] or 'diffdistill'} student: {k}-step {recipe['kind']} of `{recipe['base']}`"
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    return f"{title}\n\nDistilled with diffdistill.\n\n| | |\n|---|---|\n{table}"


def _usage(recipe: dict, location: str, prompt: str) -> str:
    k, g, dtype = recipe["num_inference_steps"], recipe["guidance"], recipe["dtype"]
    exact = recipe["scheduler"]["default_call_reproduces"]
    scheduler = recipe["scheduler"].get("class", "LCMScheduler")
    # flow pipelines take the trained times as `sigmas=` (their scheduler has shift 1), UNet pipelines as `timesteps=`
    arg, grid = ("sigmas", recipe["timesteps"]) if scheduler == "FlowMatchEulerDiscreteScheduler" else \
        ("timesteps", recipe["diffusers_timesteps"])
    timesteps = "" if exact else f", {arg}={grid}"
    gamma = recipe.get("gamma", 1.0)
    eta = f", eta={gamma:g}" if 0.0 < gamma < 1.0 else ""
    side = recipe.get("resolution")  # the trained size: a pipeline's own default may differ (FLUX: 1024)
    size = f", height={side}, width={side}" if side else ""
    flux_cfg = recipe.get("base_pipeline") == "FluxPipeline" and not recipe.get("guidance_embedded", True) and g != 1
    guidance_arg = f'true_cfg_scale={g}, negative_prompt=""' if flux_cfg else f"guidance_scale={g}"
    call = f'image = pipe("{prompt}", num_inference_steps={k}, {guidance_arg}{size}{timesteps}{eta}).images[0]'
    if recipe["kind"] == "full":
        code = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                f'pipe = DiffusionPipeline.from_pretrained("{location}", dtype=torch.{dtype})  # .to("cuda") on a GPU\n'
                f"{call}")
    else:
        code = (f"import torch\nfrom diffusers import DiffusionPipeline, {scheduler}\n\n"
                f'pipe = DiffusionPipeline.from_pretrained("{recipe["base"]}", dtype=torch.{dtype})\n'
                f'pipe.scheduler = {scheduler}.from_pretrained("{location}", subfolder="scheduler")\n'
                f'pipe.load_lora_weights("{location}")\n'
                "pipe.fuse_lora()  # optional: merge the adapter into the base weights (same images)\n"
                f"{call}")
    notes = [(f"Always pass `{guidance_arg}`: the pipeline's own default guidance is not the trained recipe. "
              "SD pipelines apply CFG only when `guidance_scale > 1`; a network that embeds the guidance (LCM's "
              "w-conditioned UNets, FLUX.1-dev) is told the scale in one pass, with no CFG branch; FLUX without a "
              "guidance embedding runs CFG only through `true_cfg_scale` with a negative prompt."),
             "With a fixed `generator`, these calls give the same images as diffdistill's own student sampler."]
    if scheduler == "FlowMatchEulerDiscreteScheduler" and gamma == 1.0:  # the step's noise is not `generator`'s
        notes[-1] = ("The pipeline does not pass its `generator` to the scheduler's step, so the re-noising "
                     "between steps draws from torch's global RNG: call `torch.manual_seed(...)` as well as passing "
                     "`generator=` for reproducible images (diffdistill's sampler draws the same way when its "
                     "re-noising generator is None).")
    if eta:
        notes.insert(0, f"Pass `eta={gamma:g}`: it is TCDScheduler's stochasticity (gamma), a call argument, and the "
                        "pipeline's default `eta=0.0` samples deterministically instead.")
    if not exact:
        notes.insert(0, f"**No stock scheduler setting produces the trained timesteps {recipe['diffusers_timesteps']} "
                        f"from `num_inference_steps` alone**, so the call must pass `{arg}=` as above; without "
                        "it the scheduler picks its own evenly spaced grid and the results are not the trained recipe.")
    older = "(Older diffusers versions take `torch_dtype=` instead of `dtype=`.)"
    return "## Usage\n\n```python\n" + code + "\n```\n\n" + "\n".join(f"- {n}" for n in notes) + f"\n\n{older}"


def _eval_table(eval_table) -> str:
    if not eval_table:
        return ""
    if isinstance(eval_table, str):
        return "## Evaluation\n\n" + eval_table.strip()
    columns = list(dict.fromkeys(c for row in eval_table.values() for c in row))

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for name, row in eval_table.items()]
    return "## Evaluation\n\n" + "\n".join(lines)


def _training(config) -> str:
    if config is None:
        return ""
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in config_summary(config).items())
    full = yaml.safe_dump(_config_dict(config), sort_keys=False)
    return (f"## Training configuration\n\n| key | value |\n|---|---|\n{rows}\n\n"
            f"<details><summary>Resolved config</summary>\n\n```yaml\n{full}```\n\n</details>")


def _how(recipe: dict) -> str:
    if recipe["scheduler"].get("class") == "FlowMatchEulerDiscreteScheduler":
        return _how_flow(recipe)
    k = recipe["num_inference_steps"]
    steps = (f"`original_inference_steps` is set so that `num_inference_steps={k}` yields the trained timesteps, and"
             if recipe["scheduler"]["default_call_reproduces"] else
             "The trained timesteps come from the call's `timesteps=` argument (see Usage), and")
    if recipe.get("gamma", 1.0) == 1.0:
        how = ("The scheduler is diffusers' own `LCMScheduler`. Each step predicts the clean sample and, except "
               "on the last step, re-noises it to the next timestep with fresh noise from the pipeline's "
               f"generator: the student's training-time sampler. {steps} "
               "`timestep_scaling=1e6` makes LCM's boundary scalings `c_skip` ~ 0 and `c_out` = 1, so the "
               "scheduler returns the network's prediction unchanged.")
    else:
        how = ("The scheduler is diffusers' own `TCDScheduler`. Each step predicts the clean sample and the "
               "noise, jumps by DDIM to timestep `floor((1 - eta) * next)` and, except on the last step, adds "
               "fresh noise from there up to the next timestep (none when `eta=0`): the student's sampler, "
               f"whose last step lands on timestep 0 as TCD's does. {steps}")
    return ("## How the recipe is baked in\n\n" + how + " `diffdistill.json` holds the recipe "
            "(continuous times `t` in [0, 1]; diffusers timestep k is t = (k + 1) / N, N = `num_train_timesteps`).")


def _how_flow(recipe: dict) -> str:
    k = recipe["num_inference_steps"]
    steps = (f"`shift_terminal` stretches its default grid so that `num_inference_steps={k}` yields the trained times."
             if recipe["scheduler"]["default_call_reproduces"] else
             "The trained times come from the call's `sigmas=` argument (see Usage).")
    if recipe.get("gamma", 1.0) == 1.0:
        how = ("`stochastic_sampling=True`. Each step takes the clean sample the network's velocity implies and moves "
               "it to the next noise level with fresh noise: the student's training-time sampler.")
    else:
        how = ("`stochastic_sampling=False`. Each step is the Euler step `x + (sigma_next - sigma) * v` of the "
               "network's velocity, the last one landing on sigma 0: the student's deterministic sampler (PCM's).")
    return ("## How the recipe is baked in\n\nThe scheduler is diffusers' own `FlowMatchEulerDiscreteScheduler` with "
            f"{how} `shift=1` makes the scheduler's sigmas the trained times. {steps} `diffdistill.json` holds the "
            "recipe (continuous times `t` in [0, 1]; the transformer's timestep is t N, N = `num_train_timesteps`).")


def model_card(recipe: dict, location: str, *, config=None, eval_table=None) -> str:
    """Markdown for ``README.md``: front matter, summary table, usage snippet, evaluation, training config."""
    digits = config is not None and _config_dict(config).get("data", {}).get("prompts") == "digits"
    prompt = "a handwritten digit 7" if digits else "a photo of a corgi"
    parts = [_front_matter(recipe), _summary(recipe), _usage(recipe, location, prompt), _eval_table(eval_table),
             _training(config), _how(recipe)]
    return "\n\n".join(p for p in parts if p) + "\n"
