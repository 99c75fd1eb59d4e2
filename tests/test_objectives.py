"""Every registered objective, through one contract suite and through direction-of-learning tests (DESIGN §4).

The contract (per objective x student kind x teacher family): each phase's loss is finite and has exactly its
named terms, the total is the documented weighted sum of those terms, gradients reach that phase's modules and
no others, a short run never changes the teacher's weights, and (on SD1.5, for both student kinds: checkpoints
hold the same groups on every family) a checkpoint restores every trained tensor. A
new objective gets it by being registered and given a row in ``CASES`` / ``TERMS`` / ``TOTALS``.

Direction of learning: for every objective and phase, a situation whose right answer is known, checked by value
or by sign against references written here from the papers and the official code (tables below, as data), so
that swapping two arguments at an objective's call site, flipping a sign or moving a time index by one fails:

* DM gradient (DMD, DMD2, DP-DMD): d loss / d x = (x0_fake - x0_real) / mean|x - x0_real| / numel, with x0_real
  the guided teacher and x0_fake the fake score at the *same* noised sample, identified here independently of
  the objective; descent moves x along x0_real - x0_fake, and not at all when the two scores agree.
* VSD (SwiftBrush, SNOOPI): d loss / d x = sigma_t^2 (eps_teacher - eps_lora) / numel.
* fake score (all score distillation): it is fitted to the student's own samples: its input is the student's
  sample noised with the very noise its loss targets, weighted as the paper says; one step lowers that error.
* GAN (DMD2, LADD, ADD): a discriminator step widens D(real) - D(fake) on independently computed real latents and
  student samples; a generator step raises D(student sample).
* ADD's distillation term and regression: d loss / d x pulls x to the teacher's x0 with the paper's weighting.
* consistency (LCM, PCM, TDD): the loss equals a hand-written reference step (diffusers' LCM script: the target
  network one DDIM step *below* the start, on the guided teacher's DDIM step), and PCM's phase edges and TDD's
  target timesteps equal the official code's rules for a table of cases.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_trainer import TINY

from diffdistill import lora
from diffdistill.backbone import DiffusionBackbone
from diffdistill.config import load_config
from diffdistill.export import read_recipe
from diffdistill.objectives import OBJECTIVES
from diffdistill.objectives import functional as fn
from diffdistill.student import Student
from diffdistill.trainer import Trainer

# -- the registry's rows ------------------------------------------------------------------------------------------
# the smallest run of each objective (one config file; only teacher.path and the student's kind change)
CASES = {
    "regression": [],
    "dmd": ["objective={name: dmd, teacher_steps: 2, num_pairs: 4}", "student.timesteps=[1.0]"],
    "dmd2": ["objective={name: dmd2, student_every: 1}", "data.images=digits", "student.timesteps=[1.0]"],
    "dpdmd": ["objective={name: dpdmd, anchor_steps: 2, anchor_grid: 4, student_every: 1}", "student.gamma=0"],
    "lcm": ["objective={name: lcm}", "data.images=digits"],
    "pcm": ["objective={name: pcm, num_phases: 1}", "data.images=digits", "student.timesteps=[1.0]",
            "student.gamma=0"],
    "tdd": ["objective={name: tdd, min_steps: 1, max_steps: 2}", "data.images=digits", "student.timesteps=[1.0]",
            "student.gamma=0"],  # gamma-sampling (0 < gamma < 1) has no stock flow scheduler to export to
    "swiftbrush": ["objective={name: swiftbrush, fake_lora_rank: 4}", "student.timesteps=[1.0]"],
    "snoopi": ["objective={name: snoopi, fake_lora_rank: 4}", "student.timesteps=[1.0]"],
    "ladd": ["objective={name: ladd, num_pairs: 4, teacher_steps: 2}"],  # heads on each backbone's features
    "add": ["objective={name: add, r1: approx}", "data.images=digits", "student.timesteps=[1.0]"],
}
GAN_TERMS = {"gan_discriminator", "logits_real", "logits_fake"}
SCORE = {"student": {"vsd_loss", "vsd_grad_norm", "guidance"}, "fake_score": {"fake_denoising"}}
CONSISTENCY = {"student": {"consistency_huber"}}
TERMS = {  # each phase's named terms, exactly
    "regression": {"student": {"regression_mse"}},
    "dmd": {"student": {"dm_loss", "dm_grad_norm", "regression_mse"}, "fake_score": {"fake_denoising"}},
    "dmd2": {"student": {"dm_loss", "dm_grad_norm", "gan_generator"}, "fake_score": {"fake_denoising", *GAN_TERMS}},
    "dpdmd": {"student": {"dm_loss", "dm_grad_norm", "diversity_mse"}, "fake_score": {"fake_denoising"}},
    "lcm": CONSISTENCY, "pcm": CONSISTENCY, "tdd": CONSISTENCY, "swiftbrush": SCORE, "snoopi": SCORE,
    "ladd": {"student": {"gan_generator"}, "disc": GAN_TERMS},
    "add": {"student": {"gan_generator", "distillation"}, "disc": {*GAN_TERMS, "r1"}},
}
TOTALS = {  # the total as a weighted sum of terms: term -> 1 or the objective config key of its weight
    "regression": {"student": {"regression_mse": 1}},
    "dmd": {"student": {"dm_loss": 1, "regression_mse": "regression_weight"}, "fake_score": {"fake_denoising": 1}},
    "dmd2": {"student": {"dm_loss": 1, "gan_generator": "gan_weight"},
             "fake_score": {"fake_denoising": 1, "gan_discriminator": "disc_weight"}},
    "dpdmd": {"student": {"dm_loss": 1, "diversity_mse": "diversity_weight"}, "fake_score": {"fake_denoising": 1}},
    "lcm": {"student": {"consistency_huber": 1}}, "pcm": {"student": {"consistency_huber": 1}},
    "tdd": {"student": {"consistency_huber": 1}},
    "swiftbrush": {"student": {"vsd_loss": 1}, "fake_score": {"fake_denoising": 1}},
    "snoopi": {"student": {"vsd_loss": 1}, "fake_score": {"fake_denoising": 1}},
    "ladd": {"student": {"gan_generator": 1}, "disc": {"gan_discriminator": 1}},
    "add": {"student": {"gan_generator": 1, "distillation": "distill_weight"},
            "disc": {"gan_discriminator": 1, "r1": "r1_weight"}},
}
# teacher families (tiny SD1.5, SD2.1-v, SDXL, SD3, FLUX.1-dev fixtures) x student kinds
FAMILIES = [(family, kind) for family in ("tiny_sd", "tiny_sd_v", "tiny_sdxl", "tiny_sd3", "tiny_flux")
            for kind in ("full", "lora")]
SIZE = {"tiny_flux": ["teacher.resolution=16"]}  # FLUX has no native size in its config (the pipeline's 1024 px)
# consistency students sample on the solver grid, which on a flow teacher is the scheduler's shifted training
# sigmas: TINY's t = 0.5 is not on it (index 249 at SD3's shift 3); 0.75 is (index 499), and t = 1 always is
GRID = {("tiny_sd3", "lcm"): ["student.timesteps=[1.0, 0.75]"], ("tiny_flux", "lcm"): ["student.timesteps=[1.0]"]}
LORA = ["student.kind=lora", "student.lora_rank=4"]
# LoRA students of the DMD family run with the shared-base fake score (full students cover the fake-score copy)
LORA_FAKE = {name: ["objective.fake_score=lora"] for name in ("dmd", "dmd2", "dpdmd")}


def test_every_registered_objective_has_a_contract_row():
    assert set(CASES) == set(OBJECTIVES) == set(TERMS) == set(TOTALS)


def _trainer(path, run, name, kind="full", *extra, family="tiny_sd") -> Trainer:
    cfg = load_config(TINY, [f"teacher.path={path}", f"train.output_dir={run}", "train.max_steps=2",
                             "train.checkpoint_every=2", "train.sample_every=1000", "train.lr=1e-2", *CASES[name],
                             *(LORA + LORA_FAKE.get(name, []) if kind == "lora" else []), *SIZE.get(family, []), *GRID.get((family, name), []),
                             *extra])
    return Trainer(cfg)


def _clear_grads(trainer) -> None:
    for group in trainer.groups.values():
        for p in group.values():
            p.grad = None


@torch.no_grad()
def _perturb(params, scale: float = 0.05, seed: int = 0) -> None:
    """Move parameters off a neutral start (zero-initialised heads, LoRA B matrices, a fake score equal to the
    teacher) so that gradients pass through them."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(scale * torch.randn(p.shape, generator=g).to(p))


def _check_total(name, phase, out, objective_cfg) -> None:
    weights = TOTALS[name][phase]
    want = sum(float(out.terms[k]) * (w if w == 1 else getattr(objective_cfg, w)) for k, w in weights.items())
    total = float(out.total.detach())
    assert math.isclose(total, want, rel_tol=1e-5, abs_tol=1e-9), (name, phase, total, want)


@pytest.mark.parametrize("family,kind", FAMILIES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_contract(request, tmp_path, name, family, kind, one_thread):
    trainer = _trainer(request.getfixturevalue(family), tmp_path / "run", name, kind, family=family)
    obj, groups = trainer.objective, trainer.groups
    assert {p.name for p in trainer.phases} == set(TERMS[name])
    teacher_before = {k: p.detach().clone() for k, p in trainer.teacher.backbone.denoiser.named_parameters()
                      if "lora" not in k}
    obj.prepare(trainer.run_dir, trainer.teacher.device)
    _perturb([p for g, group in groups.items() if g != "student" for p in group.values()])
    for phase in trainer.phases:
        _clear_grads(trainer)
        out = trainer.phase_loss(phase, trainer.micro_batch(0))
        assert torch.isfinite(out.total) and set(out.terms) == TERMS[name][phase.name], (phase.name, set(out.terms))
        _check_total(name, phase.name, out, trainer.cfg.objective)
        out.total.backward()
        for group, params in groups.items():
            grads = [p.grad for p in params.values()]
            if group in phase.modules:  # the gradient survives the adapter switches in between
                assert any(g is not None and g.abs().sum() > 0 for g in grads), (phase.name, group)
            else:
                assert all(g is None for g in grads), (phase.name, group)
    _clear_grads(trainer)
    student_before = {k: p.detach().clone() for k, p in groups["student"].items()}
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {p.name for p in trainer.phases}
    assert all(not r.get("skipped") and math.isfinite(r["grad_norm"]) for r in records)
    after = dict(trainer.teacher.backbone.denoiser.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())  # the teacher never moves
    assert any(not torch.equal(p, student_before[k]) for k, p in groups["student"].items()), "the student did not train"
    assert read_recipe(tmp_path / "run" / "final")["base_pipeline"] == trainer.teacher.pipeline_class
    if family != "tiny_sd":  # checkpoints hold the same groups whatever the family: one family keeps make test short
        return
    # the checkpoint restores every trained tensor and the objective's own state (e.g. an EMA target)
    resumed = _trainer(request.getfixturevalue(family), tmp_path / "run", name, kind, family=family)
    resumed.run()
    assert resumed.state.step == 2
    for g, group in groups.items():
        assert all(torch.equal(p, resumed.groups[g][k]) for k, p in group.items()), g
    extra, extra_resumed = obj.extra_state(), resumed.objective.extra_state()
    assert set(extra) == set(extra_resumed) and all(torch.equal(v, extra_resumed[k]) for k, v in extra.items())


# -- call recording -----------------------------------------------------------------------------------------------
@dataclass
class Call:
    net: object            # the Student (student, fake score, target network) or the DiffusionBackbone (CFG calls)
    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor        # the output, still attached to its graph
    grad: bool
    out: str
    scale: object = None   # CFG calls: the scale
    adapter: str | None = None  # CFG calls: the adapter active on the network


@pytest.fixture()
def calls(monkeypatch):
    """Every network call the objectives make through :class:`Student` and :meth:`DiffusionBackbone.cfg`, in
    order, with inputs and outputs."""
    record: list[Call] = []
    forward, cfg = Student.forward, DiffusionBackbone.cfg

    def spy_forward(self, x_t, t, cond, out="x0"):
        y = forward(self, x_t, t, cond, out)
        record.append(Call(self, x_t.detach().clone(), _times(t, x_t), y, torch.is_grad_enabled(), out))
        return y

    def spy_cfg(self, x_t, t, cond, uncond, scale, out="x0"):
        adapter = lora.current(self.denoiser)
        y = cfg(self, x_t, t, cond, uncond, scale, out)
        record.append(Call(self, x_t.detach().clone(), _times(t, x_t), y, torch.is_grad_enabled(), out, scale, adapter))
        return y

    monkeypatch.setattr(Student, "forward", spy_forward)
    monkeypatch.setattr(DiffusionBackbone, "cfg", spy_cfg)
    return record


def _times(t, x_t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(len(x_t)).clone()


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.double().reshape(-1, *[1] * (like.ndim - 1))


def _spy_fn(monkeypatch, name: str) -> list:
    """Record the arguments of ``functional.<name>`` as the objectives call it."""
    seen, real = [], getattr(fn, name)

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(fn, name, spy)
    return seen


def _grad(loss, x) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g.double()


def _sgd(params, loss, lr: float) -> None:
    """One normalised gradient-descent step of ``loss`` on ``params``."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g / max(norm, 1e-12)


def _params(trainer, group: str) -> list:
    return list(trainer.groups[group].values())


# -- distribution matching: the DM gradient ---------------------------------------------------------------------
DM_OFF = {"dmd": "objective={name: dmd, teacher_steps: 2, num_pairs: 4, regression_weight: 0, real_guidance: 1.5}",
          "dmd2": "objective={name: dmd2, gan_weight: 0, disc_weight: 0, real_guidance: 1.5}",
          "dpdmd": "objective={name: dpdmd, anchor_steps: 2, anchor_grid: 4, diversity_weight: 0, real_guidance: 1.5}"}


def _dm_calls(trainer, calls, x):
    """The DM term's two scores, found by who they are: the fake score's call, and the teacher's guided call
    (adapters off) on the same noised sample."""
    obj = trainer.objective
    (fake,) = [c for c in calls if c.net is obj.fake]
    real = [c for c in calls if c.net is trainer.teacher.backbone and c.adapter is None and c.out == "x0"
            and torch.equal(c.x_t, fake.x_t)]
    assert len(real) == 1, "the real score is not evaluated on the fake score's input"
    (real,) = real
    assert torch.equal(real.t, fake.t) and float(real.scale) == obj.cfg.real_guidance
    return real, fake


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("name", ["dmd", "dmd2", "dpdmd"])
def test_dm_gradient_moves_the_sample_from_the_fake_towards_the_real_score(tiny_sd, tmp_path, calls, monkeypatch,
                                                                             name, kind, one_thread):
    trainer = _trainer(tiny_sd, tmp_path / "r", name, kind, DM_OFF[name])
    obj = trainer.objective
    _perturb(_params(trainer, "fake_score"))  # the fake score now differs from the teacher
    surrogate = _spy_fn(monkeypatch, "score_surrogate_loss")
    out = trainer.phase_loss("student", trainer.micro_batch(0, batch_size=4))
    ((x, _), _), = surrogate  # the sample the DM term acts on (a one-step student's output, DP-DMD's final sample)
    if name != "dpdmd":
        (own,) = [c for c in calls if c.net is obj.student and c.grad]
        assert own.y is x
    real, fake = _dm_calls(trainer, calls, x)
    x0_real, x0_fake, xd = real.y.double(), fake.y.double(), x.detach().double()
    want = (x0_fake - x0_real) / (xd - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # DMD eq. 7-8, DMD2's norm
    got = _grad(out.total, x)  # the surrogate runs in float32: its error is ~1e-7 of |x|, per element
    assert torch.allclose(got * x.numel(), want, rtol=1e-4, atol=1e-6 * float(xd.abs().max()))
    descent = -got
    assert ((descent * (x0_real - x0_fake)).flatten(1).sum(1) > 0).all()  # towards the real score, per sample


@pytest.mark.parametrize("name", ["dmd2", "swiftbrush"])
@pytest.mark.parametrize("family", ["tiny_sd", "tiny_sd3"])
def test_score_distillation_noise_levels_lie_on_the_teachers_training_grid(request, tmp_path, calls, monkeypatch,
                                                                           family, name, one_thread):
    """The DM / VSD term and the fake score draw u uniformly and noise at the teacher's training sigma for u: u
    itself on a VP teacher, SD3's shift s u / (1 + (s - 1) u) on a flow teacher (DP-DMD's flow reference)."""
    from diffdistill.batch import Batch

    path = request.getfixturevalue(family)
    shift = float(json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text()).get("shift", 1.0))
    assert (family == "tiny_sd3") == (shift != 1.0)
    trainer = _trainer(path, tmp_path / "r", name, "full", DM_OFF.get(name, CASES[name][0]), family=family)
    obj, u = trainer.objective, 0.25
    monkeypatch.setattr(Batch, "rand", lambda self, *shape, device=None: torch.full((len(self), *shape), u))

    def grid(v):  # the training sigma of a uniform draw v, written out independently of schedule.py
        return v if family == "tiny_sd" else shift * v / (1 + (shift - 1) * v)

    trainer.phase_loss("student", trainer.micro_batch(0, batch_size=2))
    (term,) = [c for c in calls if c.net is trainer.teacher.backbone and c.adapter is None and c.scale is not None]
    want = grid(obj.cfg.min_t + (obj.cfg.max_t - obj.cfg.min_t) * u)
    assert torch.allclose(term.t, torch.full_like(term.t, want), atol=1e-12), (term.t, want)
    calls.clear()
    trainer.phase_loss("fake_score", trainer.micro_batch(0, batch_size=2))
    (fit,) = [c for c in calls if c.net is obj.fake]
    assert torch.allclose(fit.t, torch.full_like(fit.t, grid(u)), atol=1e-12), (fit.t, grid(u))


@pytest.mark.parametrize("name", ["dmd2", "dpdmd"])
def test_dm_gradient_vanishes_when_the_fake_score_is_the_real_one(tiny_sd, tmp_path, monkeypatch, name, one_thread):
    """A fresh fake score is the teacher; unguided (real_guidance 1) the two scores agree and nothing moves."""
    off = DM_OFF[name].replace("real_guidance: 1.5", "real_guidance: 1.0")
    trainer = _trainer(tiny_sd, tmp_path / "r", name, "full", off)
    surrogate = _spy_fn(monkeypatch, "score_surrogate_loss")
    out = trainer.phase_loss("student", trainer.micro_batch(0, batch_size=4))
    ((x, _), _), = surrogate
    assert _grad(out.total, x).abs().max() < 1e-9


# -- variational score distillation: the VSD gradient -----------------------------------------------------------
@pytest.mark.parametrize("name,kind", [("swiftbrush", "full"), ("snoopi", "lora")])
def test_vsd_gradient_moves_the_sample_from_the_lora_teacher_towards_the_teacher(tiny_sd, tmp_path, calls, name, kind,
                                                                                 one_thread):
    trainer = _trainer(tiny_sd, tmp_path / "r", name, kind)
    obj, teacher = trainer.objective, trainer.teacher
    _perturb(_params(trainer, "fake_score"))
    out = trainer.phase_loss("student", trainer.micro_batch(0, batch_size=4))
    (own,) = [c for c in calls if c.net is obj.student and c.grad]
    x = own.y
    guided = [c for c in calls if c.net is teacher.backbone and not c.grad]
    (real,) = [c for c in guided if c.adapter is None]
    (fake,) = [c for c in guided if c.adapter == "fake_score"]  # the LoRA teacher
    assert torch.equal(real.x_t, fake.x_t) and torch.equal(real.t, fake.t) and real.out == fake.out == "eps"
    assert torch.equal(torch.as_tensor(real.scale), torch.as_tensor(fake.scale))  # one CFG scale for both
    sigma2 = teacher.backbone.schedule.sigma(real.t).double() ** 2
    want = _col(sigma2, x) * (real.y.double() - fake.y.double())  # ProlificDreamer eq. 9, w = sigma_t^2
    got = _grad(out.total, x)
    assert torch.allclose(got * x.numel(), want, rtol=1e-4, atol=1e-6 * float(x.detach().abs().max()))
    # in x0 terms the descent direction is x0_teacher - x0_lora (the eps difference with the opposite sign)
    assert ((-got * (fake.y.double() - real.y.double())).flatten(1).sum(1) > 0).all()


# -- the fake score learns the student's samples ----------------------------------------------------------------
FAKE_CASES = {"dmd": DM_OFF["dmd"], "dmd2": DM_OFF["dmd2"], "dpdmd": DM_OFF["dpdmd"], "swiftbrush": None,
              "snoopi": None}


@pytest.mark.parametrize("name,family", [(n, "tiny_sd") for n in sorted(FAKE_CASES)]
                         + [("dmd2", "tiny_sd3"), ("swiftbrush", "tiny_sd3")])
def test_fake_score_is_fitted_to_the_students_own_samples(request, tmp_path, calls, monkeypatch, name, family,
                                                          one_thread):
    """Its input is the student's own sample noised with the noise its loss targets; VP teachers: epsilon loss
    (VSD weighted by alpha_bar_t), flow teachers: velocity ``eps - x`` (unweighted); one step lowers that loss."""
    extra = [FAKE_CASES[name]] if FAKE_CASES[name] else []
    trainer = _trainer(request.getfixturevalue(family), tmp_path / "r", name, "full", *extra, family=family)
    obj, sched = trainer.objective, trainer.teacher.backbone.schedule
    flow = family == "tiny_sd3"
    denoising = _spy_fn(monkeypatch, "denoising_loss")
    batch = lambda: trainer.micro_batch(0, batch_size=4)  # noqa: E731 -- the same draws each time
    out = trainer.phase_loss("fake_score", batch())
    ((pred, target), kwargs), = [(a[:2], {**k, **dict(zip(("weight",), a[2:]))}) for a, k in denoising]
    (fit,) = [c for c in calls if c.net is obj.fake and c.grad]
    assert fit.y is pred and fit.out == ("flow" if flow else "eps")
    with torch.no_grad():  # the student's sample for this batch, drawn as at inference
        sample = obj.generate(batch(), trainer.teacher.encode_prompt(batch().prompts), grad=False)
    eps = target + sample if flow else target  # the velocity target is eps - x
    assert torch.allclose(fit.x_t.double(), sched.add_noise(sample, eps, fit.t).double(), atol=1e-5)
    weight = kwargs.get("weight")
    if name in ("swiftbrush", "snoopi") and not flow:  # SwiftBrush's code: mse(sqrt(a) pred, sqrt(a) eps)
        assert torch.allclose(weight.double(), sched.alpha(fit.t).double() ** 2)
    else:  # DMD eq. 6 as DMD2's code: plain epsilon MSE; on flow teachers plain velocity MSE
        assert weight is None
    before = float(out.total.detach())
    _sgd(_params(trainer, "fake_score"), out.total, lr=1e-2)
    after = float(trainer.phase_loss("fake_score", batch()).total.detach())
    assert after < before


# -- GAN: discriminator and generator ---------------------------------------------------------------------------
GAN_CASES = {"dmd2": "objective={name: dmd2, gan_weight: 1.0, disc_weight: 1.0, real_guidance: 1.0}",
             "ladd": "objective={name: ladd, num_pairs: 4, teacher_steps: 2}",
             "add": "objective={name: add, r1: none, distill_weight: 0}"}


def _gan_trainer(tiny_sd, run, name):
    trainer = _trainer(tiny_sd, run, name, "full", GAN_CASES[name])
    trainer.objective.prepare(trainer.run_dir, trainer.teacher.device)
    _perturb(trainer.objective.adversary.heads.parameters(), seed=3)  # away from the neutral start
    return trainer


def _real_and_fake(trainer, batch):
    """Real latents (DMD2, ADD: the batch's images; LADD: its teacher pool) and the student's samples, computed
    here from the batch, not taken from the objective's discriminator call."""
    obj, teacher = trainer.objective, trainer.teacher
    with torch.no_grad():
        if hasattr(obj, "data"):  # LADD / ADD: the data latents and their prompts, the student from them
            prompts, real = obj.data(batch())
            cond = teacher.encode_prompt(prompts)
            fake = obj.student_sample(batch(), real, cond, grad=False)
            return real, cond, fake, cond
        real = teacher.encode_images(batch().images, sample=False)
        cond = teacher.encode_prompt(batch().prompts)
        return real, teacher.encode_prompt(batch().image_captions), obj.generate(batch(), cond, grad=False), cond


def _logits(trainer, batch, x, cond) -> torch.Tensor:
    with torch.no_grad():
        return trainer.objective.adversary.logits(batch(), x, cond).mean(dim=1)  # (B,), one noise draw per sample


@pytest.mark.parametrize("name", sorted(GAN_CASES))
def test_a_discriminator_step_separates_real_from_student_samples(tiny_sd, tmp_path, name, one_thread):
    trainer = _gan_trainer(tiny_sd, tmp_path / "r", name)
    phase = "fake_score" if name == "dmd2" else "disc"
    batch = lambda: trainer.micro_batch(0, batch_size=4)
    real, real_cond, fake, cond = _real_and_fake(trainer, batch)
    assert not torch.allclose(real, fake)
    before = _logits(trainer, batch, real, real_cond), _logits(trainer, batch, fake, cond)
    out = trainer.phase_loss(phase, batch())
    _sgd(_params(trainer, "disc"), out.total, lr=1e-2)
    after = _logits(trainer, batch, real, real_cond), _logits(trainer, batch, fake, cond)
    # the heads share their output bias, so both logits may move together in one step: what must grow is how far
    # the real ones lie above the student's (a first-order step always widens it; swapped inputs narrow it)
    margin = [float(r.mean() - f.mean()) for r, f in (before, after)]
    assert margin[1] > margin[0] + 1e-4, (margin, before, after)


@pytest.mark.parametrize("name", sorted(GAN_CASES))
def test_a_generator_step_raises_the_discriminators_logits_on_the_students_samples(tiny_sd, tmp_path, name,
                                                                                   one_thread):
    """DMD2's DM term is zero here (a fresh fake score and an unguided real score agree), so the step is the GAN's."""
    trainer = _gan_trainer(tiny_sd, tmp_path / "r", name)
    batch = lambda: trainer.micro_batch(0, batch_size=4)
    _, _, fake, cond = _real_and_fake(trainer, batch)
    before = _logits(trainer, batch, fake, cond)
    out = trainer.phase_loss("student", batch())
    _sgd(_params(trainer, "student"), out.total, lr=1e-2)
    _, _, moved, cond = _real_and_fake(trainer, batch)
    assert _logits(trainer, batch, moved, cond).mean() > before.mean()


# -- ADD's distillation term and regression: pulled towards the teacher ------------------------------------------
def test_add_distillation_pulls_the_student_to_the_teachers_x0_weighted_by_alpha(tiny_sd, tmp_path, calls,
                                                                                 one_thread):
    """ADD eq. 4-5 with c(t) = alpha_t (its exponential weighting); the heads start neutral, so the GAN term
    contributes nothing to this gradient."""
    trainer = _trainer(tiny_sd, tmp_path / "r", "add", "full", "objective={name: add, r1: none, distill_guidance: 3.0}")
    obj, teacher = trainer.objective, trainer.teacher
    out = trainer.phase_loss("student", trainer.micro_batch(0, batch_size=4))
    (own,) = [c for c in calls if c.net is obj.student and c.grad]
    (target,) = [c for c in calls if c.net is teacher.backbone and float(torch.as_tensor(c.scale).max()) == 3.0]
    assert ((target.t >= 0.02) & (target.t <= 0.98)).all()
    x, x0_teacher = own.y, target.y.double()
    alpha = _col(teacher.backbone.schedule.alpha(target.t), x)
    want = obj.cfg.distill_weight * 2 * alpha * (x.detach().double() - x0_teacher) / x.numel()
    got = _grad(out.total, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-10)
    assert ((-got * (x0_teacher - x.detach().double())).flatten(1).sum(1) > 0).all()


def test_regression_pulls_the_student_to_its_teacher_pair(tiny_sd, tmp_path, calls, one_thread):
    """Luhman & Luhman eq. 4: the one-step student's prediction from noise z is pulled to the teacher's guided
    DDIM sample from the same z (written out here with diffusers' DDIMScheduler)."""
    from diffusers import DDIMScheduler

    trainer = _trainer(tiny_sd, tmp_path / "r", "regression", "full", "student.timesteps=[1.0]",
                       "objective={name: regression, teacher_steps: 3, guidance: 2.5}")
    obj, teacher = trainer.objective, trainer.teacher
    batch = trainer.micro_batch(0, batch_size=3)
    out = trainer.phase_loss("student", batch)
    (own,) = [c for c in calls if c.net is obj.student and c.grad]
    assert torch.equal(own.t, torch.ones(3, dtype=torch.float64))
    ddim = DDIMScheduler.from_config(teacher.scheduler_config)
    ddim.set_timesteps(3)
    cond, uncond = teacher.encode_prompt(batch.prompts), teacher.empty_cond(3)
    x = own.x_t  # the pair's noise z
    with torch.no_grad(), teacher.backbone.adapter(None):
        for k in ddim.timesteps:
            t = teacher.backbone.schedule.from_timestep(torch.full((3,), float(k)))
            e_c, e_u = teacher.backbone(x, t, cond, out="eps"), teacher.backbone(x, t, uncond, out="eps")
            x = ddim.step(e_u + 2.5 * (e_c - e_u), int(k), x).prev_sample
    pred = own.y
    got = _grad(out.total, pred)
    assert torch.allclose(got, 2 * (pred.detach().double() - x.double()) / pred.numel(), rtol=1e-3, atol=1e-9)


# -- consistency: a hand-written reference step and the official timestep rules ---------------------------------
# PCM (official SD1.5 LoRA script, G-U-N/Phased-Consistency-Model): the solver grid is T/N (i + 1) - 1; phase edges
# are grid indices floor(linspace(0, N, K, endpoint=False)); index i belongs to the last edge index <= i (a boundary
# index opens the upper phase) and maps to ddim_timesteps_prev[edge] (0 for the first). Written out as data:
# (N, K) -> [(first grid index of the phase, its edge timestep), ...]
PCM_EDGES = {(50, 1): [(0, 0)], (50, 2): [(0, 0), (25, 499)], (50, 4): [(0, 0), (12, 239), (25, 499), (37, 739)],
             (50, 8): [(0, 0), (6, 119), (12, 239), (18, 359), (25, 499), (31, 619), (37, 739), (43, 859)],
             (100, 4): [(0, 0), (25, 249), (50, 499), (75, 749)]}
# TDD (official SDXL script, RedAIGC/Target-Driven-Distillation, set_timesteps_s / select_s), N = 50, 4..8 steps:
# the union of the equidistant 4..8-step schedules on the reversed grid, 0 added and 999 dropped ...
TDD_CANDIDATES = [0, 139, 159, 179, 199, 259, 299, 339, 379, 399, 439, 499, 579, 599, 639, 679, 719, 759, 799, 839,
                  859, 879]
# ... then for the teacher's target k_m: m = the largest candidate <= k_m, a candidate drawn uniformly in
# [m - 260, m] (u_pick 0: the lowest, 0.999: the highest), shrunk to floor((1 - u_shrink * 0.3) s0).
# (k_m, u_pick, u_shrink) -> s
TDD_TARGETS = {(0, 0.0, 0.0): 0, (0, 0.999, 0.999): 0, (19, 0.999, 0.999): 0, (239, 0.0, 0.0): 0,
               (239, 0.999, 0.0): 199, (239, 0.999, 0.999): 139, (259, 0.999, 0.0): 259, (259, 0.999, 0.999): 181,
               (499, 0.0, 0.0): 259, (499, 0.0, 0.999): 181, (499, 0.999, 0.0): 499, (499, 0.999, 0.999): 349,
               (739, 0.0, 0.0): 499, (739, 0.0, 0.999): 349, (739, 0.999, 0.0): 719, (739, 0.999, 0.999): 503,
               (979, 0.0, 0.0): 639, (979, 0.0, 0.999): 447, (979, 0.999, 0.0): 879, (979, 0.999, 0.999): 615}


class _Draws:
    """Stands in for a Batch whose draws are given: ``randint`` -> the given indices, ``rand`` -> the queued values."""

    def __init__(self, indices=None, rands=()):
        self.indices, self.rands = indices, list(rands)

    def randint(self, high, device=None):
        return self.indices

    def rand(self, *shape, device=None):
        return torch.as_tensor(self.rands.pop(0), dtype=torch.float32)


def _edge_table(n: int, k: int) -> torch.Tensor:
    edges = torch.zeros(n, dtype=torch.float64)
    for first, edge in PCM_EDGES[n, k]:
        edges[first:] = edge
    return edges


@pytest.mark.parametrize("n,k", sorted(PCM_EDGES))
def test_pcm_phase_edges_follow_the_official_rule(tiny_sd, tmp_path, n, k, one_thread):
    from diffdistill.objectives.consistency import PCM, PCMConfig

    trainer = _trainer(tiny_sd, tmp_path / "r", "pcm", "lora")
    pcm = PCM(PCMConfig(num_ddim_timesteps=n, num_phases=k), trainer.teacher, trainer.student, trainer.prompts)
    sched, skip = trainer.teacher.backbone.schedule, 1000 // n
    t_n, t_m, t_end = pcm.times(_Draws(torch.arange(n)))
    k_n = sched.to_timestep(t_n)
    assert torch.equal(k_n, skip * torch.arange(1, n + 1, dtype=torch.float64) - 1)
    assert torch.equal(sched.to_timestep(t_m), (k_n - skip).clamp_min(0))
    assert torch.equal(sched.to_timestep(t_end), _edge_table(n, k))


def test_tdd_target_timesteps_follow_the_official_rule(tiny_sd, tmp_path, one_thread):
    trainer = _trainer(tiny_sd, tmp_path / "r", "tdd", "full", "objective={name: tdd}")
    tdd = trainer.objective
    assert (tdd.cfg.min_steps, tdd.cfg.max_steps, tdd.cfg.window, tdd.cfg.s_ratio) == (4, 8, 260, 0.3)
    assert tdd.candidates.tolist() == TDD_CANDIDATES
    for (k_m, u_pick, u_shrink), s in TDD_TARGETS.items():
        got = tdd.target_timestep(torch.tensor([float(k_m)], dtype=torch.float64), _Draws(rands=([u_pick], [u_shrink])))
        assert got.tolist() == [s], (k_m, u_pick, u_shrink, got.tolist(), s)


CONSISTENCY_CASES = {"lcm": "objective={name: lcm, w_min: 3.0, w_max: 3.0}",
                     "pcm": "objective={name: pcm, num_phases: 4, w_min: 3.0, w_max: 3.0}",
                     "tdd": "objective={name: tdd, w_min: 3.0, w_max: 3.0, window: 0, s_ratio: 0.0, empty_prompt_prob: 0}"}


def _reference_end(name: str, k_n: torch.Tensor, k_m: torch.Tensor) -> torch.Tensor | None:
    """Where the consistency function maps to: LCM none (its boundary scalings), PCM the phase edge of the start's
    grid index, TDD (window 0, no shrink) the largest candidate <= the teacher's target."""
    if name == "pcm":
        return _edge_table(50, 4)[((k_n + 1) / 20 - 1).long()]
    if name == "tdd":
        cands = torch.tensor(TDD_CANDIDATES, dtype=torch.float64)
        return torch.stack([cands[cands <= k].max() for k in k_m])
    return None


@pytest.mark.parametrize("name,kind", [("lcm", "full"), ("lcm", "lora"), ("pcm", "lora"), ("tdd", "full")])
def test_consistency_loss_equals_a_hand_written_reference_step(tiny_sd, tmp_path, calls, name, kind, one_thread):
    """LCM Algorithm 1 / diffusers' LCM scripts: start at grid timestep k_n, the guided teacher's DDIM step to
    k_m = max(k_n - T/N, 0), the student's consistency function at (x_n, k_n) against the target network's at
    (x_m, k_m), pseudo-Huber. LCM's function is c_skip x + c_out x0 (LCMScheduler's scalings); PCM's and TDD's is
    the DDIM jump to the end timestep (and the target is x_m itself when k_m is that end). Written here on
    diffusers' alphas_cumprod; the networks' outputs are the recorded ones."""
    from diffusers import DDPMScheduler, LCMScheduler

    trainer = _trainer(tiny_sd, tmp_path / "r", name, kind, CONSISTENCY_CASES[name])
    obj, teacher = trainer.objective, trainer.teacher
    sched = teacher.backbone.schedule
    out = trainer.phase_loss("student", trainer.micro_batch(0, batch_size=8))
    (online,) = [c for c in calls if c.net is obj.student and c.grad]
    (guided,) = [c for c in calls if c.net is teacher.backbone and c.adapter is None]
    (target,) = [c for c in calls if c.net is obj.target_net() and not c.grad]
    k_n, k_m = sched.to_timestep(online.t).long(), sched.to_timestep(target.t).long()
    assert set(k_n.tolist()) <= set(range(19, 1000, 20)) and len(set(k_n.tolist())) > 1
    assert torch.equal(k_m, (k_n - 20).clamp_min(0))  # the target network one solver step below the start
    assert torch.equal(guided.x_t, online.x_t) and torch.equal(guided.t, online.t)
    assert torch.all(torch.as_tensor(guided.scale) == 3.0)
    ab = DDPMScheduler.from_config(teacher.scheduler_config).alphas_cumprod.double()

    def a_s(k):
        return _col(ab[k].sqrt(), online.x_t), _col((1 - ab[k]).sqrt(), online.x_t)

    (a_n, s_n), (a_m, s_m) = a_s(k_n), a_s(k_m)
    x_n, eps_T = online.x_t.double(), guided.y.double()  # the teacher answers in its own prediction type: eps
    assert guided.out == "eps"
    x_m = a_m * (x_n - s_n * eps_T) / a_n + s_m * eps_T  # DDIM: x0 and eps of the teacher, moved to k_m
    assert torch.allclose(target.x_t.double(), x_m, atol=1e-5)
    end = _reference_end(name, k_n.double(), k_m.double())
    if end is None:  # LCM: f = c_skip x + c_out x0, LCMScheduler's boundary scalings at the grid timestep
        lcm = LCMScheduler.from_config(teacher.scheduler_config)

        def f(x, k, y):
            c_skip, c_out = (torch.tensor([float(lcm.get_scalings_for_boundary_condition_discrete(int(i))[j])
                                           for i in k], dtype=torch.float64) for j in (0, 1))
            return _col(c_skip, x) * x + _col(c_out, x) * y.double()

        f_online, f_target = f(x_n, k_n, online.y), f(x_m, k_m, target.y)
    else:  # PCM, TDD: the DDIM jump of the network's eps prediction to the end timestep
        a_e, s_e = a_s(end.long())

        def f(x, a, s, eps):
            return a_e * (x - s * eps.double()) / a + s_e * eps.double()

        f_online = f(x_n, a_n, s_n, online.y)
        f_target = torch.where(_col((k_m == end.long()).double(), x_n).bool(), x_m, f(x_m, a_m, s_m, target.y))
    c = obj.cfg.huber_c
    want = ((f_online - f_target).pow(2) + c ** 2).sqrt().sub(c).mean()
    got = float(out.total.detach())
    assert math.isclose(got, float(want), rel_tol=2e-4), (got, float(want))


def test_dpdmd_first_step_is_pulled_to_the_teachers_anchor_and_nothing_else(tiny_sd, tmp_path, calls, one_thread):
    """DP-DMD: the first step's only gradient is diversity_weight x the MSE to the clean prediction whose DDIM step
    from the *same* noise passes through the teacher's anchor; the DM term stops before it."""
    trainer = _trainer(tiny_sd, tmp_path / "r", "dpdmd", "full")
    obj, teacher = trainer.objective, trainer.teacher
    batch = trainer.micro_batch(0, batch_size=3)
    out = trainer.phase_loss("student", batch)
    first = next(c for c in calls if c.net is obj.student and c.grad)
    assert torch.equal(first.t, torch.full((3,), obj.student.timesteps[0], dtype=torch.float64))
    target = obj.anchor_target(first.x_t, teacher.encode_prompt(batch.prompts)).double()
    want = obj.cfg.diversity_weight * 2 * (first.y.detach().double() - target) / first.y.numel()
    assert torch.allclose(_grad(out.total, first.y), want, rtol=1e-4, atol=1e-10)
