"""DMD / DMD2: the pure maths, each phase's gradients, shared-base LoRA, backward simulation, configs."""

import pytest
import torch
from test_trainer import TINY

from diffdistill.config import ConfigError, load_config
from diffdistill.objectives import functional as fn
from diffdistill.objectives.gan import Adversary
from diffdistill.trainer import Trainer


def _cfg(tiny_sd, run, *overrides):
    return load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}",
                              "objective={name: dmd2, student_every: 2}", "data.images=digits",
                              "student.timesteps=[1.0]", *overrides])


def test_dmd_gradient_and_surrogate():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    assert torch.equal(fn.dmd_gradient(x, real, real), torch.zeros_like(x, dtype=torch.float64))
    grad = fn.dmd_gradient(x, real, fake)
    expected = (fake - real).double() / (x - real).double().abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, expected)
    x.requires_grad_(True)
    fn.score_surrogate_loss(x, grad).backward()
    assert torch.allclose(x.grad.double(), grad / x.numel(), atol=1e-7)  # descent moves x along -grad
    # one descent step moves x towards the real denoiser's prediction relative to the fake one
    step = x.detach() - 0.1 * grad.float()
    assert ((step - x.detach()) * (real - fake)).sum() > 0


def test_gan_losses():
    zero = torch.zeros(4)
    assert torch.isclose(fn.gan_generator_loss(zero), torch.log(torch.tensor(2.0)))
    assert torch.isclose(fn.gan_discriminator_loss(zero, zero), 2 * torch.log(torch.tensor(2.0)))
    good = fn.gan_discriminator_loss(torch.full((4,), 3.0), torch.full((4,), -3.0))
    assert good < fn.gan_discriminator_loss(zero, zero) and fn.gan_generator_loss(torch.full((4,), 3.0)) < 0.1


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dmd2_phases_and_its_gan_component(tiny_sd, tmp_path, kind, one_thread):
    """What DMD2 is made of (each phase's contract and direction: tests/test_objectives.py)."""
    extra = ["student.kind=lora", "student.lora_rank=4", "objective.fake_score=lora"] if kind == "lora" else []
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", *extra))
    obj, groups = trainer.objective, trainer.groups
    assert [(p.name, p.modules, p.every) for p in trainer.phases] == [
        ("student", ["student"], 2), ("fake_score", ["fake_score", "disc"], 1)]
    if kind == "lora":  # shared base: one frozen network carries both adapters
        assert obj.fake.backbone is obj.student.backbone is trainer.teacher.backbone
    adv = obj.adversary  # the GAN component shared with ADD / LADD, on the fake score's bottleneck
    assert type(adv) is Adversary and adv.levels == ("mid",) and adv.loss_kind == "nonsaturating"
    assert adv.network.backbone is obj.fake.backbone and adv.network.adapter == obj.fake.adapter and not adv.conditioned
    assert set(groups["disc"]) == {f"heads.mid.{k}" for k, _ in adv.heads.heads["mid"].named_parameters()}


def test_dmd2_trains_a_full_fake_score_for_either_student_kind(tiny_sd, tmp_path, one_thread):
    """DMD2's code always trains a full fake UNet, also beside its SDXL LoRA student; 'auto' is refused."""
    from diffdistill.config import ConfigError

    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", "student.kind=lora", "student.lora_rank=4"))
    fake = trainer.objective.fake
    assert fake.adapter is None and fake.backbone.denoiser is not trainer.teacher.backbone.denoiser
    assert not any("lora" in k for k in fake.named_parameters_to_train())
    with pytest.raises(ConfigError, match="'auto' is gone"):
        _cfg(tiny_sd, tmp_path / "r", "objective.fake_score=auto")


@pytest.mark.parametrize("gamma", [1.0, 0.0, 0.5])
def test_backward_simulation_runs_the_students_own_steps(tiny_sd, tmp_path, monkeypatch, one_thread, gamma):
    """Each later input is the student's previous prediction moved as its sampler moves it: re-noised with fresh
    noise (gamma 1, DMD2), by a DDIM jump (gamma 0), or TCD's jump to floor((1 - gamma) k_next) then fresh noise up
    to the next time -- never a noised real image."""
    from diffdistill.batch import micro_batch
    from diffdistill.student import Student

    four = [1.0, 0.75, 0.5, 0.25]
    extra = [] if gamma == 1.0 else ["objective.regression_weight=0"]
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", f"student.timesteps={four}", f"student.gamma={gamma}", *extra))
    calls, real_forward = [], Student.forward

    def spy(self, x_t, t, cond, out="x0"):
        result = real_forward(self, x_t, t, cond, out)
        if self is trainer.student:
            calls.append((float(t), torch.is_grad_enabled(), x_t.detach().clone(), result.detach().clone()))
        return result

    monkeypatch.setattr(Student, "forward", spy)
    seen = set()
    sched = trainer.teacher.backbone.schedule
    for step in range(8):
        calls.clear()
        batch = micro_batch(trainer.prompts, 2, 0, step, images=trainer.images)
        x = trainer.objective.generate(batch, trainer.teacher.encode_prompt(batch.prompts), grad=True)
        k = len(calls) - 1
        seen.add(k)
        assert [c[0] for c in calls] == four[:k + 1] and [c[1] for c in calls] == [False] * k + [True]
        assert torch.equal(x.detach(), calls[-1][3])
        replay = micro_batch(trainer.prompts, 2, 0, step, images=trainer.images)
        z = replay.randn(*trainer.teacher.latent_shape)
        assert torch.equal(calls[0][2], z)  # step 0 starts from pure noise
        for i in range(1, k + 1):
            x_prev, x0_prev = calls[i - 1][2], calls[i - 1][3]
            a, s = sched.alpha(four[i - 1]), sched.sigma(four[i - 1])
            eps_prev = (x_prev.double() - a * x0_prev.double()) / s  # the noise the prediction implies
            if gamma == 1.0:
                want = sched.add_noise(x0_prev, replay.randn(*trainer.teacher.latent_shape), four[i])
            else:  # TCD's rule on diffusers timesteps k (t = 0.75 is 749): s = floor((1 - gamma) k_next)
                k_next = float(sched.to_timestep(four[i]))
                k_s = float(torch.floor(torch.tensor((1 - gamma) * k_next)))

                def bar(k_):  # alpha_bar at diffusers timestep k_
                    return float(sched.alpha(sched.from_timestep(k_))) ** 2

                want = bar(k_s) ** 0.5 * x0_prev.double() + (1 - bar(k_s)) ** 0.5 * eps_prev
                if gamma > 0:
                    keep = bar(k_next) / bar(k_s)
                    want = keep ** 0.5 * want + (1 - keep) ** 0.5 * replay.randn(*trainer.teacher.latent_shape).double()
            assert torch.allclose(calls[i][2].double(), want.double(), atol=1e-5), (gamma, i)
    assert len(seen) > 1


def test_per_step_fake_scores_each_model_one_steps_outputs(tiny_sd, tmp_path, monkeypatch, one_thread):
    from safetensors.torch import load_file

    from diffdistill.student import Student

    two = [1.0, 0.5]
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", f"student.timesteps={two}", "train.checkpoint_every=4",
                           "objective={name: dmd2, student_every: 2, fake_per_step: true, gan_weight: 0, disc_weight: 0}"))
    obj, groups = trainer.objective, trainer.groups
    first, second = obj.step_fakes
    assert first is obj.fake and obj.fake_at(0) is first and obj.fake_at(1) is second
    own = {id(p) for p in first.parameters()}
    assert not any(id(p) in own for p in second.parameters())  # two networks, not one shared
    names = first.named_parameters_to_train()
    assert set(groups["fake_score"]) == set(names) | {f"step1.{n}" for n in names}
    teacher = dict(trainer.teacher.backbone.denoiser.named_parameters())
    assert all(torch.equal(p, teacher[n]) for n, p in second.backbone.denoiser.named_parameters())  # starts as the teacher

    called, real_forward = [], Student.forward

    def spy(self, x_t, t, cond, out="x0"):
        called.append(self)
        return real_forward(self, x_t, t, cond, out)

    monkeypatch.setattr(Student, "forward", spy)
    seen = set()
    for step in range(8):
        for phase in trainer.phases:
            for group in groups.values():
                for p in group.values():
                    p.grad = None
            probe = trainer.micro_batch(step, batch_size=2)
            k = obj.generate_at_step(probe, trainer.teacher.encode_prompt(probe.prompts), grad=False)[1]
            called.clear()
            out = trainer.phase_loss(phase, trainer.micro_batch(step, batch_size=2), step)  # the same k
            fakes = [net for net in called if net is first or net is second]
            assert fakes and all(net is obj.fake_at(k) for net in fakes), (phase.name, k)
            if phase.name == "fake_score":  # only step k's fake score learns from step k's samples
                out.total.backward()
                live = {id(p) for p in obj.fake_at(k).parameters()}
                for p in groups["fake_score"].values():
                    assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in live)
            seen.add(k)
    assert seen == {0, 1}
    monkeypatch.setattr(Student, "forward", real_forward)
    trainer.run()
    saved = load_file(str(next((tmp_path / "r" / "checkpoints").glob("step-*")) / "state.safetensors"))
    assert {k for k in saved if k.startswith("param.fake_score.step1.")}  # checkpoints carry every fake score
    assert any(not torch.equal(p, teacher[n]) for n, p in second.backbone.denoiser.named_parameters())
    with pytest.raises(ConfigError, match="objective.fake_per_step"):  # adapters on one shared base: one fake score
        load_config(TINY, ["objective={name: dmd2, fake_per_step: true, fake_score: lora}", "data.images=digits",
                           "student.kind=lora"])
    with pytest.raises(ConfigError, match="objective.fake_per_step"):  # DP-DMD: DM on the final sample only
        load_config(TINY, ["objective={name: dpdmd, fake_per_step: true}", "student.gamma=0"])
    with pytest.raises(ConfigError, match="objective.dm_below_input"):  # DP-DMD: no later step's DM term to restrict
        load_config(TINY, ["objective={name: dpdmd, dm_below_input: true}", "student.gamma=0"])
    with pytest.raises(ConfigError, match="objective.later_real_guidance"):  # DP-DMD: one DM term, one guidance
        load_config(TINY, ["objective={name: dpdmd, later_real_guidance: 1.0}", "student.gamma=0"])


def test_regression_steps_first_trains_only_the_noise_to_image_map(tiny_sd, tmp_path, monkeypatch, one_thread):
    from diffdistill.batch import micro_batch
    from diffdistill.objectives.regression import Regression, RegressionConfig
    from diffdistill.student import Student

    four = [1.0, 0.75, 0.5, 0.25]
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", f"student.timesteps={four}"))
    seen, real_forward = [], Student.forward

    def spy(self, x_t, t, cond, out="x0"):
        seen.append((torch.as_tensor(t).double().flatten().tolist(), x_t.detach().clone()))
        return real_forward(self, x_t, t, cond, out)

    monkeypatch.setattr(Student, "forward", spy)
    times = {}
    for steps in ("all", "first"):
        reg = Regression(RegressionConfig(teacher_steps=2, guidance=1.5, steps=steps), trainer.teacher,
                         trainer.student, trainer.prompts)
        times[steps] = set()
        for step in range(4):
            batch = micro_batch(trainer.prompts, 4, 0, step, images=trainer.images)
            seen.clear()
            assert torch.isfinite(reg.loss("student", batch, step).total)
            (ts, x_in), = [c for c in seen if len(c[0]) == 4]  # the student call (the teacher's are per-step scalars)
            times[steps].update(ts)
            if steps == "first":  # pure noise in, the pair's own z
                replay = micro_batch(trainer.prompts, 4, 0, step, images=trainer.images)
                assert torch.equal(x_in, replay.randn(*trainer.teacher.latent_shape))
    assert times["first"] == {1.0} and len(times["all"]) > 1
    with pytest.raises(ConfigError, match="objective.regression_steps"):
        load_config(TINY, ["objective={name: dmd2, regression_steps: last}", "data.images=digits"])


def _student_losses_by_step(trainer, steps: int, record: list):
    """Run ``steps`` student-phase losses of a multi-step DMD2 run; for each batch yield its step index ``k``
    and what a spy appended to ``record`` during that loss."""
    from diffdistill.batch import micro_batch

    obj = trainer.objective
    for step in range(steps):
        probe = micro_batch(trainer.prompts, 8, 0, step, images=trainer.images)
        k = obj.generate_at_step(probe, trainer.teacher.encode_prompt(probe.prompts), grad=False)[1]
        record.clear()
        obj.loss("student", micro_batch(trainer.prompts, 8, 0, step, images=trainer.images), step)
        yield k, list(record)


def test_dm_below_input_keeps_each_later_steps_dm_term_under_its_input_time(tiny_sd, tmp_path, monkeypatch, one_thread):
    from diffdistill.student import Student

    four = [1.0, 0.75, 0.5, 0.25]
    highest, real_forward, times, fake = {}, Student.forward, [], []

    def spy(self, x_t, t, cond, out="x0"):
        if self is fake[-1]:
            times.append(torch.as_tensor(t).double().flatten())
        return real_forward(self, x_t, t, cond, out)

    for below in (False, True):
        trainer = Trainer(_cfg(tiny_sd, tmp_path / str(below), f"student.timesteps={four}",
                               f"objective={{name: dmd2, gan_weight: 0, disc_weight: 0, dm_below_input: {below}}}"))
        fake.append(trainer.objective.fake)
        monkeypatch.setattr(Student, "forward", spy)
        for k, (t,) in _student_losses_by_step(trainer, 24, times):  # the fake score's one call: the DM noise levels
            highest[below, k] = max(highest.get((below, k), 0.0), float(t.max()))
        monkeypatch.setattr(Student, "forward", real_forward)
    for k, t_k in enumerate(four):
        assert (True, k) in highest and (False, k) in highest, k
        if k:  # later steps: only noise levels below the input's time
            assert highest[True, k] < t_k < highest[False, k], (k, highest[True, k], highest[False, k])
        else:  # the first step's input is pure noise: the whole range
            assert highest[True, 0] > 0.75
    with pytest.raises(ConfigError, match="objective.dm_below_input"):
        load_config(TINY, ["objective={name: dmd2, dm_below_input: true}", "data.images=digits", "student.timesteps=[1.0]"])
    with pytest.raises(ConfigError, match="objective.dm_below_input"):  # a later step at or below min_t: no range
        load_config(TINY, ["objective={name: dmd2, dm_below_input: true, min_t: 0.5}", "data.images=digits"])


def test_later_real_guidance_sets_the_real_score_scale_of_steps_after_the_first(tiny_sd, tmp_path, monkeypatch,
                                                                                  one_thread):
    from diffdistill.backbone import DiffusionBackbone

    four = [1.0, 0.75, 0.5, 0.25]
    real_cfg, scales, teacher = DiffusionBackbone.cfg, [], []

    def spy(self, x_t, t, cond, uncond, scale, out="x0"):
        if self is teacher[-1]:
            scales.append(float(scale))
        return real_cfg(self, x_t, t, cond, uncond, scale, out)

    seen = {}
    for later in (None, 1.0):
        trainer = Trainer(_cfg(tiny_sd, tmp_path / str(later), f"student.timesteps={four}", "objective={name: dmd2, "
                               f"gan_weight: 0, disc_weight: 0, real_guidance: 2.5, later_real_guidance: {later or 'null'}}}"))
        teacher.append(trainer.teacher.backbone)
        monkeypatch.setattr(DiffusionBackbone, "cfg", spy)
        for k, (scale,) in _student_losses_by_step(trainer, 16, scales):  # the real score's one call
            seen.setdefault((later, k > 0), set()).add(scale)
        monkeypatch.setattr(DiffusionBackbone, "cfg", real_cfg)
    assert seen == {(None, False): {2.5}, (None, True): {2.5}, (1.0, False): {2.5}, (1.0, True): {1.0}}
    with pytest.raises(ConfigError, match="objective.later_real_guidance.*multi-step"):
        load_config(TINY, ["objective={name: dmd2, later_real_guidance: 1.0}", "data.images=digits",
                           "student.timesteps=[1.0]"])
    with pytest.raises(ConfigError, match="objective.later_real_guidance.*>= 1"):
        load_config(TINY, ["objective={name: dmd2, later_real_guidance: 0.5}", "data.images=digits"])


def test_dmd_configs_are_checked(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="data.images"):
        load_config(TINY, ["objective={name: dmd2}"])
    with pytest.raises(ConfigError, match="student.guidance"):  # a local teacher: caught at config load
        load_config(TINY, ["objective={name: dmd2}", "data.images=digits", "student.guidance=2.0"])
    hub = load_config(TINY, ["objective={name: dmd2}", "data.images=digits", "student.guidance=2.0",
                             "teacher.path=owner/not-downloaded"])  # a hub id: checked at set-up, once loaded
    assert hub.student.guidance == 2.0
    with pytest.raises(ConfigError, match="student.guidance"):
        Trainer(load_config(TINY, ["objective={name: dmd2}", "data.images=digits", "student.guidance=2.0",
                                   f"teacher.path={tiny_sd}", f"train.output_dir={tmp_path / 'g'}"]))
    with pytest.raises(ConfigError, match="objective.student_every"):
        load_config(TINY, ["objective={name: dmd2, student_every: 0}", "data.images=digits"])
    two = ["data.images=digits", "student.timesteps=[1.0, 0.5]", "student.gamma=0"]
    with pytest.raises(ConfigError, match="regression_steps: all"):  # later steps' pairs are fresh-noise re-noisings
        load_config(TINY, ["objective={name: dmd2, regression_weight: 0.25}", *two])
    ok = load_config(TINY, ["objective={name: dmd2, regression_weight: 0.25, regression_steps: first}", *two])
    assert ok.student.gamma == 0 and ok.objective.regression_steps == "first"
    cfg = load_config(TINY, ["objective={name: dmd}"])  # DMD: regression + DM, no GAN, 1:1 updates
    assert cfg.objective.regression_weight == 0.25 and cfg.objective.gan_weight == 0 and cfg.objective.student_every == 1


# -- DP-DMD ---------------------------------------------------------------------------------------------
def test_ddim_secant_target_lands_on_the_anchor():
    g = torch.Generator().manual_seed(0)
    noise, z = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    a0, s0 = torch.tensor([0.07, 0.07, 0.07]), torch.tensor([0.9975, 0.9975, 0.9975])
    ak, sk = torch.tensor([0.3, 0.5, 0.8]), torch.tensor([0.954, 0.866, 0.6])
    x0 = fn.ddim_secant_x0(noise, a0, s0, z, ak, sk)
    eps = (noise.double() - a0.view(-1, 1, 1, 1) * x0) / s0.view(-1, 1, 1, 1)  # DDIM keeps this eps ...
    landed = ak.view(-1, 1, 1, 1) * x0 + sk.view(-1, 1, 1, 1) * eps  # ... and moves to (a_k, s_k)
    assert torch.allclose(landed, z.double(), atol=1e-10)


def _dpdmd(tiny_sd, run, *extra):
    return Trainer(load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}",
                                      "objective={name: dpdmd, anchor_steps: 2, anchor_grid: 4, student_every: 2}",
                                      "student.timesteps=[1.0, 0.75, 0.5, 0.25]", "student.gamma=0.0", *extra]))


def test_dpdmd_rollout_is_the_sampler_and_stops_dmd_at_the_first_step(tiny_sd, tmp_path, one_thread):
    from diffdistill.batch import micro_batch
    from diffdistill.pipeline import sampling_grid
    from diffdistill.sampling import sample_ode

    trainer = _dpdmd(tiny_sd, tmp_path / "r")
    obj, teacher = trainer.objective, trainer.teacher
    assert [(p.name, p.modules, p.every) for p in trainer.phases] == [("student", ["student"], 2),
                                                                      ("fake_score", ["fake_score"], 1)]
    batch = micro_batch(trainer.prompts, 2, 0, 0)
    cond = teacher.encode_prompt(batch.prompts)
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(5))
    first, final = obj.rollout(batch, cond, grad=True, noise=noise)
    with torch.no_grad():  # the same arithmetic as the deterministic sampler the export ships (gamma 0)
        assert torch.allclose(final, trainer.student.generate(noise, cond), atol=1e-5)
    # no path from the first step's prediction to the final sample: DMD never trains the first step
    assert torch.autograd.grad(final.sum(), first, allow_unused=True)[0] is None
    assert first.requires_grad and final.requires_grad
    # the anchor: the teacher's guided ODE from the same noise, 2 steps of its 4-step grid
    grid = sampling_grid(teacher, 4)[:3]
    z = sample_ode(teacher.backbone, noise, cond, grid, uncond=teacher.empty_cond(2), guidance=3.5)
    target = obj.anchor_target(noise, cond)
    sched = teacher.backbone.schedule
    eps = (noise - sched.alpha(1.0) * target) / sched.sigma(1.0)
    assert torch.allclose(sched.alpha(grid[-1]) * target + sched.sigma(grid[-1]) * eps, z, atol=1e-4)
    # (the student phase's contract and the DM gradient's direction: tests/test_objectives.py)


def test_dpdmd_configs_are_checked(tiny_sd, tmp_path):
    base = ["objective={name: dpdmd}", "student.timesteps=[1.0, 0.5]"]
    with pytest.raises(ConfigError, match="student.gamma"):
        load_config(TINY, base)
    with pytest.raises(ConfigError, match="student.timesteps"):
        load_config(TINY, ["objective={name: dpdmd}", "student.timesteps=[1.0]", "student.gamma=0"])
    with pytest.raises(ConfigError, match="objective.anchor_steps"):
        load_config(TINY, ["objective={name: dpdmd, anchor_steps: 30}", "student.timesteps=[1.0, 0.5]", "student.gamma=0"])
    o = load_config(TINY, [*base, "student.gamma=0"]).objective  # the authors' code: no GAN, 5:1, 0.05, anchor 10/30
    assert (o.gan_weight, o.disc_weight, o.student_every, o.diversity_weight, o.anchor_steps, o.anchor_grid,
            o.real_guidance) == (0.0, 0.0, 5, 0.05, 10, 30, 3.5)
