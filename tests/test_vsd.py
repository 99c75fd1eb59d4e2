"""Variational score distillation (SwiftBrush, SNOOPI): the maths, each phase's gradients, the guidance
draws, the fake score's kinds (shared with DMD2), configs; NASA's negative-prompt attention."""

import pytest
import torch
from test_trainer import TINY

from diffdistill.batch import micro_batch
from diffdistill.config import ConfigError, load_config
from diffdistill.objectives import functional as fn
from diffdistill.schedule import VPSchedule
from diffdistill.trainer import Trainer


def _cfg(tiny_sd, run, *overrides):
    return load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}", "student.timesteps=[1.0]",
                              *overrides])


def test_vsd_gradient_is_weighted_eps_difference_and_points_like_dmd():
    g = torch.Generator().manual_seed(0)
    from diffusers import DDPMScheduler

    sched = VPSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x0, eps, x0_real, x0_fake = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    x_t = sched.add_noise(x0, eps, t)
    eps_real = sched.convert(x0_real, x_t, t, "x0", "eps")
    eps_fake = sched.convert(x0_fake, x_t, t, "x0", "eps")
    sigma2 = sched.sigma(t) ** 2
    grad = fn.vsd_gradient(eps_real, eps_fake, sigma2)
    assert torch.allclose(grad, sigma2.view(-1, 1, 1, 1) * (eps_real - eps_fake))  # ProlificDreamer eq. 9, w = sigma^2
    # = sigma_t * alpha_t * (x0_fake - x0_real): DMD's direction (x0_fake - x0_real), another per-t weighting
    a, s = sched.alpha(t).view(-1, 1, 1, 1), sched.sigma(t).view(-1, 1, 1, 1)
    assert torch.allclose(grad, s * a * (x0_fake - x0_real))
    dmd = fn.dmd_gradient(x0, x0_real, x0_fake)
    assert torch.allclose(grad / (s * a), dmd * (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True))
    # the surrogate's gradient w.r.t. the generator output is grad / numel; nothing flows into the scores
    x = x0.float().requires_grad_(True)
    fn.score_surrogate_loss(x, grad).backward()
    assert torch.allclose(x.grad.double(), grad / x.numel(), atol=1e-9)


def test_weighted_denoising_loss():
    g = torch.Generator().manual_seed(1)
    pred, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    w = torch.tensor([0.25, 1.0])
    # SwiftBrush's LoRA loss: mse(sqrt(a) pred, sqrt(a) eps)
    ref = torch.nn.functional.mse_loss(w.sqrt().view(-1, 1, 1, 1) * pred, w.sqrt().view(-1, 1, 1, 1) * eps)
    assert torch.allclose(fn.denoising_loss(pred, eps, weight=w), ref)
    assert torch.allclose(fn.denoising_loss(pred, eps), torch.nn.functional.mse_loss(pred, eps))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_vsd_phases_and_its_lora_teacher(tiny_sd, tmp_path, kind, one_thread):
    """What SwiftBrush is made of (each phase's contract and direction: tests/test_objectives.py)."""
    extra = ["student.kind=lora", "student.lora_rank=4"] if kind == "lora" else []
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", "objective={name: swiftbrush, fake_lora_rank: 4}", *extra))
    obj, teacher = trainer.objective, trainer.teacher
    assert [(p.name, p.modules, p.every, p.lr) for p in trainer.phases] == [
        ("student", ["student"], 1, None), ("fake_score", ["fake_score"], 1, 1e-3)]
    assert trainer.optimizers["fake_score"].param_groups[0]["lr"] == 1e-3
    assert trainer.optimizers["student"].param_groups[0]["lr"] == trainer.cfg.train.lr
    # the LoRA teacher is an adapter on the teacher's frozen network, whatever the student's kind
    assert obj.fake.backbone is teacher.backbone and obj.fake.adapter == "fake_score"
    assert teacher.backbone.denoiser.peft_config["fake_score"].r == 4
    assert sorted(teacher.backbone.denoiser.peft_config["fake_score"].target_modules) == ["to_q", "to_v"]


@pytest.mark.parametrize("objective,fake_cfg", [("swiftbrush", True), ("snoopi", True), ("swiftbrush", False)])
def test_guidance_of_teacher_and_lora_teacher(tiny_sd, tmp_path, monkeypatch, objective, fake_cfg, one_thread):
    from diffdistill import lora

    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", f"objective={{name: {objective}, fake_lora_rank: 4, "
                                                    f"fake_cfg: {str(fake_cfg).lower()}}}"))
    backbone, calls = trainer.teacher.backbone, []
    real_cfg = type(backbone).cfg

    def spy(self, x_t, t, cond, uncond, scale, out="x0"):
        calls.append((lora.current(self.denoiser), torch.as_tensor(scale).clone(), uncond is not None))
        return real_cfg(self, x_t, t, cond, uncond, scale, out=out)

    monkeypatch.setattr(type(backbone), "cfg", spy)
    batch = micro_batch(trainer.prompts, 64, 0, 0)
    trainer.objective.loss("student", batch, 0)
    (who_real, w_real, has_u), (who_fake, w_fake, fake_u) = calls
    assert who_real is None and who_fake == "fake_score" and has_u
    if objective == "snoopi":  # one random scale per sample from U(0.5, 4), the same for both teachers
        assert 0.5 <= float(w_real.min()) and float(w_real.max()) <= 4.0 and float(w_real.std()) > 0.5
    else:  # SwiftBrush: fixed 4.5
        assert torch.all(w_real == 4.5)
    if fake_cfg:
        assert fake_u and torch.equal(w_real, w_fake)
    else:  # ProlificDreamer's unguided LoRA teacher
        assert not fake_u and float(w_fake) == 1.0


def test_lora_teacher_learns_an_unconditional_branch(tiny_sd, tmp_path, monkeypatch, one_thread):
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", "objective={name: swiftbrush, fake_lora_rank: 4, "
                                                    "fake_empty_prompt_prob: 0.5}"))
    seen = []
    encode = trainer.teacher.encode_prompt
    monkeypatch.setattr(trainer.teacher, "encode_prompt", lambda prompts: seen.append(list(prompts)) or encode(prompts))
    batch = micro_batch(trainer.prompts, 32, 0, 0)
    trainer.objective.loss("fake_score", batch, 0)
    sampled, trained = seen  # the student samples from the full prompts; the LoRA teacher sees some dropped
    assert "" not in sampled and 5 < trained.count("") < 27
    assert all(t in ("", p) for t, p in zip(trained, sampled))


def test_fake_score_kinds_shared_with_dmd2(tiny_sd, tmp_path, one_thread):
    common = ["data.images=digits"]
    # full student + adapter fake score on the teacher's frozen network
    t1 = Trainer(_cfg(tiny_sd, tmp_path / "a", "objective={name: dmd2, fake_score: lora, fake_lora_rank: 4}", *common))
    assert t1.objective.fake.backbone is t1.teacher.backbone and t1.objective.fake.adapter == "fake_score"
    assert t1.teacher.backbone.denoiser.peft_config["fake_score"].r == 4
    # LoRA student + full copy: the copy carries no adapter (neither the student's nor its own)
    t2 = Trainer(_cfg(tiny_sd, tmp_path / "b", "objective={name: dmd2, fake_score: full}", "student.kind=lora",
                      "student.lora_rank=4", *common))
    fake = t2.objective.fake
    assert fake.adapter is None and fake.backbone is not t2.teacher.backbone
    assert not any("lora" in k for k in fake.named_parameters_to_train())
    assert all(p.requires_grad for p in fake.named_parameters_to_train().values())
    x = torch.randn(1, *t2.teacher.latent_shape)
    cond = t2.teacher.encode_prompt(["a digit 3"])
    with t2.teacher.backbone.adapter(None):
        assert torch.allclose(fake(x, 0.5, cond), t2.teacher.backbone(x, 0.5, cond), atol=1e-5)
    # auto (the default) keeps DMD2's pairing: a copy for a full student
    t3 = Trainer(_cfg(tiny_sd, tmp_path / "c", "objective={name: dmd2}", *common))
    assert t3.objective.fake.adapter is None


def test_vsd_configs_are_checked(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="student.guidance"):  # checked at set-up, with the student built
        Trainer(load_config(TINY, ["objective={name: swiftbrush}", "student.guidance=2.0", f"teacher.path={tiny_sd}",
                                   f"train.output_dir={tmp_path / 'g'}"]))
    # backward simulation follows the student's sampler, so a deterministic multi-step student is accepted
    assert load_config(TINY, ["objective={name: snoopi}", "student.timesteps=[1.0, 0.5]", "student.gamma=0"]).student.gamma == 0
    with pytest.raises(ConfigError, match="objective.guidance_min"):
        load_config(TINY, ["objective={name: snoopi, guidance_min: 5.0}"])
    with pytest.raises(ConfigError, match="objective.fake_cfg"):
        load_config(TINY, ["objective={name: swiftbrush, fake_empty_prompt_prob: 0.0}"])
    with pytest.raises(ConfigError, match="objective.fake_score"):
        load_config(TINY, ["objective={name: swiftbrush, fake_score: copy}"])
    with pytest.raises(ConfigError, match="objective.fake_lr"):
        load_config(TINY, ["objective={name: swiftbrush, fake_lr: 0}"])
    cfg = load_config(TINY, ["objective={name: snoopi}"])  # SNOOPI: U(0.5, 4), LoRA rank 64 / alpha 128, lr 1e-3
    o = cfg.objective
    assert (o.guidance_min, o.guidance_max, o.fake_lora_rank, o.fake_lora_alpha, o.fake_lr) == (0.5, 4.0, 64, 128.0, 1e-3)
    o = load_config(TINY, ["objective={name: swiftbrush}"]).objective
    assert (o.guidance_min, o.guidance_max, o.fake_lora_alpha, o.fake_score) == (4.5, 4.5, 108.0, "lora")


def test_the_lora_teacher_learns_the_unconditional_branch_it_is_queried_with(tiny_sdxl, tmp_path, monkeypatch,
                                                                              one_thread):
    """SDXL's force_zeros_for_empty_prompt: CFG's unconditional branch is zeros, not encode(""). A caption dropped
    for the LoRA teacher's training must be that same branch (Teacher.encode_captions)."""
    from diffdistill.student import Student

    trainer = Trainer(_cfg(tiny_sdxl, tmp_path / "r", "objective={name: swiftbrush, fake_lora_rank: 4, "
                                                      "fake_empty_prompt_prob: 0.5}"))
    teacher, obj = trainer.teacher, trainer.objective
    assert teacher.encode_prompt([""]).embeds.abs().sum() > 0 and not teacher.empty_cond(1).embeds.any()
    seen, forward = [], Student.forward

    def spy(self, x_t, t, cond, out="x0"):
        if self is obj.fake and torch.is_grad_enabled():
            seen.append(cond)
        return forward(self, x_t, t, cond, out)

    monkeypatch.setattr(Student, "forward", spy)
    batch = micro_batch(trainer.prompts, 16, 0, 0)
    trainer.phase_loss("fake_score", batch)
    replay = micro_batch(trainer.prompts, 16, 0, 0)
    replay.randn(*teacher.latent_shape)  # the student's noise, then t and eps: the draws before the captions'
    replay.rand(), replay.randn(*teacher.latent_shape)
    dropped = [c == "" for c in replay.drop_captions(replay.prompts, 0.5)]
    (cond,) = seen
    assert 0 < sum(dropped) < 16
    for i, d in enumerate(dropped):
        assert torch.equal(cond.select(i).embeds, teacher.empty_cond(1).embeds) == d, i
