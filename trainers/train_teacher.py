"""Train the embedded digits teacher (assets/teachers/digits-sd) from scratch, on the held-in split.

A genuine latent text-to-image diffusion model in Stable Diffusion 1.5's format, shrunk:
  1. AutoencoderKL 32x32x3 -> 8x8x4 (reconstruction + a small KL term); its ``scaling_factor`` is set
     to 1 / std of the training latents, as SD's 0.18215 was.
  2. UNet2DConditionModel on the latents and a CLIPTextModel (tokenizer from open_clip's bundled BPE),
     trained jointly from scratch: epsilon prediction under SD1.5's noise process (DDPM,
     ``scaled_linear`` betas 0.00085 -> 0.012, 1000 steps), 10% empty captions so classifier-free
     guidance works, EMA weights saved.
  3. Saved as a StableDiffusionPipeline folder (fp16 safetensors, no safety checker) with SD1.5's own
     scheduler config (PNDM, steps_offset 1, set_alpha_to_one false).

Seeded; each stage checkpoints atomically into --work and resumes from there when re-run.

    python trainers/train_teacher.py --out assets/teachers/digits-sd --work runs/teacher
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffdistill.checkpoint import (
    load_optimizer,
    load_state,
    optimizer_tensors,
    prefixed,
    save_state,
    unprefixed,
)
from diffdistill.data import TRAIN_TEMPLATES, caption, load_split
from diffdistill.ema import EMA
from diffdistill.schedule import VPSchedule
from diffdistill.tokenizers import VOCAB_SIZE, build_clip_tokenizer

SD15_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SD15_SCHEDULER = dict(**SD15_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                      prediction_type="epsilon", timestep_spacing="leading", trained_betas=None)


def build_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return vae, unet, text_encoder


def _resume(path: Path, modules: dict, opt, ema: dict | None):
    """Load a stage checkpoint if there is one; returns (step, generator state or None)."""
    if not path.is_file():
        return 0, None
    tensors, meta = load_state(path)
    for name, module in modules.items():
        module.load_state_dict(unprefixed(name, tensors))
    load_optimizer(opt, tensors, meta["optimizer"])
    for name, e in (ema or {}).items():
        e.load_state_dict(unprefixed(f"ema_{name}", tensors), meta["step"])
    print(f"resumed {path.name} at step {meta['step']}")
    return meta["step"], tensors["rng"]


def _save(path: Path, step: int, modules: dict, opt, ema: dict | None, g: torch.Generator) -> None:
    tensors = {"rng": g.get_state()}
    for name, module in modules.items():
        tensors.update(prefixed(name, module.state_dict()))
    for name, e in (ema or {}).items():
        tensors.update(prefixed(f"ema_{name}", e.state_dict()))
    opt_tensors, opt_meta = optimizer_tensors(opt)
    save_state(path, {**tensors, **opt_tensors}, {"step": step, "optimizer": opt_meta})


def train_vae(vae, images, args, work: Path):
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ckpt = work / "vae.safetensors"
    start, rng = _resume(ckpt, {"vae": vae}, opt, None)
    if rng is not None:
        g.set_state(rng)
    vae.train()
    for step in (bar := tqdm(range(start, args.vae_steps), desc="1/2 vae", initial=start, total=args.vae_steps)):
        x = images[torch.randint(len(images), (args.vae_batch,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(g)).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + args.kl_weight * post.kl().mean() / post.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps:
            _save(ckpt, step + 1, {"vae": vae}, opt, None, g)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images):
    dists = [vae.encode(chunk).latent_dist for chunk in images.split(500)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def train_denoiser(unet, text_encoder, tokenizer, lat_mean, lat_std, labels, args, work: Path):
    g = torch.Generator().manual_seed(args.seed + 1)
    schedule = VPSchedule.from_scheduler(dict(SD15_BETAS))
    captions = [caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES]
    ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = {"unet": EMA(unet, args.ema_decay), "text_encoder": EMA(text_encoder, args.ema_decay)}
    modules = {"unet": unet, "text_encoder": text_encoder}
    ckpt = work / "denoiser.safetensors"
    start, rng = _resume(ckpt, modules, opt, ema)
    if rng is not None:
        g.set_state(rng)
    unet.train(), text_encoder.train()
    for step in (bar := tqdm(range(start, args.steps), desc="2/2 unet+text", initial=start, total=args.steps)):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        idx = torch.randint(len(labels), (args.batch,), generator=g)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        template = torch.randint(len(TRAIN_TEMPLATES), (args.batch,), generator=g)
        cap = labels[idx] * len(TRAIN_TEMPLATES) + template
        cap = torch.where(torch.rand(args.batch, generator=g) < args.p_empty, len(captions), cap)
        k = torch.randint(0, schedule.num_train_timesteps, (args.batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        z_t = schedule.add_noise(z0, eps, schedule.from_timestep(k))
        embeds = text_encoder(ids[cap])[0]
        loss = F.mse_loss(unet(z_t, k, encoder_hidden_states=embeds).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for name, module in modules.items():
            ema[name].update(module)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            _save(ckpt, step + 1, modules, opt, ema, g)
    for name, module in modules.items():
        ema[name].copy_to(module)
        module.eval().requires_grad_(False)


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    # SD1.5's scheduler_config.json also says clip_sample: false (PNDM does not take the key, DDIM does and
    # defaults to clipping x0 to [-1, 1], which would wreck latents of unit scale)
    sched_file = out / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "clip_sample": False}, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/teachers/digits-sd")
    ap.add_argument("--work", default="runs/teacher", help="checkpoints; re-running resumes from here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--p-empty", type=float, default=0.1)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()

    vae, unet, text_encoder = build_models()
    with tempfile.TemporaryDirectory() as d:
        tokenizer = build_clip_tokenizer(d)
    data = load_split("held_in")
    vae = train_vae(vae, data.images, args, work)
    lat_mean, lat_std = encode_all(vae, data.images)
    scaling = 1.0 / lat_mean.std().item()
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae done: latent std {1 / scaling:.4f} -> scaling_factor {scaling:.4f}")
    train_denoiser(unet, text_encoder, tokenizer, lat_mean * scaling, lat_std * scaling, data.labels, args, work)
    save_pipeline(out, vae, unet, text_encoder, tokenizer)
    report = {"seconds": round(time.time() - began, 1), "scaling_factor": scaling, "args": vars(args),
              "params": {n: sum(p.numel() for p in m.parameters()) for n, m in
                         (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))},
              "trained_on": "held_in split only (see assets/data/manifest.json)"}
    (work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
