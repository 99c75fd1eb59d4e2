"""LCM-LoRA against diffusers' reference script: training speed and 4-step FID, side by side.

    python eval/bench_lcm_reference.py --diffusers-script PATH/train_lcm_distill_lora_sd_wds.py \\
        [--config configs/demo/lcm_digits.yaml] [--steps N] [--batch-size B] [--lora-rank R] [--out DIR]

``PATH`` is a local checkout of diffusers' ``examples/consistency_distillation/
train_lcm_distill_lora_sd_wds.py`` (SD1.5 LCM-LoRA). It is not part of the diffusers package and is
never copied into this repository; e.g. ``git clone https://github.com/huggingface/diffusers`` or
``git --git-dir=DIFFUSERS.git show HEAD:examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``.
The script needs ``webdataset`` < 1 (its tar grouping breaks on 1.0.2) and ``braceexpand`` (not
diffdistill dependencies: ``pip install -e .[bench]``); the bench installs nothing and names what is missing.

What runs, on the CPU (``CUDA_VISIBLE_DEVICES=''``), ``--threads`` intra-op threads each, one after the other:

1. The held-in digits (never the held-out evaluation split) with one random training caption each are
   written as webdataset shards (``DIR/shards/NNNNNN.tar``: ``KEY.png`` 32x32 RGB, ``KEY.txt``,
   ``KEY.json`` with the caption and the true size), in a seeded random order.
2. diffusers' script on the embedded teacher, reading those shards. ``DIR/diffusers/`` is its output
   folder; its console output is in ``DIR/diffusers.log``.
3. ``python -m diffdistill.cli train --config CONFIG ...`` (the ``lcm`` objective, a LoRA student) into
   ``DIR/ours/``, by default on the same shards (``--ours-data config`` keeps the config's
   ``data.images``); console output in ``DIR/ours.log``.
4. Both students under our ``digits`` protocol (``--num-images`` images, held-out caption wordings),
   ``--sample-steps`` 4 at the same times: by default stock ``LCMScheduler``'s grid for the teacher with
   ``original_inference_steps = num_ddim_timesteps`` (diffusers 0.42.1, 4 of 50: timesteps
   [999, 759, 499, 259], t = (k + 1) / 1000 = [1.0, 0.76, 0.5, 0.26]; diffusers < 0.24 gave
   [999, 759, 519, 279]), or ``--timesteps``; guidance 1 (no CFG), LCM's re-noising sampler. Before
   scoring, the script's LoRA is also sampled by stock diffusers (``StableDiffusionPipeline`` +
   ``LCMScheduler`` + ``load_lora_weights``, as its own validation does) and must agree with our sampler
   to 1e-3 in latent space (measured: 7e-7), so its FID is that of the script's student as diffusers runs it.
   Ours is scored twice: its live LoRA weights at the last step (what the script keeps: it has no EMA)
   and its EMA weights (what ``final/`` exports).

Settings: every shared setting is resolved once from our config (``--config`` plus the size flags) and
passed explicitly to BOTH sides: steps, batch size, LoRA rank and alpha (= rank unless the config says
otherwise), learning rate and its schedule, AdamW betas / eps / weight decay, gradient clipping, seed,
``num_ddim_timesteps``, the guidance range, pseudo-Huber loss and its ``c``, LCM's timestep scaling;
fp32, no gradient accumulation. Guidance conventions: our ``objective.w_min/w_max`` are diffusers CFG
scales (1 = none); the script's ``--w_min/--w_max`` are LCM's ``w`` (``cond + w (cond - uncond)``), so it
receives ours minus 1.

Steps/s: from the wall times that each side's tensorboard logger stamps on every step's scalars
(``logs/**/events.out.tfevents.*``; both log every step through accelerate). The rate is
``(n - 1) / (time of the last logged step - time of the first)``: model loading, data-pipeline start-up
and the whole first step (warm-up) fall before the first stamp, the final save / export after the last,
so only the training loop is timed. Whole-process wall times are printed beside it. Validation and
intermediate checkpoints are switched off on the diffusers side (``--validation_steps`` and
``--checkpointing_steps`` above ``--steps``); ours writes samples and its one checkpoint after the last step.

The diffusers script, as read at diffusers commit 58eb52c0 (main, 0.40.0.dev0; works unmodified with
diffusers 0.42.1, peft 0.21.2, accelerate 1.15.0, transformers 5.24.0):

* It calls ``check_min_version("0.40.0.dev0")``. If the installed diffusers is older than what the script
  asks for, the bench says so and runs it with that one check replaced by a printed warning; otherwise
  unchanged. It is launched through a tiny ``runpy`` shim either way (threads; the autocast switch below).
* Its teacher and target forwards run inside ``torch.autocast(device_type)`` whatever
  ``--mixed_precision`` says; on a CPU that is bfloat16 autocast (measured: about 1.45x slower per step on
  our 2-core machine, and not fp32). ``--diffusers-autocast off`` (the default) makes exactly that call
  (``torch.autocast("cpu")`` with no other argument) a disabled autocast, so both sides run fp32 as
  ``mixed precision no`` means; ``--diffusers-autocast as-is`` runs the script's own behaviour.
* ``--dataloader_num_workers`` must be >= 1 (0 divides by zero and persistent workers need one) and
  ``--max_train_samples`` must be given (it sizes the epoch): the bench passes 1 and steps x batch. The
  one worker process decodes PNGs beside the training process.
* Its ``WebdatasetFilter`` (min size 1024, watermark probability) is defined but not applied by this
  script; the bench refuses a script version that applies it (our digits are 32 px) rather than fake
  the metadata. Its validation samples photo prompts (``log_validation``); it is never reached here.
* ``--proportion_empty_prompts`` is parsed but not used (the training embeddings are built with 0), so
  the bench refuses a config with ``objective.empty_prompt_prob`` > 0 rather than compare unequal runs.
* Nothing is downloaded: the teacher is a local folder, ``--push_to_hub`` is off, ``HF_HUB_OFFLINE=1``.
* Its LoRA output ``unet_lora/pytorch_lora_weights.safetensors`` keeps peft's wrapper prefix in the keys
  (``unet.base_model.model.<module>.lora_A.weight``): neither stock ``pipe.load_lora_weights`` (0.42.1)
  nor ``diffdistill.lora.load_lora`` loads it as it is (diffusers issue #6392). The bench strips the
  prefix, takes rank / alpha / targets from the peft ``adapter_config.json`` it writes beside it, saves
  a diffusers-format copy (``DIR/diffusers_lora/``, loadable by stock diffusers too) and loads that.

Known differences that stay (the two implementations, not the settings): the script encodes real latents
as VAE posterior samples (ours: the posterior mean); its LoRA A matrices start Kaiming-uniform (ours:
Gaussian), B = 0 in both; its data stream is webdataset's resampled shards through a 1000-sample shuffle
buffer with one fixed caption per image (ours: per-sample seeded random picks, from the same shards by
default); its data loading runs in a worker process. Its data order is not reproducible: webdataset's
``ResampledShards`` seeds itself from the pid, the clock and ``os.urandom`` (``--seed`` fixes only the
noise, timesteps and guidance draws), so its FID moves a little from run to run (0.08 FID between two
5-step runs at 20 images); ours repeats exactly.

Prints a table (steps/s, ratio ours / diffusers, 4-step FID and the rest of the protocol) and writes it
with every figure and setting to ``DIR/bench.json`` and ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo" / "lcm_digits.yaml"
REQUIRED_PACKAGES = ("webdataset", "braceexpand")  # import name = PyPI name for both
SCRIPT_NAME = "train_lcm_distill_lora_sd_wds.py"
PEFT_PREFIX = "base_model.model."


# -- arguments -----------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers-script", required=True, help=f"path to diffusers' {SCRIPT_NAME}")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="our LCM config (objective.name: lcm)")
    ap.add_argument("--steps", type=int, default=None, help="training steps, both sides (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    ap.add_argument("--lora-rank", type=int, default=None, help="default: the config's student.lora_rank")
    ap.add_argument("--lr", type=float, default=None, help="default: the config's train.lr")
    ap.add_argument("--seed", type=int, default=None, help="training seed (default: the config's train.seed)")
    ap.add_argument("--sample-steps", type=int, default=4, help="sampling steps of both students")
    ap.add_argument("--timesteps", default=None,
                    help="the students' sampling times (continuous t), comma-separated (default: stock "
                         "LCMScheduler's --sample-steps grid with original_inference_steps = num_ddim_timesteps)")
    ap.add_argument("--num-images", type=int, default=1000, help="digits protocol images per student")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each training process")
    ap.add_argument("--diffusers-autocast", choices=("off", "as-is"), default="off",
                    help="the script's unconditional torch.autocast on the teacher/target forwards "
                         "(bfloat16 on CPU): off = fp32 like our side (default), as-is = the script unchanged")
    ap.add_argument("--ours-data", choices=("shards", "config"), default="shards",
                    help="our side's real images: the bench's shards (same data as the script) or data.images")
    ap.add_argument("--images-per-shard", type=int, default=1000)
    ap.add_argument("--out", default="runs/bench/lcm_reference")
    ap.add_argument("--overwrite", action="store_true", help="delete a non-empty --out first")
    ap.add_argument("--score-only", action="store_true", help="do not train: score the two students an earlier run "
                    "left in --out (process times are then not known)")
    ap.add_argument("overrides", nargs="*", help="more dotted overrides of our config (applied to both sides "
                    "where the script has the setting)")
    args = ap.parse_args(argv)
    if args.timesteps is not None:
        try:
            args.timesteps = [float(t) for t in args.timesteps.split(",")]
        except ValueError:
            ap.error(f"--timesteps must be comma-separated numbers, got {args.timesteps!r}")
        if len(args.timesteps) != args.sample_steps:
            ap.error(f"--timesteps has {len(args.timesteps)} times but --sample-steps is {args.sample_steps}")
    if args.sample_steps < 1:
        ap.error("--sample-steps must be at least 1")
    for name in ("steps", "batch_size", "lora_rank"):
        value = getattr(args, name)
        if value is not None and value < (3 if name == "steps" else 1):
            ap.error(f"--{name.replace('_', '-')} must be at least {3 if name == 'steps' else 1}, got {value}")
    if args.num_images < 20 or args.num_images % 10:
        ap.error(f"--num-images must be a multiple of 10 and >= 20 (the digits protocol), got {args.num_images}")
    if args.threads < 1 or args.images_per_shard < 1:
        ap.error("--threads and --images-per-shard must be positive")
    return args


def missing_packages() -> list[str]:
    """What the diffusers script imports that this environment lacks, or has in a version it breaks on:
    its own tar grouping (``group_by_keys_nothrow``) stops with ``KeyError: 'fname'`` after a few hundred
    samples under webdataset 1.0.2 (measured); 0.2.86 runs it."""
    from importlib.metadata import PackageNotFoundError, version

    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    try:
        if "webdataset" not in missing and int(version("webdataset").split(".")[0]) >= 1:
            missing.append("'webdataset<1'")
    except (PackageNotFoundError, ValueError):
        pass
    return missing


# -- the reference script --------------------------------------------------------------------------------
@dataclass
class ScriptInfo:
    path: str
    min_version: str | None  # from check_min_version("...")
    bypass_version_check: bool  # the installed diffusers is older than min_version


def check_script(path: str | Path, installed: str | None = None) -> ScriptInfo:
    """Read the script's requirements; refuse one that is not the LCM-LoRA SD script or that filters our data."""
    from packaging import version

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--diffusers-script {path} does not exist. Get it from a diffusers checkout: "
                         f"examples/consistency_distillation/{SCRIPT_NAME}")
    text = path.read_text()
    for flag in ("--pretrained_teacher_model", "--train_shards_path_or_url", "--lora_rank", "--w_min",
                 "--num_ddim_timesteps", "--huber_c", "--max_train_samples"):
        if flag not in text:
            raise SystemExit(f"{path} has no {flag} argument: not diffusers' {SCRIPT_NAME}?")
    if re.search(r"select\(\s*WebdatasetFilter", text):
        raise SystemExit(f"{path} filters samples with WebdatasetFilter (original size >= 1024 px, watermark "
                         "score): the 32 px digits would all be dropped; this bench supports the SD1.5 script "
                         "that defines but does not apply the filter")
    m = re.search(r"check_min_version\(\s*[\"']([^\"']+)[\"']\s*\)", text)
    required = m.group(1) if m else None
    if installed is None:
        import diffusers

        installed = diffusers.__version__
    older = required is not None and version.parse(installed) < version.parse(required)
    return ScriptInfo(str(path), required, older)


# launched as `python -c SHIM SCRIPT ARGS...`; configured by environment variables set by the bench
SHIM = r"""
import os, runpy, sys
import torch
torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
if os.environ.get("BENCH_CPU_AUTOCAST") == "off":
    _autocast = torch.autocast
    def autocast(*args, **kwargs):  # only the script's bare torch.autocast("cpu") becomes a disabled one
        if args == ("cpu",) and not kwargs:
            return _autocast("cpu", enabled=False)
        return _autocast(*args, **kwargs)
    torch.autocast = autocast
if os.environ.get("BENCH_BYPASS_MIN_VERSION"):
    import diffusers.utils
    def check_min_version(v):
        print(f"bench shim: the script asks for diffusers >= {v}; running it on the installed "
              f"{diffusers.__version__} anyway", file=sys.stderr)
    diffusers.utils.check_min_version = check_min_version
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# -- data ----------------------------------------------------------------------------------------------
def write_shards(folder: str | Path, images, captions: list[str], per_shard: int = 1000, seed: int = 0) -> str:
    """``images`` ``(N, 3, H, W)`` in [-1, 1] with their captions -> ``folder/NNNNNN.tar`` webdataset
    shards (``KEY.png``, ``KEY.txt``, ``KEY.json``) in a seeded random order; returns the brace pattern."""
    import numpy as np
    import torch
    from PIL import Image

    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} / {len(captions)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    chunks = [order[i:i + per_shard] for i in range(0, len(order), per_shard)]
    for n, chunk in enumerate(chunks):
        with tarfile.open(folder / f"{n:06d}.tar", "w") as tar:
            for i in chunk:
                png = io.BytesIO()
                Image.fromarray(np.ascontiguousarray(pixels[i])).save(png, format="PNG")
                h, w = pixels[i].shape[:2]
                meta = {"caption": captions[i], "width": w, "height": h, "source_index": i}
                for ext, data in (("png", png.getvalue()), ("txt", captions[i].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    last = len(chunks) - 1
    return str(folder / (f"{{000000..{last:06d}}}.tar" if last else "000000.tar"))


def write_digit_shards(folder: str | Path, per_shard: int, seed: int) -> str:
    """The embedded held-in digits (the held-out split is the evaluation's) with random training captions."""
    import torch

    from diffdistill.data import load_split, random_captions

    split = load_split("held_in")
    captions = random_captions(split.labels, torch.Generator().manual_seed(seed))
    return write_shards(folder, split.images, captions, per_shard, seed)


# -- settings shared by both sides -----------------------------------------------------------------------
@dataclass
class Settings:
    steps: int
    batch_size: int
    lora_rank: int
    lora_alpha: float
    lr: float
    lr_scheduler: str
    lr_warmup_steps: int
    adam_betas: list
    adam_eps: float
    weight_decay: float
    grad_clip: float
    seed: int
    num_ddim_timesteps: int
    w_min: float  # diffusers CFG convention (1 = none)
    w_max: float
    huber_c: float
    timestep_scaling: float
    timesteps: list  # sampling times of both students (continuous t)


def size_overrides(args) -> list[str]:
    """Our config overrides for the bench's flags plus what the comparison fixes (LoRA, huber, fp32, ...)."""
    out = ["student.kind=lora", "objective.loss=huber", "train.mixed_precision='no'", "teacher.dtype=float32",
           "train.gradient_accumulation=1", "student.guidance=1.0"]
    if args.timesteps is not None:
        out.append(f"student.timesteps=[{', '.join(repr(t) for t in args.timesteps)}]")
    for flag, key in (("steps", "train.max_steps"), ("batch_size", "train.batch_size"),
                      ("lora_rank", "student.lora_rank"), ("lr", "train.lr"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out + list(args.overrides)


def lcm_grid(teacher: str, steps: int, original_steps: int) -> list[float]:
    """Stock ``LCMScheduler``'s ``steps``-step timesteps for ``teacher`` with ``original_inference_steps`` =
    ``original_steps``, as continuous ``t = (k + 1) / T`` (4 steps, 50: [999, 759, 499, 259] in diffusers 0.42)."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_pretrained(teacher, subfolder="scheduler")
    scheduler.set_timesteps(steps, original_inference_steps=original_steps)
    T = scheduler.config.num_train_timesteps
    return [round((int(k) + 1) / T, 12) for k in scheduler.timesteps]


def resolve(args):
    """``(config, overrides, settings)``: our config with the bench's overrides; without ``--timesteps``
    the students' times become stock LCMScheduler's grid (printed when that changes the config's)."""
    from diffdistill.config import load_config

    overrides = size_overrides(args)
    config = load_config(args.config, overrides)
    if args.timesteps is None:
        grid = lcm_grid(config.teacher.path, args.sample_steps, config.objective.num_ddim_timesteps)
        if grid != list(config.student.timesteps):
            print(f"note: sampling both students at LCMScheduler's grid t = {grid} (the config has "
                  f"{config.student.timesteps})")
            overrides.append(f"student.timesteps=[{', '.join(repr(t) for t in grid)}]")
            config = load_config(args.config, overrides)
    return config, overrides, settings_from_config(config)


def settings_from_config(config) -> Settings:
    """The shared settings of a resolved diffdistill config (an ``lcm`` objective, a LoRA student)."""
    o, s, t = config.objective, config.student, config.train
    if o.name != "lcm":
        raise SystemExit(f"the config's objective is {o.name!r}; this bench compares the 'lcm' objective")
    if abs(o.sigma_data - 0.5) > 1e-12:
        raise SystemExit(f"objective.sigma_data={o.sigma_data}: diffusers' script hard-codes 0.5")
    if getattr(o, "empty_prompt_prob", 0.0):
        raise SystemExit(f"objective.empty_prompt_prob={o.empty_prompt_prob}: the script never drops captions "
                         "(its --proportion_empty_prompts is not wired to the training embeddings); set it to 0")
    if getattr(s, "gamma", 1.0) != 1.0:
        raise SystemExit(f"student.gamma={s.gamma}: LCM's sampler (gamma 1, stock LCMScheduler) is the one compared")
    if s.lora_targets is not None:
        from diffdistill.lora import DEFAULT_TARGETS

        if sorted(s.lora_targets) != sorted(DEFAULT_TARGETS):
            raise SystemExit("student.lora_targets differs from the script's default target modules")
    return Settings(steps=t.max_steps, batch_size=t.batch_size, lora_rank=s.lora_rank,
                    lora_alpha=s.lora_alpha if s.lora_alpha is not None else s.lora_rank, lr=t.lr,
                    lr_scheduler=t.lr_scheduler, lr_warmup_steps=t.lr_warmup_steps, adam_betas=list(t.adam_betas),
                    adam_eps=t.adam_eps, weight_decay=t.weight_decay, grad_clip=t.grad_clip, seed=t.seed,
                    num_ddim_timesteps=o.num_ddim_timesteps, w_min=o.w_min, w_max=o.w_max, huber_c=o.huber_c,
                    timestep_scaling=o.timestep_scaling, timesteps=list(s.timesteps))


def diffusers_cli(st: Settings, teacher: str, out_dir: str | Path, shards: str) -> list[str]:
    """The script's arguments for ``st`` (its ``w`` is ours minus 1; ``lora_alpha`` must be an integer)."""
    if float(st.lora_alpha) != int(st.lora_alpha):
        raise SystemExit(f"LoRA alpha {st.lora_alpha}: the script takes an integer --lora_alpha")
    return [
        "--pretrained_teacher_model", str(teacher), "--output_dir", str(out_dir),
        "--train_shards_path_or_url", shards, "--max_train_samples", str(st.steps * st.batch_size),
        "--dataloader_num_workers", "1", "--resolution", "32", "--train_batch_size", str(st.batch_size),
        "--max_train_steps", str(st.steps), "--learning_rate", repr(st.lr), "--lr_scheduler", st.lr_scheduler,
        "--lr_warmup_steps", str(st.lr_warmup_steps), "--adam_beta1", repr(st.adam_betas[0]),
        "--adam_beta2", repr(st.adam_betas[1]), "--adam_epsilon", repr(st.adam_eps),
        "--adam_weight_decay", repr(st.weight_decay), "--max_grad_norm", repr(st.grad_clip),
        "--gradient_accumulation_steps", "1", "--mixed_precision", "no", "--seed", str(st.seed),
        "--lora_rank", str(st.lora_rank), "--lora_alpha", str(int(st.lora_alpha)),
        "--num_ddim_timesteps", str(st.num_ddim_timesteps), "--w_min", repr(st.w_min - 1.0),
        "--w_max", repr(st.w_max - 1.0), "--loss_type", "huber", "--huber_c", repr(st.huber_c),
        "--timestep_scaling_factor", repr(st.timestep_scaling), "--checkpointing_steps", str(st.steps + 1),
        "--validation_steps", str(st.steps + 1), "--report_to", "tensorboard",
    ]


def ours_cli(config: str, overrides: list[str], st: Settings, run_dir: str | Path, shards: str | None) -> list[str]:
    """``diffdistill train`` arguments: the size overrides plus run-folder, logging and save cadence."""
    extra = [f"train.output_dir={run_dir}", "train.resume=none", "train.log_with=[tensorboard]",
             f"train.checkpoint_every={st.steps}", f"train.sample_every={st.steps}", "eval.every=0"]
    if shards is not None:
        extra.append(f"data.images={shards}")
    return ["-m", "diffdistill.cli", "train", "--config", str(config), *overrides, *extra]


# -- running and timing ------------------------------------------------------------------------------------
def run_logged(cmd: list[str], log: Path, env: dict) -> float:
    """Run ``cmd``, echoing its output to the console and ``log``; returns the wall seconds. Raises on failure."""
    start = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            f.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:4])} ... exited with {code} after {seconds:.0f} s; "
                           f"log: {log}\n--- last output ---\n{tail}")
    return seconds


def child_env(threads: int, **extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def loop_rate(log_dir: str | Path) -> dict:
    """Steps/s of a training loop from the wall times its tensorboard scalars carry (see the docstring)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    stamps: dict[int, float] = {}
    for path in glob.glob(str(Path(log_dir) / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                stamps[event.step] = max(stamps.get(event.step, 0.0), event.wall_time)
    if len(stamps) < 3:
        raise RuntimeError(f"{log_dir}: {len(stamps)} logged step(s) in tensorboard events; need >= 3 to time a loop")
    steps = sorted(stamps)
    seconds = stamps[steps[-1]] - stamps[steps[0]]
    return {"logged_steps": len(steps), "timed_steps": len(steps) - 1, "loop_seconds": seconds,
            "steps_per_s": (len(steps) - 1) / seconds}


# -- the reference's LoRA in our objects -------------------------------------------------------------------
def normalize_reference_lora(out_dir: str | Path, dest: str | Path) -> Path:
    """The script's LoRA as a plain diffusers-format file: keys ``unet.<module>.lora_A.weight`` (peft's
    ``base_model.model.`` wrapper prefix removed) and rank / alpha / targets from its ``adapter_config.json``
    in the metadata, as ``diffdistill.lora.save_lora`` writes them."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig

    from diffdistill.lora import LORA_WEIGHT_NAME, read_lora_file

    out_dir = Path(out_dir)
    tensors, _ = read_lora_file(out_dir / "unet_lora" / LORA_WEIGHT_NAME)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    metadata = None
    if (out_dir / "adapter_config.json").is_file():
        metadata = LoraConfig.from_pretrained(str(out_dir)).to_dict()
        metadata["inference_mode"] = False
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(dest), unet_lora_layers=tensors,
                                                     unet_lora_adapter_metadata=metadata,
                                                     weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return Path(dest) / LORA_WEIGHT_NAME


def reference_student(teacher_path: str, lora_file: str | Path, timesteps: list[float], guidance: float = 1.0):
    """``(teacher, student)``: the teacher with the reference LoRA as adapter ``student`` (frozen)."""
    from diffdistill import lora
    from diffdistill.pipeline import load_teacher
    from diffdistill.student import STUDENT_ADAPTER, Student

    teacher = load_teacher(teacher_path)
    lora.load_lora(teacher.backbone.denoiser, STUDENT_ADAPTER, lora_file)
    teacher.backbone.denoiser.requires_grad_(False).eval()
    return teacher, Student(teacher.backbone, STUDENT_ADAPTER, timesteps, guidance)


def stock_gap(teacher_path: str, lora_dir: str | Path, loaded: tuple, seed: int = 0) -> float:
    """Max |latent difference| between stock diffusers -- ``StableDiffusionPipeline`` with the teacher's
    ``LCMScheduler`` and ``load_lora_weights(lora_dir)``, the way the script's own validation samples --
    and our sampler with ``loaded = (teacher, student)``, same seed, times and prompts. LCM's boundary
    scalings (``c_skip`` < 1e-7 at timesteps >= 19) are all that should separate them."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    teacher, student = loaded
    prompts = [f"a handwritten digit {d}" for d in (0, 3, 7)]
    pipe = StableDiffusionPipeline.from_pretrained(teacher_path, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_pretrained(teacher_path, subfolder="scheduler")
    pipe.load_lora_weights(str(lora_dir))
    pipe.set_progress_bar_config(disable=True)
    T = pipe.scheduler.config.num_train_timesteps
    ks = [round(t * T) - 1 for t in student.timesteps]
    stock = pipe(prompts, timesteps=ks, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(seed)).images
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *teacher.latent_shape), generator=g)
    ours = student.generate(noise, teacher.encode_prompt(prompts), None, generator=g)
    return float((stock - ours).abs().max())


def score(label: str, loaded: tuple, num_images: int, seed: int) -> dict:
    from diffdistill.eval.harness import Model, evaluate

    result, _ = evaluate(Model(label, "export", label, loaded=loaded), "digits", num_images=num_images, seed=seed,
                         timing=False)
    return result


# -- the report ----------------------------------------------------------------------------------------------
def report(rows: list[dict], ratio: float, st: Settings, floor: float | None) -> str:
    def fmt(v, f):
        return "n/a" if v is None else f.format(v)

    head = (f"| run | steps | batch | LoRA rank | steps/s | loop s | process s | {len(st.timesteps)}-step FID | "
            "FID/floor | prompt acc | classifier acc | classifier FD | CLIP | diversity |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['label']} | {st.steps} | {st.batch_size} | {st.lora_rank} | "
                     f"{fmt(r.get('steps_per_s'), '{:.3f}')} | {fmt(r.get('loop_seconds'), '{:.1f}')} | "
                     f"{fmt(r.get('process_seconds'), '{:.1f}')} | {fmt(r.get('fid'), '{:.3f}')} | "
                     f"{fmt(r.get('fid_ratio_to_floor'), '{:.2f}')} | {fmt(r.get('prompt_accuracy'), '{:.3f}')} | "
                     f"{fmt(r.get('classifier_accuracy'), '{:.3f}')} | {fmt(r.get('classifier_fd'), '{:.1f}')} | "
                     f"{fmt(r.get('clip_score'), '{:.3f}')} | {fmt(r.get('diversity'), '{:.3f}')} |")
    lines.append("")
    lines.append(f"steps/s ratio ours / diffusers: {ratio:.3f}x")
    if floor is not None:
        lines.append(f"digits protocol: {rows[0].get('num_images')} images per student; real-vs-real FID floor "
                     f"{floor:.3f}")
    return "\n".join(lines)


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(f"diffusers' {SCRIPT_NAME} needs {', '.join(missing)}, missing (or too new) here. Install with:\n"
              f"    {sys.executable} -m pip install {' '.join(missing)}", file=sys.stderr)
        return 2
    info = check_script(args.diffusers_script)
    try:  # every config error before anything runs
        config, overrides, st = resolve(args)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError
        print(f"bench: our config {args.config}: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    teacher = str(Path(config.teacher.path).resolve()) if Path(config.teacher.path).exists() else config.teacher.path
    if args.score_only:  # both trainings already ran into --out: score them again (e.g. under a new metric)
        if not ((out / "diffusers").is_dir() and (out / "ours").is_dir()):
            print(f"bench: --score-only needs {out}/diffusers and {out}/ours from an earlier run", file=sys.stderr)
            return 2
        return finish(args, st, out, teacher, (None, None), ([None] * 3, None), info)
    prepare_out(out, args.overwrite)
    print(f"settings (both sides): {json.dumps(asdict(st))}")
    if info.bypass_version_check:
        print(f"note: the script asks for diffusers >= {info.min_version}; the installed one is older, so its "
              "check_min_version is replaced by a warning", file=sys.stderr)
    shards = write_digit_shards(out / "shards", args.images_per_shard, st.seed)
    teacher = str(Path(config.teacher.path).resolve()) if Path(config.teacher.path).exists() else config.teacher.path

    env = child_env(args.threads, BENCH_THREADS=str(args.threads), BENCH_CPU_AUTOCAST=args.diffusers_autocast,
                    **({"BENCH_BYPASS_MIN_VERSION": "1"} if info.bypass_version_check else {}))
    print(f"\n== diffusers reference: {st.steps} steps (log: {out / 'diffusers.log'})")
    ref_cmd = [sys.executable, "-c", SHIM, str(Path(info.path).resolve()),
               *diffusers_cli(st, teacher, out / "diffusers", shards)]
    ref_seconds = run_logged(ref_cmd, out / "diffusers.log", env)
    print(f"\n== ours: {st.steps} steps (log: {out / 'ours.log'})")
    ours_cmd = [sys.executable, *ours_cli(args.config, overrides, st, out / "ours",
                                          shards if args.ours_data == "shards" else None)]
    ours_seconds = run_logged(ours_cmd, out / "ours.log", child_env(args.threads))
    return finish(args, st, out, teacher, (ref_seconds, ours_seconds), (ref_cmd, ours_cmd), info)


def finish(args, st: Settings, out: Path, teacher: str, seconds: tuple, cmds: tuple, info: ScriptInfo) -> int:
    import torch

    from diffdistill.export import load_run_student

    torch.set_num_threads(args.threads)
    ref_rate, ours_rate = loop_rate(out / "diffusers" / "logs"), loop_rate(out / "ours" / "logs")
    print("\n== evaluating the students (digits protocol)")
    lora_file = normalize_reference_lora(out / "diffusers", out / "diffusers_lora")
    reference = reference_student(teacher, lora_file, st.timesteps)
    gap = stock_gap(teacher, lora_file.parent, reference, args.eval_seed)
    print(f"the script's LoRA sampled by stock diffusers (LCMScheduler) vs by our sampler: max |latent gap| {gap:.2e}")
    if gap > 1e-3:
        raise RuntimeError(f"stock diffusers and our sampler disagree on the script's LoRA (gap {gap:.3g}): the FID "
                           "below would not be the script's student's")
    rows = [{"label": "diffusers LCM-LoRA script", **score("diffusers", reference, args.num_images, args.eval_seed),
             **ref_rate, "process_seconds": seconds[0]}]
    for ema, label in ((False, "diffdistill lcm (live weights)"), (True, "diffdistill lcm (EMA, as exported)")):
        t, s, _ = load_run_student(out / "ours", ema=ema)
        rows.append({"label": label, **score(label, (t, s), args.num_images, args.eval_seed),
                     **(ours_rate if not ema else {}), "process_seconds": None if ema else seconds[1]})
    ratio = ours_rate["steps_per_s"] / ref_rate["steps_per_s"]
    text = report(rows, ratio, st, rows[0].get("fid_real_floor"))
    print("\n" + text)
    keep = ("label", "steps_per_s", "loop_seconds", "timed_steps", "process_seconds", "fid", "fid_real_floor",
            "fid_ratio_to_floor", "prompt_accuracy", "classifier_accuracy", "classifier_accuracy_per_digit",
            "classifier_fd", "evaluators_disagree", "clip_score", "diversity", "precision", "recall", "num_images")
    summary = {"settings": asdict(st), "ratio_steps_per_s_ours_over_diffusers": ratio, "stock_latent_gap": gap,
               "diffusers_script": info.path, "diffusers_autocast": args.diffusers_autocast, "threads": args.threads,
               "ours_data": args.ours_data, "rows": [{k: r.get(k) for k in keep} for r in rows],
               "commands": {"diffusers": cmds[0][3:], "ours": cmds[1]}}
    (out / "bench.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "report.md").write_text(f"# LCM-LoRA: diffdistill vs diffusers' {SCRIPT_NAME}\n\n{text}\n")
    print(f"\nbench.json and report.md in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
