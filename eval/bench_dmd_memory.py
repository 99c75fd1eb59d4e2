"""Peak memory of one DMD2 training step: shared-base LoRA vs three full networks, side by side.

An SD1.5-shaped UNet (diffusers' SD1.5 UNet config: 4 levels, 2 layers per block, cross-attention width
768; random init) behind a tiny VAE and a one-layer 768-wide text encoder, so that the UNets dominate.
Two modes of the same DMD2 step (student phase + fake-score phase, optimizer steps included, GAN head
on, batch 1, ``--latent`` x ``--latent`` latents):

* ``lora``: shared base -- teacher, student (adapter ``student``) and fake score (adapter
  ``fake_score``) are one frozen UNet; only the adapters (rank ``--rank``) and their Adam states train.
* ``full``: three networks -- the frozen teacher, a trainable student copy and a trainable fake-score copy,
  each with gradients and Adam states.

Each mode runs in its own process. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is
the process's peak resident memory (``ru_maxrss``), reported whole and above the process's footprint
before any model was built. ``--width`` scales every channel count (1.0 = SD1.5; the full mode at 1.0
would need about 30 GB in float32, more than our 24 GB CPU machines: run it there at ``--width 0.5``)::

    python eval/bench_dmd_memory.py --width 0.5 --latent 16          # CPU
    python eval/bench_dmd_memory.py --device cuda --dtype bfloat16 --latent 64   # one GPU, SD1.5 at 512 px
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD15_UNET = {  # diffusers' stable-diffusion-v1-5 unet/config.json, the shape-defining entries
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def build_pipeline(folder: Path, width: float, latent: int) -> Path:
    """An SD1.5-shaped random-init pipeline (channels x ``width``) with a tiny VAE and text encoder."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffdistill.tokenizers import VOCAB_SIZE, build_clip_tokenizer

    channels = [max(32, round(c * width / 32) * 32) for c in SD15_UNET["block_out_channels"]]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD15_UNET, "block_out_channels": channels}, sample_size=latent)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=2 * latent)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=768,
                                        num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    with tempfile.TemporaryDirectory() as bpe:
        tokenizer = build_clip_tokenizer(bpe)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(folder), safe_serialization=True)
    return folder


def child(mode: str, folder: str, device: str, dtype: str, rank: int, out_dir: str) -> dict:
    """One DMD2 step in ``mode``, in this process; returns the measurements."""
    import torch

    from diffdistill.config import load_config
    from diffdistill.trainer import Trainer

    before = _rss_mb()
    student = ["student.kind=lora", f"student.lora_rank={rank}"] if mode == "lora" else ["student.kind=full"]
    cfg = load_config(None, ["objective={name: dmd2, student_every: 1}", f"teacher.path={folder}",
                             f"teacher.dtype={dtype}", "data.images=digits", "train.batch_size=1",
                             f"train.output_dir={out_dir}", "train.log_with=[]", *student])
    trainer = Trainer(cfg)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = _rss_mb()
    start = time.perf_counter()
    for phase in trainer.phases:  # one DMD2 step: the student update, then the fake score's (and head's)
        trainer._update(phase, 0)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for g in trainer.groups.values() for p in g.values())
    result = {"mode": mode, "trainable_params": trainable, "step_seconds": seconds,
              "unet_params": sum(p.numel() for n, p in trainer.teacher.backbone.denoiser.named_parameters()
                                 if "lora" not in n)}
    if device == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = _rss_mb()
        result.update(peak_mb=peak, above_start_mb=peak - before, after_load_mb=loaded)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=1.0, help="channel scale of the SD1.5 UNet (1.0 = SD1.5)")
    p.add_argument("--latent", type=int, default=16, help="latent side (SD1.5 at 512 px: 64)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of student and fake score (DMD2 SDXL: 64)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the measurements here")
    args = p.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(child(args.child, args.folder, args.device, args.dtype, args.rank, out)))
        return 0
    if not 0 < args.width <= 1.0 or args.latent < 8 or args.latent % 8:
        print("bench_dmd_memory: need 0 < --width <= 1 and --latent a multiple of 8", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_pipeline(Path(tmp) / "sd15-shaped", args.width, args.latent)
        for mode in ("lora", "full"):
            cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--device", args.device,
                   "--dtype", args.dtype, "--rank", str(args.rank)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                print(f"bench_dmd_memory: the {mode} step failed (exit {done.returncode}; out of memory?)",
                      file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lora, full = rows
    key = "peak_mb"
    print(f"DMD2 step, SD1.5-shaped UNet x{args.width:g} ({lora['unet_params'] / 1e6:.0f}M params), "
          f"{args.latent}x{args.latent} latents, batch 1, {args.dtype} on {args.device}, LoRA rank {args.rank}")
    header = "| mode | trainable params | peak MB | above start MB | step s |"
    print(header + "\n|---|---|---|---|---|")
    for r in rows:
        above = f"{r['above_start_mb']:.0f}" if "above_start_mb" in r else "-"
        print(f"| {r['mode']} | {r['trainable_params'] / 1e6:.1f}M | {r[key]:.0f} | {above} | {r['step_seconds']:.1f} |")
    ratio = lora[key] / full[key]
    print(f"peak memory ratio shared-base LoRA / three full networks: {ratio:.3f} (target <= 0.5)")
    if "above_start_mb" in lora:
        print(f"above the process start: {lora['above_start_mb'] / full['above_start_mb']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
