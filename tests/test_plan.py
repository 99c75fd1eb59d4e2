"""``diffdistill plan`` and the real-architecture build of every shipped recipe (on the meta device, offline):
the shipped architecture configs give the published model sizes; every recipe builds, trains only fp32 masters,
holds the networks its paper uses, and the planner's static figure is what its tensors add up to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffdistill.cli import main
from diffdistill.config import load_config
from diffdistill.pipeline import load_teacher
from diffdistill.plan import assemble_on_meta, format_plan, plan

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REAL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("demo", "tiny"))

# Published parameter counts (model cards / papers; diffusers' and transformers' models of these configs)
PUBLISHED = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": {"denoiser": 859_520_964, "text_encoder": 123_060_480,
                                                    "vae": 83_653_863},
    "stabilityai/stable-diffusion-2-1-base": {"denoiser": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "stabilityai/stable-diffusion-xl-base-1.0": {"denoiser": 2_567_463_684, "text_encoder": 123_060_480,
                                                 "text_encoder_2": 694_659_840, "vae": 83_653_863},
    "stabilityai/stable-diffusion-3-medium-diffusers": {"denoiser": 2_028_328_000, "text_encoder": 123_650_304,
                                                        "text_encoder_2": 694_659_840,
                                                        "text_encoder_3": 4_762_310_656, "vae": 83_819_683},
    "black-forest-labs/FLUX.1-dev": {"denoiser": 11_901_408_320, "text_encoder": 123_060_480,
                                     "text_encoder_2": 4_762_310_656, "vae": 83_819_683},
}

# The networks each recipe's paper (or, where marked in its header, we) trains: student kind, fake score
# (None: none; "full": a trainable copy; "lora": an adapter on the shared base), discriminator heads.
NETWORKS = {
    "add/sdxl_turbo_512.yaml": ("full", None, True),
    "dmd2/flux_4step_lora.yaml": ("lora", "lora", True),     # ours: one shared 12B base (header)
    "dmd2/sd15.yaml": ("full", "full", True),                # stage 2
    "dmd2/sd15_stage1.yaml": ("full", "full", False),        # stage 1: no GAN head
    "dmd2/sdxl_1step.yaml": ("full", "full", True),
    "dmd2/sdxl_1step_ode_pretrain.yaml": ("full", None, False),  # regression pre-training (LPIPS)
    "dmd2/sdxl_4step.yaml": ("full", "full", True),
    "dmd2/sdxl_4step_lora.yaml": ("lora", "full", True),     # DMD2 always trains a full fake UNet
    "dpdmd/sd3.yaml": ("full", "full", False),
    "ladd/sd15.yaml": ("full", None, True),
    "ladd/sd3.yaml": ("full", None, True),
    "lcm/sd15_lora.yaml": ("lora", None, False),
    "lcm/sd3_lora.yaml": ("lora", None, False),
    "lcm/sdxl_lora.yaml": ("lora", None, False),
    "pcm/sd15_lora.yaml": ("lora", None, False),
    "pcm/sd3_lora.yaml": ("lora", None, True),              # with the adversarial consistency loss
    "tdd/sd15_lora.yaml": ("lora", None, False),
    "vsd/sd15_snoopi.yaml": ("full", "lora", False),         # SwiftBrush's LoRA teacher
    "vsd/sd21_swiftbrush.yaml": ("full", "lora", False),
}


def test_every_shipped_real_recipe_is_listed():
    assert sorted(NETWORKS) == REAL


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_shipped_architectures_give_the_published_sizes(hub_id):
    teacher = load_teacher(hub_id, dtype=torch.bfloat16, weights=False)
    counts = {"denoiser": teacher.backbone.denoiser, "vae": teacher.vae,
              **{n: getattr(teacher, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                 if getattr(teacher, n) is not None}}
    got = {k: sum(p.numel() for p in m.parameters()) for k, m in counts.items()}
    assert got == PUBLISHED[hub_id]
    assert teacher.device.type == "meta" and teacher.dtype == torch.bfloat16
    cond = teacher.encode_prompt(["a photo", "a cat"])  # shapes only, through the family's own encode
    assert cond.embeds.shape[0] == 2 and cond.embeds.is_meta


def _unique(modules) -> list[torch.Tensor]:
    seen, out = set(), []
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


@pytest.mark.parametrize("name", REAL)
def test_real_recipe_builds_at_real_size_with_fp32_masters(name, one_thread):
    config = load_config(CONFIGS / name)
    teacher, run = assemble_on_meta(config)
    # every trained tensor is an fp32 master, whatever teacher.dtype
    trained = [p for group in run.groups.values() for p in group.values()]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert all(p.is_meta for p in trained)
    # the networks the recipe's paper uses
    student_kind, fake_kind, heads = NETWORKS[name]
    assert (run.student.adapter is None) == (student_kind == "full")
    fake = getattr(run.objective, "fake", None)
    assert (None if fake is None else "full" if fake.adapter is None else "lora") == fake_kind
    assert ("disc" in run.groups) == heads
    # the plan's static figure is what the run's tensors add up to, counted here independently: every distinct
    # tensor of the teacher's modules and the objective once, plus fp32 gradient + two AdamW moments per trained
    # element, plus the student's fp32 EMA
    extra = [net.model for m in run.objective.modules() for net in [getattr(m, "network", None)]
             if isinstance(getattr(net, "model", None), torch.nn.Module)]
    modules = [teacher.backbone.denoiser, teacher.vae, *extra, run.objective,
               *(m for m in (teacher.text_encoder, teacher.text_encoder_2, teacher.text_encoder_3) if m is not None)]
    weights = sum(t.numel() * t.element_size() for t in _unique(modules))
    n_trained = sum(p.numel() for p in trained)
    n_student = sum(p.numel() for p in run.groups["student"].values())
    expected = weights + 12 * n_trained + 4 * n_student
    assert plan(config, alternatives=False).static_bytes == expected


def config_overrides(teacher: str) -> list[str]:
    return [f"teacher.path={teacher}", "data.images=null", "objective.gan_weight=0", "objective.disc_weight=0"]


def test_plan_counts_a_full_fake_score_and_offers_the_lora_one(tiny_sd, one_thread):
    config = load_config(CONFIGS / "dmd2" / "sd15.yaml", config_overrides(tiny_sd))
    p = plan(config, gpus=4, gpu_memory_gb=1.0)
    rows = {r.name: r for r in p.rows}
    unet = sum(x.numel() for x in load_teacher(tiny_sd, weights=False).backbone.denoiser.parameters())
    assert rows["student"].trainable == rows["fake"].trainable == unet
    assert rows["student"].ema_bytes == 4 * unet and rows["fake"].ema_bytes == 0
    assert rows["fake"].optimizer_bytes == 8 * unet and rows["teacher unet"].trainable == 0
    [lora] = [b for what, b in p.alternatives if what.startswith("objective.fake_score=lora")]
    with_adapter = plan(load_config(CONFIGS / "dmd2" / "sd15.yaml", [*config_overrides(tiny_sd), "objective.fake_score=lora"]),
                        alternatives=False)
    assert lora == with_adapter.static_bytes and "fake" not in {r.name for r in with_adapter.rows}
    [half] = [b for what, b in p.alternatives if what.startswith("teacher.dtype=bfloat16")]
    frozen = sum(r.weight_bytes for r in p.rows if not r.trainable)
    assert abs(half - (p.static_bytes - frozen / 2)) < 1e3  # the frozen networks halve (not their integer buffers,
    # e.g. position ids), nothing trained changes
    text = format_plan(p)
    assert "static per process" in text and "not measured" in text and "1 GB per GPU" in text


def test_plan_cli(capsys, one_thread):
    assert main(["plan", str(CONFIGS / "tdd" / "sd15_lora.yaml"), "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "teacher unet [student]" in out and "against 24 GB per GPU" in out
    assert main(["plan", str(CONFIGS / "tdd" / "sd15_lora.yaml"), "teacher.path=nobody/nothing"]) == 2
    assert "no architecture configs are shipped" in capsys.readouterr().err
    assert main(["plan", str(CONFIGS / "tdd" / "sd15_lora.yaml"), "--gpus", "0"]) == 2
