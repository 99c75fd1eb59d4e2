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


# -- PCM's adversarial consistency loss ------------------------------------------------------------------------
def _pcm_adv(tiny_sd, run, grid: int = 50):
    trainer = Trainer(load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}",
                                         f"objective={{name: pcm, num_phases: 2, adv_weight: 0.5, num_ddim_timesteps: {grid}}}",
                                         "data.images=digits",
                                         "student.timesteps=[1.0, 0.5]", "student.gamma=0", "student.kind=lora",
                                         "student.lora_rank=4"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # heads and adapter away from their neutral (zero) start
        for p in (*trainer.groups["disc"].values(), *trainer.groups["student"].values()):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


def _edge_pair_logits(trainer, batch):
    """D on the student's and the target's phase-edge outputs, each moved forward to the drawn adversarial level
    (the draws of one batch, replayed), mean over heads: (fake, real), each (B,)."""
    obj = trainer.objective
    with torch.no_grad():
        b = batch()
        online, target, t_end, cond = obj.pair(b, grad=False)
        t_adv = obj.adversarial_level(b, t_end)
        fake = obj.adversarial_input(b, online, t_end, t_adv)
        real = obj.adversarial_input(b, target, t_end, t_adv)
        return (obj.adversary.head_logits(fake, t_adv, cond).mean(1), obj.adversary.head_logits(real, t_adv, cond).mean(1))


def test_pcm_adversarial_levels_lie_in_the_phase_from_its_edge(tiny_sd, tmp_path, one_thread):
    """A 4-point grid in 2 phases (grid timesteps 249, 499, 749, 999 as indices 0..3; phase 0 = indices 0, 1 with
    edge timestep 0, phase 1 = indices 2, 3 with edge 499): the level is the edge or the grid point above it,
    never the phase's top."""
    trainer = _pcm_adv(tiny_sd, tmp_path / "r", grid=4)
    obj, sched = trainer.objective, trainer.teacher.backbone.schedule
    assert [p.name for p in trainer.phases] == ["student", "disc"]
    assert trainer.phase("disc").lr == 1e-5 and trainer.phase("disc").every == 1
    assert obj.grid_ks.tolist() == [249, 499, 749, 999]
    b = trainer.micro_batch(0, batch_size=48)
    _, _, t_end, _ = obj.pair(b, grad=False)
    t_adv = obj.adversarial_level(b, t_end)
    k = sched.index_time(torch.tensor([0.0, 249.0, 499.0, 749.0]))  # timesteps 0 (edge 0), 249, 499 (edge 1), 749
    allowed = {float(k[0]): {float(k[0]), float(k[1])}, float(k[2]): {float(k[2]), float(k[3])}}
    pairs = {(float(e), float(a)) for e, a in zip(t_end, t_adv)}
    assert pairs == {(e, a) for e, levels in allowed.items() for a in levels}, pairs


def test_pcm_full_student_target_moves_only_after_student_updates(tiny_sd, tmp_path, one_thread):
    trainer = Trainer(load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={tmp_path / 'r'}",
                                         "objective={name: pcm, num_phases: 2, adv_weight: 0.5}", "data.images=digits",
                                         "student.timesteps=[1.0, 0.5]", "student.gamma=0"]))
    obj = trainer.objective
    with torch.no_grad():
        for p in trainer.groups["student"].values():
            p.add_(0.01)
    before = [p.detach().clone() for p in obj.target.backbone.denoiser.parameters()]
    obj.after_update("disc")
    assert all(torch.equal(a, p) for a, p in zip(before, obj.target.backbone.denoiser.parameters()))
    obj.after_update("student")
    assert any(not torch.equal(a, p) for a, p in zip(before, obj.target.backbone.denoiser.parameters()))


def test_noise_transition_keeps_the_marginal():
    """x_s = alpha_s x0 + sigma_s e1 moved to t: mean alpha_t x0, noise variance sigma_t^2 (both schedules)."""
    from diffdistill.schedule import FlowSchedule, VPSchedule

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    for sched in (VPSchedule(torch.cumprod(1 - betas, 0)), FlowSchedule(shift=3.0)):
        s, t = torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.5])
        x0, e1, e2 = torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 1)
        assert torch.allclose(sched.transition(sched.add_noise(x0, e1, s), s, t, e2), sched.alpha(t).view(-1, 1).float())
        e1, e2 = torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[0.0, 1.0]] * 2)  # orthogonal unit noises
        moved = sched.transition(sched.add_noise(torch.zeros(2, 2), e1, s), s, t, e2)
        assert torch.allclose((moved ** 2).sum(1), (sched.sigma(t) ** 2).float(), atol=1e-6)
        u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        assert torch.allclose(sched.training_draw(sched.training_time(u)), u)  # the DM bound's inverse


def test_pcm_a_discriminator_step_separates_targets_from_student_outputs(tiny_sd, tmp_path, one_thread):
    trainer = _pcm_adv(tiny_sd, tmp_path / "r")
    batch = lambda: trainer.micro_batch(0, batch_size=4)
    before = _edge_pair_logits(trainer, batch)
    out = trainer.phase_loss("disc", batch())
    assert set(out.terms) == {"gan_discriminator", "logits_real", "logits_fake"}
    params = list(trainer.groups["disc"].values())
    grads = torch.autograd.grad(out.total, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-2 * g)
    after = _edge_pair_logits(trainer, batch)
    margin = [float(r.mean() - f.mean()) for f, r in (before, after)]
    assert margin[1] > margin[0] + 1e-4, margin


def test_pcm_a_generator_step_raises_the_discriminator_on_its_outputs(tiny_sd, tmp_path, one_thread):
    trainer = _pcm_adv(tiny_sd, tmp_path / "r")
    batch = lambda: trainer.micro_batch(0, batch_size=4)
    before, _ = _edge_pair_logits(trainer, batch)
    out = trainer.phase_loss("student", batch())
    assert set(out.terms) == {"consistency_huber", "gan_generator"}
    consistency = fn.consistency_loss(*trainer.objective.pair(batch(), grad=False)[:2], "huber", 0.001)
    assert torch.allclose(out.total.detach(), consistency + 0.5 * out.terms["gan_generator"], rtol=1e-5)
    trainer.objective.cfg.adv_weight = 50.0  # let the GAN term lead this one step
    out = trainer.phase_loss("student", batch())
    params = list(trainer.groups["student"].values())
    grads = torch.autograd.grad(out.total, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-2 * g)
    after, _ = _edge_pair_logits(trainer, batch)
    assert after.mean() > before.mean()
