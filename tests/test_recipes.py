"""Every shipped real-teacher recipe trains, with its own objective, student and precision settings, on the tiny
fixture of its teacher's family (the tiny teacher substituted for the hub id), with and without gradient
checkpointing. Only what sizes the run is overridden: the teacher path (and a resolution that fits the fixture),
two steps of batch 2 without warm-up (which would leave them at lr 0), a small teacher-sample pool, the digits
images for recipes that train on images, a tiny DINOv2 for ADD's pixel discriminator, random LPIPS weights, no prompt minimum (the example
prompt file has 16 lines), no stage-1 checkpoint to start from."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_plan import CONFIGS, REAL

from diffdistill.config import load_config
from diffdistill.trainer import Trainer

FIXTURE = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "tiny_sd",
    "stabilityai/stable-diffusion-2-1-base": "tiny_sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "tiny_sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "tiny_sd3",
    "black-forest-labs/FLUX.1-dev": "tiny_flux",
}


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> str:
    """A tiny DINOv2 folder, standing in for facebook/dinov2-small (ADD's pixel discriminator network)."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=7)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def random_lpips(tmp_path_factory) -> str:
    """Random LPIPS-VGG weights, standing in for the converted real ones."""
    from safetensors.torch import save_model

    from diffdistill.perceptual import build_lpips

    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    save_model(build_lpips(), str(path))
    return str(path)


def _overrides(config, fixture: str, run, checkpointing: bool, dinov2: str, lpips: str) -> list[str]:
    out = [f"teacher.path={fixture}", f"train.output_dir={run}", "train.max_steps=2", "train.batch_size=2",
           "train.checkpoint_every=2", "train.sample_every=1000", "data.min_prompts=0", "train.init_from=null",
           "train.lr_warmup_steps=0",
           f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    if config.teacher.resolution is not None:
        out.append("teacher.resolution=16")
    if config.data.images is not None:
        out.append("data.images=digits")
    if "lpips" in (getattr(config.objective, "loss", None), getattr(config.objective, "regression_loss", None)):
        out.append(f"objective.lpips_weights={lpips}")
    if getattr(config.objective, "disc_network", "teacher").startswith("dinov2:"):
        out.append(f"objective.disc_network='dinov2:{dinov2}'")
    for key, small in (("num_pairs", 4), ("teacher_steps", 2)):
        if hasattr(config.objective, key):
            out.append(f"objective.{key}={small}")
    return out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("name", REAL)
def test_shipped_recipe_trains_on_its_family_fixture(request, tmp_path, name, checkpointing, tiny_dinov2, random_lpips,
                                                     one_thread):
    shipped = load_config(CONFIGS / name)
    fixture = request.getfixturevalue(FIXTURE[shipped.teacher.path])
    config = load_config(CONFIGS / name, _overrides(shipped, fixture, tmp_path / "run", checkpointing, tiny_dinov2,
                                                     random_lpips))
    trainer = Trainer(config)
    assert trainer.teacher.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[shipped.teacher.dtype]
    trained = [p for group in trainer.groups.values() for p in group.values()]
    assert all(p.dtype == torch.float32 for p in trained)
    ids = {id(p) for p in trained}
    nets = [m for m in trainer.objective.modules() if getattr(m, "_supports_gradient_checkpointing", False)
            and any(id(p) in ids for p in m.parameters())]  # every diffusers network a phase trains
    assert nets and all(m.is_gradient_checkpointing == checkpointing for m in nets)
    before = {id(p): p.detach().clone() for p in trained}
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and not any(r.get("skipped") for r in records)
    assert all(math.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float) and k != "grad_norm")
    moved = {g for g, group in trainer.groups.items() if any(not torch.equal(p, before[id(p)]) for p in group.values())}
    assert "student" in moved
