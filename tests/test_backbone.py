"""DiffusionBackbone on a tiny real UNet: predictions, CFG, features, gradient-safe adapters."""

import pytest
import torch

from diffdistill import lora
from diffdistill.backbone import Cond, DiffusionBackbone
from diffdistill.schedule import to_x0_eps


@pytest.fixture()
def unet_backbone(tiny_sd):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffdistill.pipeline import schedule_and_prediction

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    schedule, pred = schedule_and_prediction(dict(DDPMScheduler.load_config(tiny_sd, subfolder="scheduler")))
    return DiffusionBackbone(unet, schedule, pred)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.rand(batch, generator=g) * 0.9 + 0.05,
            Cond(torch.randn(batch, 77, 32, generator=g)), Cond(torch.randn(1, 77, 32, generator=g)))


def test_outputs_are_conversions_of_the_raw_prediction(unet_backbone):
    bb = unet_backbone
    x, t, cond, _ = _inputs()
    with torch.no_grad():
        raw = bb.denoiser(x, bb.schedule.to_timestep(t).float(), encoder_hidden_states=cond.embeds).sample
        x0, eps = to_x0_eps(raw, x, t, "eps", bb.schedule)
        assert torch.allclose(bb(x, t, cond, out="eps"), raw, atol=1e-6)
        assert torch.allclose(bb(x, t, cond, out="x0"), x0, atol=1e-5)
        assert torch.allclose(bb(x, t, cond, out="flow"), eps - x0, atol=1e-5)


def test_cfg_is_diffusers_convention(unet_backbone):
    bb = unet_backbone
    x, t, cond, uncond = _inputs()
    with torch.no_grad():
        c, u = bb(x, t, cond, out="x0"), bb(x, t, uncond, out="x0")
        for scale in (1.0, 2.0, 7.5):
            assert torch.allclose(bb.cfg(x, t, cond, uncond, scale, out="x0"), u + scale * (c - u), atol=1e-4)
        assert torch.equal(bb.cfg(x, t, cond, None, 1.0), c)
    with pytest.raises(ValueError, match="needs an unconditional"):
        bb.cfg(x, t, cond, None, 3.0)


def test_cfg_on_a_guidance_embedded_unet_is_one_told_pass(unet_backbone):
    """LCM's w-conditioned UNet (time_cond_proj_dim): StableDiffusionPipeline runs no CFG branch for it and
    embeds w = scale - 1 (0 at scale 1); cfg() does the same, a scale already on the Cond is kept at scale 1."""
    from diffdistill.student import with_guidance_embedding

    bb = unet_backbone
    grown = with_guidance_embedding(bb.denoiser, 16).requires_grad_(False)
    torch.nn.init.normal_(grown.time_embedding.cond_proj.weight, std=0.5)  # make the embedding matter
    told = DiffusionBackbone(grown, bb.schedule, bb.pred_type)
    assert told.embeds_guidance and not bb.embeds_guidance
    x, t, cond, uncond = _inputs()
    with torch.no_grad():
        one = told(x, t, cond.with_guidance(1.0))
        assert torch.equal(told.cfg(x, t, cond, None, 1.0), one)  # unset at scale 1: told 1
        assert torch.equal(told.cfg(x, t, cond, uncond, 4.0), told(x, t, cond.with_guidance(4.0)))  # no CFG branch
        assert torch.equal(told.cfg(x, t, cond.with_guidance(4.0), None, 1.0), told(x, t, cond.with_guidance(4.0)))
        assert (told(x, t, cond.with_guidance(4.0)) - one).abs().max() > 1e-4


def test_prompt_latent_batch_mismatch_is_named(unet_backbone):
    x, t, _, _ = _inputs(batch=4)
    with pytest.raises(ValueError, match="batch 3 but the latents have batch 4"):
        unet_backbone(x, t, Cond(torch.randn(3, 77, 32)))
    with pytest.raises(ValueError, match=r"t has shape \(3,\)"):
        unet_backbone(x, torch.rand(3), Cond(torch.randn(4, 77, 32)))


def test_features_stop_at_the_mid_block_and_carry_gradients(unet_backbone):
    bb = unet_backbone
    x, t, cond, _ = _inputs()
    ran_up = []
    handle = bb.denoiser.up_blocks[0].register_forward_hook(lambda *a: ran_up.append(1))
    feats = bb.features(x, t, cond)
    handle.remove()
    assert list(feats) == ["down_0", "down_1", "mid"] and not ran_up
    assert feats["mid"].shape == (2, 64, 4, 4) and feats["down_0"].shape == (2, 32, 4, 4)
    feats["mid"].square().mean().backward()
    assert bb.denoiser.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    only = bb.features(x, t, cond, levels=("down_0",))
    assert list(only) == ["down_0"] and torch.allclose(only["down_0"], feats["down_0"])
    with pytest.raises(ValueError, match="unknown feature levels"):
        bb.features(x, t, cond, levels=("up_0",))


def test_adapter_switch_keeps_student_gradient(unet_backbone):
    bb = unet_backbone
    x, t, cond, _ = _inputs()
    with torch.no_grad():
        base = bb(x, t, cond)
    bb.denoiser.requires_grad_(False)
    lora.add_lora(bb.denoiser, "student", rank=4)
    lora.add_lora(bb.denoiser, "fake_score", rank=4)
    for name in ("student", "fake_score"):  # make both adapters change the output
        for p in lora.lora_parameters(bb.denoiser, name):
            torch.nn.init.normal_(p, std=0.05)
    student = list(lora.lora_parameters(bb.denoiser, "student"))
    assert all(p.requires_grad for p in student)  # peft would have frozen it when fake_score was added
    with bb.adapter("student"):
        out = bb(x, t, cond)
    with torch.no_grad(), bb.adapter(None):  # the teacher: adapters off is bit-exact to the base
        assert torch.equal(bb(x, t, cond), base)
    with torch.no_grad(), bb.adapter("fake_score"):
        assert not torch.allclose(bb(x, t, cond), out)
    assert not torch.allclose(out, base)
    out.square().mean().backward()  # after switching twice between forward and backward
    assert all(p.requires_grad for p in student)
    assert sum(p.grad.abs().sum() for p in student if p.grad is not None) > 0
    assert all(p.grad is None for p in lora.lora_parameters(bb.denoiser, "fake_score"))
    with pytest.raises(KeyError, match="no adapter 'nope'"), bb.adapter("nope"):
        pass
