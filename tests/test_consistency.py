"""Consistency distillation (LCM): maths against diffusers' LCMScheduler and DDIMScheduler, the phase
contract, the EMA target network, configs."""

import pytest
import torch
from test_trainer import TINY

from diffdistill.batch import micro_batch
from diffdistill.config import ConfigError, load_config
from diffdistill.objectives import functional as fn
from diffdistill.trainer import Trainer

LCM4 = [1.0, 0.76, 0.5, 0.26]  # diffusers 999, 759, 499, 259: LCMScheduler's 4 steps (original 50)


def _cfg(tiny_sd, run, *overrides):
    return load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}", "objective={name: lcm}",
                              "data.images=digits", *overrides])


def test_boundary_scalings_equal_lcm_schedulers():
    from diffusers import LCMScheduler

    sched = LCMScheduler()  # timestep_scaling 10, sigma_data 0.5: the values it samples with
    ks = torch.tensor([0, 1, 19, 279, 519, 999])
    ours = fn.lcm_boundary_scalings(ks)
    for k, c_skip, c_out in zip(ks, *ours):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(k)
        assert torch.isclose(c_skip, torch.as_tensor(ref_skip).double(), rtol=1e-6, atol=0)
        assert torch.isclose(c_out, torch.as_tensor(ref_out).double(), rtol=1e-6, atol=1e-12)
    assert ours[0][0] == 1.0 and ours[1][0] == 0.0  # f(x, 0) = x exactly
    assert ours[0][2] < 7e-6 and ours[0][3] < 4e-8  # why sampling with x0 alone matches LCMScheduler


def test_consistency_function_is_the_identity_at_timestep_zero(tiny_sd, tmp_path, one_thread):
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r"))
    obj, teacher = trainer.objective, trainer.teacher
    x = torch.randn(2, *teacher.latent_shape)
    t0 = teacher.backbone.schedule.from_timestep(torch.zeros(2))
    assert torch.equal(obj.consistency(obj.student, x, t0, t0, teacher.encode_prompt(["a", "b"])), x)
    t = teacher.backbone.schedule.from_timestep(torch.full((2,), 999.0))
    cond = teacher.encode_prompt(["a", "b"])
    assert torch.allclose(obj.consistency(obj.student, x, t, t0, cond), obj.student(x, t, cond, out="x0"), atol=1e-6)


def test_training_grid_and_teacher_step_equal_ddim(tiny_sd, tmp_path, one_thread):
    """The skipping-step solver: start times on DDIM's 50-step trailing grid, one DDIM step to the target
    time (timestep 0 below 19, where the script clamps and DDIM's final alpha is alphas_cumprod[0])."""
    from diffusers import DDIMScheduler, LCMScheduler

    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r"))
    obj, teacher = trainer.objective, trainer.teacher
    sched = teacher.backbone.schedule
    ddim = DDIMScheduler.from_config(teacher.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=False)
    ddim.set_timesteps(50)
    assert sorted(ddim.timesteps.tolist()) == obj.grid_ks.long().tolist()
    lcm = LCMScheduler.from_config(teacher.scheduler_config)
    for k in range(1, 9):  # every LCM inference grid lies on the training grid
        lcm.set_timesteps(k, original_inference_steps=50)
        assert set(lcm.timesteps.tolist()) <= set(obj.grid_ks.long().tolist())
    batch = micro_batch(trainer.prompts, 6, 0, 3)
    t_n, t_m, t_end = obj.times(batch)
    k_n, k_m = sched.to_timestep(t_n), sched.to_timestep(t_m)
    assert torch.equal(k_m, (k_n - 20).clamp_min(0)) and torch.equal(sched.to_timestep(t_end), torch.zeros(6))
    cond = teacher.encode_prompt(batch.prompts)
    x = torch.randn(len(batch), *teacher.latent_shape)
    for k in (999.0, 519.0, 19.0):
        t = sched.from_timestep(torch.full((len(batch),), k))
        t_prev = sched.from_timestep(torch.full((len(batch),), max(k - 20, 0)))
        ours = obj.teacher_step(x, t, t_prev, cond, torch.ones(len(batch)))
        eps = teacher.backbone(x, t, cond, out="eps")
        ref = ddim.step(eps, int(k), x).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5), (k, (ours - ref).abs().max())
    guided = obj.teacher_step(x, t, t_prev, cond, torch.full((len(batch),), 3.0))
    uncond = teacher.empty_cond(len(batch))
    e_u, e_c = teacher.backbone(x, t, uncond, out="eps"), teacher.backbone(x, t, cond, out="eps")
    ref = ddim.step(e_u + 3.0 * (e_c - e_u), 19, x).prev_sample
    assert torch.allclose(guided, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_target_network_is_a_gradient_free_copy_or_the_online_student(tiny_sd, tmp_path, kind, one_thread):
    """Full students: an EMA copy no optimizer trains; LoRA students (LCM-LoRA): the online student under no_grad.
    (The phase's contract and the loss against a reference step: tests/test_objectives.py.)"""
    extra = ["student.kind=lora", "student.lora_rank=4"] if kind == "lora" else []
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", *extra))
    obj = trainer.objective
    assert [(p.name, p.modules) for p in trainer.phases] == [("student", ["student"])]
    trainer.phase_loss("student", trainer.micro_batch(0)).total.backward()
    if kind == "full":
        own = {id(p) for p in obj.student.parameters()}
        assert not any(id(p) in own for p in obj.target.parameters())
        assert all(p.grad is None and not p.requires_grad for p in obj.target.parameters())
    else:
        assert obj.target is None and obj.target_net() is obj.student


def test_target_follows_the_student_by_ema(tiny_sd, tmp_path, one_thread):
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", "objective.target_decay=0.9"))
    obj = trainer.objective
    first = next(iter(obj.student.backbone.denoiser.parameters()))
    with torch.no_grad():
        first.add_(1.0)
    before = next(iter(obj.target.parameters())).detach().clone()
    obj.after_update("student")
    assert torch.allclose(next(iter(obj.target.parameters())), 0.9 * before + 0.1 * first)
    restored = Trainer(_cfg(tiny_sd, tmp_path / "r2", "objective.target_decay=0.9")).objective
    with pytest.raises(ValueError, match="no consistency target"):
        restored.load_extra_state({})
    restored.load_extra_state(obj.extra_state())
    assert torch.equal(next(iter(restored.target.parameters())), next(iter(obj.target.parameters())))


def test_configs_are_checked(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="data.images"):
        load_config(TINY, [f"teacher.path={tiny_sd}", "objective={name: lcm}"])
    with pytest.raises(ConfigError, match="w_min"):
        _cfg(tiny_sd, tmp_path, "objective.w_min=0.5")
    with pytest.raises(ConfigError, match="objective.loss"):
        _cfg(tiny_sd, tmp_path, "objective.loss=l1")
    with pytest.raises(ConfigError, match="student.timesteps.*749"):
        Trainer(_cfg(tiny_sd, tmp_path / "r", "student.timesteps=[1.0, 0.75]"))
    with pytest.raises(ConfigError, match="divide"):
        Trainer(_cfg(tiny_sd, tmp_path / "r", "objective.num_ddim_timesteps=30"))


@pytest.mark.parametrize("path, name", [("configs/demo/lcm_digits.yaml", "lcm"), ("configs/demo/pcm_digits.yaml", "pcm"),
                                        ("configs/demo/tdd_digits.yaml", "tdd"), ("configs/lcm/sd15_lora.yaml", "lcm"),
                                        ("configs/pcm/sd15_lora.yaml", "pcm"), ("configs/tdd/sd15_lora.yaml", "tdd")])
def test_shipped_configs_load(path, name):
    cfg = load_config(path)
    assert cfg.objective.name == name and cfg.student.kind == "lora"
    assert (cfg.student.gamma == 0.0) == (name == "pcm")


def test_guidance_embedding_matches_diffusers_and_starts_as_the_teacher(tiny_sd, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    from diffdistill.backbone import guidance_embedding

    w = torch.tensor([0.0, 1.5, 7.0])
    for dim in (32, 33, 256):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.allclose(guidance_embedding(w, dim), ref, atol=1e-5)
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", "student.guidance_embedding_dim=32", "student.guidance=3.0"))
    student, teacher = trainer.student, trainer.teacher
    assert student.backbone.denoiser.config.time_cond_proj_dim == 32 and student.cfg_scale == 1.0
    x, t = torch.randn(2, *teacher.latent_shape), torch.tensor([0.9, 0.3])
    cond = teacher.encode_prompt(["a", "b"])
    with torch.no_grad():
        assert torch.allclose(student(x, t, cond), teacher.backbone(x, t, cond), atol=1e-6)  # zero-initialised
        student.backbone.denoiser.time_embedding.cond_proj.weight.normal_()
        low, high = student(x, t, cond.with_guidance(1.5)), student(x, t, cond.with_guidance(8.0))
        assert (low - high).abs().max() > 1e-3  # the scale now matters
        assert torch.equal(student(x, t, cond), student(x, t, cond.with_guidance(3.0)))  # default: student.guidance
    with pytest.raises(ValueError, match="with_guidance"):
        student.backbone(x, t, cond)
    trainer.phase_loss("student", trainer.micro_batch(0)).total.backward()
    assert student.backbone.denoiser.time_embedding.cond_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="guidance_embedding_dim"):
        _cfg(tiny_sd, tmp_path, "student.kind=lora", "student.guidance_embedding_dim=32")
