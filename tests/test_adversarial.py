"""Adversarial distillation (LADD, ADD) and the GAN component shared with DMD2: loss signs and gradients,
R1, the heads' conditioning, each phase's gradients, the student's timesteps and inputs, configs."""

import pytest
import torch
from test_trainer import TINY

from diffdistill.batch import micro_batch
from diffdistill.config import ConfigError, load_config
from diffdistill.nets import DiscriminatorHead, FeatureDiscriminator
from diffdistill.objectives import functional as fn
from diffdistill.trainer import Trainer


def _cfg(tiny_sd, run, objective="{name: ladd, num_pairs: 4, teacher_steps: 2}", *overrides):
    return load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}", f"objective={objective}",
                              "student.timesteps=[1.0, 0.75, 0.5, 0.25]", *overrides])


def test_hinge_losses_have_the_right_signs_and_gradients():
    real = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    fake = torch.tensor([-2.0, 0.5, 1.0], requires_grad=True)
    d = fn.hinge_discriminator_loss(real, fake)
    assert torch.isclose(d, torch.tensor((0 + 0.5 + 2) / 3 + (0 + 1.5 + 2) / 3))
    d.backward()
    # confident-and-right logits (beyond the margin) get no gradient; the others are pushed the right way
    assert torch.equal(real.grad, torch.tensor([0.0, -1 / 3, -1 / 3]))  # descent raises D(real)
    assert torch.equal(fake.grad, torch.tensor([0.0, 1 / 3, 1 / 3]))    # descent lowers D(fake)
    fake.grad = None
    fn.hinge_generator_loss(fake).backward()
    assert torch.equal(fake.grad, torch.full((3,), -1 / 3))  # the generator raises D(fake)
    # both GAN kinds agree on the direction: a better discriminator has a lower loss
    good, bad = (torch.full((4,), 3.0), torch.full((4,), -3.0)), (torch.zeros(4), torch.zeros(4))
    assert fn.hinge_discriminator_loss(*good) < fn.hinge_discriminator_loss(*bad)
    assert fn.gan_discriminator_loss(*good) < fn.gan_discriminator_loss(*bad)


def test_r1_penalties_on_a_linear_discriminator():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, requires_grad=True)
    x = torch.randn(5, 4, 3, generator=g, requires_grad=True)
    logits = (x * w).sum(dim=(1, 2))  # D(x) = <w, x>: grad_x D = w for every sample
    r1 = fn.r1_penalty(logits, x)
    assert torch.isclose(r1, w.detach().pow(2).sum())
    r1.backward()  # differentiable: d/dw ||w||^2 = 2w
    assert torch.allclose(w.grad, 2 * w.detach())
    n = torch.randn(5, 4, 3, generator=g)
    shifted = ((x.detach() + 0.1 * n) * w.detach()).sum(dim=(1, 2))
    approx = fn.approx_r1_penalty(logits.detach(), shifted)
    assert torch.isclose(approx, (0.1 * (n * w.detach()).sum(dim=(1, 2))).pow(2).mean())


def test_add_distillation_loss_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    c = torch.tensor([0.2, 0.9], dtype=torch.float64)
    loss = fn.add_distillation_loss(x, target, c)
    loss.backward()
    assert torch.allclose(x.grad, 2 * c.float().view(-1, 1, 1, 1) * (x - target).detach() / x.numel())
    assert target.grad is None  # the teacher's prediction is a constant
    assert fn.add_distillation_loss(x, x.detach(), c) == 0


def test_projection_head_is_neutral_at_init_and_reads_its_condition():
    torch.manual_seed(0)
    head = DiscriminatorHead(8, 8, cond_dim=5)
    f, c = torch.randn(3, 8, 8, 8), torch.randn(3, 5)
    assert torch.equal(head(f, c), torch.zeros(3))
    torch.nn.init.normal_(head.project.weight)
    a, b = head(f, c), head(f, -c)
    assert not torch.allclose(a, b)  # the logit depends on the condition ...
    assert torch.allclose(a + b, 2 * head.out(head.body(f).mean(dim=(2, 3), keepdim=True)).flatten())  # ... linearly
    with pytest.raises(ValueError, match="conditioned"):
        head(f)
    multi = FeatureDiscriminator({"down_0": (8, 8), "mid": (16, 2)})
    assert multi({"down_0": f, "mid": torch.randn(3, 16, 2, 2)}).shape == (3, 2)


@pytest.mark.parametrize("name,kind", [("ladd", "lora"), ("add", "full")])
def test_adversarial_phases_and_their_discriminator(tiny_sd, tmp_path, name, kind, one_thread):
    """What LADD / ADD are made of (each phase's contract and direction: tests/test_objectives.py)."""
    objective = {"ladd": "{name: ladd, num_pairs: 4, teacher_steps: 2}", "add": "{name: add}"}[name]
    extra = ["student.kind=lora", "student.lora_rank=4"] if kind == "lora" else []
    extra += ["data.images=digits"] if name == "add" else []
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", objective, *extra))
    obj = trainer.objective
    assert [(p.name, p.modules, p.every) for p in trainer.phases] == [("student", ["student"], 1), ("disc", ["disc"], 1)]
    net = obj.adversary.network  # the frozen teacher's features
    assert net.backbone is trainer.teacher.backbone and net.adapter is None
    assert obj.adversary.levels == ("down_0", "down_1", "mid") and obj.adversary.loss_kind == "hinge"
    assert obj.adversary.conditioned and obj.adversary.r1 == ("exact" if name == "add" else "none")


def test_add_with_a_dinov2_discriminator_on_decoded_images(tiny_sd, tmp_path, one_thread):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    image_size=28, patch_size=7))
    dino.save_pretrained(tmp_path / "dino")  # a local folder, as a user's downloaded facebook/dinov2-small
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", f"{{name: add, disc_network: 'dinov2:{tmp_path / 'dino'}'}}",
                           "data.images=digits", "student.timesteps=[1.0]"))
    adv = trainer.objective.adversary
    assert adv.levels == ("layer_1", "layer_2") and type(adv.network).__name__ == "PixelFeatures"
    frozen = {k: p.detach().clone() for k, p in adv.network.model.named_parameters()}
    for step, phase in enumerate(trainer.phases * 2):
        for group in trainer.groups.values():
            for p in group.values():
                p.grad = None
        out = trainer.phase_loss(phase, trainer.micro_batch(step, batch_size=2), step)
        out.total.backward()
        if step >= 2:  # heads no longer neutral: the student learns through DINOv2 and the VAE decoder
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.groups[phase.modules[0]].values())
        if phase.name == "disc" and step >= 2:
            assert out.terms["r1"] > 0  # exact R1 on the pixels DINOv2 sees
        trainer.optimizers[phase.name].step()
    assert all(p.grad is None and torch.equal(frozen[k], p) for k, p in adv.network.model.named_parameters())
    with pytest.raises(ConfigError, match="disc_network"):
        load_config(TINY, ["objective={name: add, disc_network: dino}", "data.images=digits"])


def test_student_timesteps_and_inputs(tiny_sd, tmp_path, monkeypatch, one_thread):
    from diffdistill.student import Student

    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r"))
    obj = trainer.objective
    ks = torch.cat([obj.student_times(micro_batch(trainer.prompts, 50, 0, s)) for s in range(40)])
    freq = torch.bincount(ks, minlength=4).double() / len(ks)
    assert torch.allclose(freq, torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64), atol=0.03)  # LADD
    obj.cfg.first_step_prob = None
    ks = torch.cat([obj.student_times(micro_batch(trainer.prompts, 50, 0, s)) for s in range(40)])
    assert torch.allclose(torch.bincount(ks).double() / len(ks), torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)

    seen = []
    monkeypatch.setattr(Student, "__call__", lambda self, x, t, cond, out="x0": seen.append((x, t)) or x)
    batch = micro_batch(trainer.prompts, 64, 0, 0)
    x0 = torch.randn(64, *trainer.teacher.latent_shape)
    k = obj.student_times(micro_batch(trainer.prompts, 64, 0, 0))
    obj.student_sample(batch, x0, None, grad=False)
    x_in, t = seen[0]
    eps = micro_batch(trainer.prompts, 64, 0, 0)
    eps.rand()  # the same draws as student_sample: the timestep, then the noise
    eps = eps.randn(*x0.shape[1:])
    sched = trainer.teacher.backbone.schedule
    assert torch.equal(t, torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)[k])
    first = k == 0
    assert first.any() and (~first).any()
    assert torch.equal(x_in[first], eps[first])  # the first step starts from pure noise, as the sampler does
    assert torch.allclose(x_in[~first], sched.add_noise(x0, eps, t)[~first])  # later ones: data noised at s_k


def test_adversarial_configs_are_checked(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="data.images"):  # ADD trains on real images
        load_config(TINY, ["objective={name: add}"])
    with pytest.raises(ConfigError, match="student.guidance"):  # checked at set-up, with the student built
        Trainer(load_config(TINY, ["objective={name: ladd}", "student.guidance=2.0", f"teacher.path={tiny_sd}",
                                   f"train.output_dir={tmp_path / 'g'}"]))
    with pytest.raises(ConfigError, match="student.gamma"):
        load_config(TINY, ["objective={name: ladd}", "student.gamma=0"])
    with pytest.raises(ConfigError, match="objective.r1"):
        load_config(TINY, ["objective={name: ladd, r1: r2}"])
    with pytest.raises(ConfigError, match="objective.first_step_prob"):
        load_config(TINY, ["objective={name: ladd, first_step_prob: 0}"])
    ladd = load_config(TINY, ["objective={name: ladd}"]).objective  # LADD's published choices
    assert (ladd.data, ladd.loss, ladd.disc_noise, ladd.disc_t_mean, ladd.disc_t_std, ladd.first_step_prob,
            ladd.distill_weight) == ("teacher", "hinge", "logit_normal", 1.0, 1.0, 0.7, 0.0)
    add = load_config(TINY, ["objective={name: add}", "data.images=digits"]).objective  # ADD's
    assert (add.data, add.r1, add.r1_weight, add.distill_weight, add.first_step_prob) == ("images", "exact", 1e-5, 2.5, None)


def test_discriminator_noise_levels(one_thread):
    """LADD's logit-normal times t = sigmoid(m + s n) from each sample's own draw; DMD2's uniform U[lo, hi)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from diffdistill.objectives.gan import DenoiserFeatures
    from diffdistill.schedule import VPSchedule

    sched = VPSchedule.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    backbone = SimpleNamespace(schedule=sched)
    x = torch.zeros(400, 4, 2, 2)
    _, t = DenoiserFeatures(backbone, None, ("mid",), ("logit_normal", 1.0, 1.0)).prepare(micro_batch(["p"], 400, 0, 3), x)
    n = micro_batch(["p"], 400, 0, 3).randn()
    assert torch.allclose(t, torch.sigmoid(1.0 + n.double()))
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.03  # shifted to high noise
    _, t = DenoiserFeatures(backbone, None, ("mid",), ("uniform", 0.0, 0.5)).prepare(micro_batch(["p"], 400, 0, 3), x)
    assert torch.allclose(t, 0.5 * micro_batch(["p"], 400, 0, 3).rand().double()) and t.max() < 0.5
