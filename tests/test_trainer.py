"""The training loop on the tiny pipeline: exact resume, crash safety, corrupt-checkpoint fallback,
the non-finite guard, shared-base LoRA."""

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from diffdistill import checkpoint as ckpt
from diffdistill.config import load_config
from diffdistill.objectives import OBJECTIVES, LossOut, Objective, ObjectiveConfig, Phase
from diffdistill.trainer import NonFiniteError, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "regression.yaml"


def _cfg(tiny_sd, run, *overrides):
    return load_config(TINY, [f"teacher.path={tiny_sd}", f"train.output_dir={run}", *overrides])


@dataclass
class TwoPhaseConfig(ObjectiveConfig):
    name: ClassVar[str] = "two_phase_test"
    critic_every: int = 2


class TwoPhase(Objective):
    """A test objective with a second phase (a tiny critic) updated every ``critic_every`` steps."""

    Config = TwoPhaseConfig

    def __init__(self, cfg, teacher, student, prompts):
        super().__init__()
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.critic = torch.nn.Linear(4, 1)

    def phases(self):
        return [Phase("student", ["student"]), Phase("critic", ["critic"], every=self.cfg.critic_every)]

    def trainable(self):
        return {"student": self.student.named_parameters_to_train(), "critic": dict(self.critic.named_parameters())}

    def loss(self, phase, batch, step):
        z = batch.randn(4, 8, 8)
        x0 = self.student(z, 1.0, self.teacher.encode_prompt(batch.prompts))
        score = self.critic(x0.mean(dim=(2, 3)) if phase == "student" else x0.detach().mean(dim=(2, 3)))
        total = score.mean() + 0.1 * x0.square().mean() if phase == "student" else F.softplus(-score).mean()
        return LossOut(total, {f"{phase}_loss": total.detach()})


@pytest.fixture()
def two_phase(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "two_phase_test", TwoPhase)


def _snapshot(trainer):
    tensors, _ = trainer._state_tensors()
    return {k: v.clone() for k, v in tensors.items() if not k.startswith("rng.")}


def _losses(run):
    return [{k: v for k, v in json.loads(line).items()} for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


RESUME_CASES = {"regression": [], "two_phase_test": ["objective={name: two_phase_test, critic_every: 2}"],
                "dmd2": ["objective={name: dmd2, student_every: 3}", "data.images=digits", "student.timesteps=[1.0]"],
                "lcm": ["objective={name: lcm}", "data.images=digits"],  # full student: its EMA target is resumed too
                "snoopi": ["objective={name: snoopi, fake_lora_rank: 4, fake_lr: 2.0e-3}", "student.timesteps=[1.0]"],
                "ladd": ["objective={name: ladd, num_pairs: 4, teacher_steps: 2, disc_lr: 2.0e-3}"]}  # + teacher pool


@pytest.mark.parametrize("objective", list(RESUME_CASES))
def test_resume_is_bitwise_identical(tiny_sd, tmp_path, two_phase, objective):
    extra = RESUME_CASES[objective]
    straight = Trainer(_cfg(tiny_sd, tmp_path / "a", "train.max_steps=6", *extra))
    straight.run()
    first = Trainer(_cfg(tiny_sd, tmp_path / "b", "train.max_steps=2", *extra))
    first.run()
    resumed = Trainer(_cfg(tiny_sd, tmp_path / "b", "train.max_steps=6", *extra))
    resumed.run()
    a, b = _snapshot(straight), _snapshot(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    phases = [r["phase"] for r in _losses(tmp_path / "a")]
    if objective == "two_phase_test":
        assert phases.count("critic") == 3 and phases.count("student") == 6  # update ratio 1:2
    if objective == "lcm":
        assert any(k.startswith("objective.target.") for k in a)
    if objective == "snoopi":  # the LoRA teacher's phase runs at its own learning rate
        assert {r["phase"]: r["lr"] for r in _losses(tmp_path / "b")} == {"student": 1e-3, "fake_score": 2e-3}
        assert resumed.optimizers["fake_score"].param_groups[0]["lr"] == 2e-3
    if objective == "ladd":  # the heads' phase at its own rate; the teacher pool is made once, then reused
        assert {r["phase"]: r["lr"] for r in _losses(tmp_path / "b")} == {"student": 1e-3, "disc": 2e-3}
        assert (tmp_path / "b" / "teacher_pairs" / "COMPLETE").is_file()
    if objective == "dmd2":
        assert phases.count("student") == 2 and phases.count("fake_score") == 6  # student every 3rd step


def test_corrupt_newest_checkpoint_falls_back(tiny_sd, tmp_path, capsys):
    Trainer(_cfg(tiny_sd, tmp_path / "a", "train.max_steps=4")).run()
    run = tmp_path / "b"
    Trainer(_cfg(tiny_sd, run, "train.max_steps=4")).run()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000004", "step-000002"]
    state = run / "checkpoints" / "step-000004" / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    resumed = Trainer(_cfg(tiny_sd, run, "train.max_steps=4"))
    resumed.run()
    assert "step-000004 is unreadable" in capsys.readouterr().out
    straight = Trainer(_cfg(tiny_sd, tmp_path / "a", "train.max_steps=4"))
    straight._restore(*ckpt.load_state(tmp_path / "a" / "checkpoints" / "step-000004" / "state.safetensors"))
    a, b = _snapshot(straight), _snapshot(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_explicit_resume_that_cannot_happen_is_an_error(tiny_sd, tmp_path):
    with pytest.raises(ckpt.ResumeError, match="not a complete checkpoint"):
        Trainer(_cfg(tiny_sd, tmp_path / "r", f"train.resume={tmp_path / 'nope'}")).run()
    Trainer(_cfg(tiny_sd, tmp_path / "r", "train.max_steps=2")).run()
    with pytest.raises(ckpt.ResumeError, match="already holds checkpoints"):
        Trainer(_cfg(tiny_sd, tmp_path / "r", "train.resume=none")).run()


KILL_SCRIPT = """
import os, signal, sys
import diffdistill.checkpoint as ckpt
from diffdistill.config import load_config
from diffdistill.trainer import Trainer
real = ckpt.save_state
def dying_save(path, tensors, meta):
    if meta["step"] == 4:  # the second checkpoint: write half a file, then die like SIGKILL would
        real(path, tensors, meta)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, tensors, meta)
ckpt.save_state = dying_save
cfg = load_config(sys.argv[1], sys.argv[2:])
Trainer(cfg).run()
"""


def test_killed_mid_save_keeps_previous_checkpoint(tiny_sd, tmp_path):
    run = tmp_path / "run"
    args = [str(TINY), f"teacher.path={tiny_sd}", f"train.output_dir={run}", "train.max_steps=6"]
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000002"]
    assert (run / "checkpoints" / ".tmp-step-000004").exists()
    ckpt.load_state(run / "checkpoints" / "step-000002" / "state.safetensors")  # still loadable
    trainer = Trainer(_cfg(tiny_sd, run, "train.max_steps=6"))
    trainer.run()
    assert not (run / "checkpoints" / ".tmp-step-000004").exists()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000006", "step-000004"]


def test_nonfinite_loss_is_skipped_then_aborts(tiny_sd, tmp_path, monkeypatch):
    from diffdistill.objectives.regression import Regression

    real = Regression.loss

    def flaky(self, phase, batch, step):
        out = real(self, phase, batch, step)
        if step == 1 or step >= 3:
            out.terms["regression_mse"] = torch.tensor(float("nan"))
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(Regression, "loss", flaky)
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "n", "train.max_steps=8", "train.max_consecutive_nonfinite=3"))
    before = {k: p.detach().clone() for k, p in trainer.groups["student"].items()}
    with pytest.raises(NonFiniteError, match="phase 'student': 3 consecutive non-finite updates \\(last: regression_mse\\)"):
        trainer.run()
    records = _losses(tmp_path / "n")
    assert [r.get("skipped", False) for r in records] == [False, True, False, True, True, True]
    assert trainer.state.skipped["student"] == 4
    changed = any(not torch.equal(before[k], p) for k, p in trainer.groups["student"].items())
    assert changed  # the finite steps did update


def test_shared_base_lora_leaves_the_teacher_untouched(tiny_sd, tmp_path):
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "l", "student.kind=lora", "student.lora_rank=4", "train.max_steps=3",
                           "train.lr=1e-2"))
    bb, teacher = trainer.student.backbone, trainer.teacher
    assert bb is teacher.backbone  # one network: the teacher is the student's base
    from diffdistill.pipeline import load_teacher

    pristine = load_teacher(tiny_sd).backbone
    x, cond = torch.randn(2, 4, 8, 8), teacher.encode_prompt(["a", "b"])
    with torch.no_grad():
        ref = pristine(x, 0.5, cond)
        with bb.adapter(None):
            assert torch.equal(bb(x, 0.5, cond), ref)
    lora_before = {k: p.detach().clone() for k, p in trainer.groups["student"].items()}
    base_before = {k: p.detach().clone() for k, p in bb.denoiser.named_parameters() if "lora" not in k}
    trainer.run()
    with torch.no_grad(), bb.adapter(None):
        assert torch.equal(bb(x, 0.5, cond), ref)
    assert all(torch.equal(base_before[k], p) for k, p in bb.denoiser.named_parameters() if "lora" not in k)
    assert any(not torch.equal(lora_before[k], p) for k, p in trainer.groups["student"].items())
    assert all(k.count(".student.") == 1 for k in trainer.groups["student"])


def test_checkpoints_from_before_per_process_rng_still_resume(tiny_sd, tmp_path):
    """Checkpoints written by the one-process trainer (one RNG state, tensor 'rng.torch') resume exactly."""
    Trainer(_cfg(tiny_sd, tmp_path / "a", "train.max_steps=4")).run()
    run = tmp_path / "b"
    Trainer(_cfg(tiny_sd, run, "train.max_steps=2")).run()
    path = run / "checkpoints" / "step-000002" / ckpt.STATE_FILE
    tensors, meta = ckpt.load_state(path)
    [rng] = meta["rng"]
    meta["rng"], tensors["rng.torch"] = rng, tensors.pop("rng.torch.0")  # the old layout
    ckpt.save_state(path, tensors, meta)
    resumed = Trainer(_cfg(tiny_sd, run, "train.max_steps=4"))
    resumed.run()
    straight = Trainer(_cfg(tiny_sd, tmp_path / "a", "train.max_steps=4"))
    straight._restore(*ckpt.load_state(tmp_path / "a" / "checkpoints" / "step-000004" / ckpt.STATE_FILE))
    a, b = _snapshot(straight), _snapshot(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_warms_up_then_decays(tiny_sd, tmp_path):
    run = tmp_path / "lr"
    Trainer(_cfg(tiny_sd, run, "train.max_steps=6", "train.lr=1e-3", "train.lr_scheduler=cosine",
                 "train.lr_warmup_steps=2")).run()
    lrs = [r["lr"] for r in _losses(run)]  # the LR each update used
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # cosine decay over the remaining updates


def test_warm_up_and_ema_count_as_dmd2_counts_them(tiny_sd, tmp_path, one_thread):
    """A phase updating every k-th step warms up over training steps, not over its own updates (DMD2 steps its
    generator's scheduler every iteration); the EMA moves once per student update."""
    run = tmp_path / "ratio"
    trainer = Trainer(_cfg(tiny_sd, run, "objective={name: dmd2, student_every: 2, gan_weight: 0, disc_weight: 0}",
                           "student.timesteps=[1.0]", "train.max_steps=6", "train.lr=1e-3",
                           "train.lr_scheduler=constant_with_warmup", "train.lr_warmup_steps=4"))
    trainer.run()
    records = _losses(run)
    student = [r["lr"] for r in records if r["phase"] == "student"]  # steps 0, 2, 4
    fake = [r["lr"] for r in records if r["phase"] == "fake_score"]  # steps 0..5
    assert student == pytest.approx([0.0, 5e-4, 1e-3])
    assert fake == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert trainer.ema.num_updates == 3


GC_CASES = {"dmd2-lora": ["objective={name: dmd2, student_every: 1, fake_score: lora}", "data.images=digits", "student.timesteps=[1.0]",
                          "student.kind=lora", "student.lora_rank=4"],  # student and fake score: adapters on one base
            "swiftbrush-lora": ["objective={name: swiftbrush, fake_lora_rank: 4}", "student.timesteps=[1.0]",
                                "student.kind=lora", "student.lora_rank=4"],
            "dmd2-full": ["objective={name: dmd2, student_every: 1}", "data.images=digits", "student.timesteps=[1.0]"],
            "dmd2-full-lora-fake": ["objective={name: dmd2, student_every: 1, fake_score: lora, fake_lora_rank: 4}",
                                    "data.images=digits", "student.timesteps=[1.0]"],  # the fake adapter on the teacher
            "dmd2-lora-full-fake": ["objective={name: dmd2, student_every: 1, fake_score: full}", "data.images=digits",
                                    "student.timesteps=[1.0]", "student.kind=lora", "student.lora_rank=4"]}


@pytest.mark.parametrize("family,case", [("tiny_sd", c) for c in sorted(GC_CASES)] + [("tiny_flux", "dmd2-lora")])
def test_gradient_checkpointing_changes_no_gradient(request, tmp_path, family, case, one_thread):
    """train.gradient_checkpointing re-runs blocks in the backward: under the adapter of their forward (not the one
    active by then: PLATFORM.md's CheckpointError), on every network a phase trains (a fake score's own copy too)."""
    grads = {}
    for on in (False, True):
        size = ["teacher.resolution=16"] if family == "tiny_flux" else []
        trainer = Trainer(_cfg(request.getfixturevalue(family), tmp_path / str(on), *GC_CASES[case], *size,
                               f"train.gradient_checkpointing={str(on).lower()}"))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the fake score and heads off their neutral start, identically in both runs
            for name, group in trainer.groups.items():
                for p in group.values():
                    if name != "student":
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
        for phase in trainer.phases:
            for group in trainer.groups.values():
                for p in group.values():
                    p.grad = None
            trainer.phase_loss(phase, trainer.micro_batch(0)).total.backward()
            grads[on, phase.name] = {f"{m}.{k}": p.grad.clone() for m in phase.modules
                                     for k, p in trainer.groups[m].items() if p.grad is not None}
        networks = [trainer.student.backbone.denoiser, trainer.objective.fake.backbone.denoiser]  # every combination
        assert all(net.is_gradient_checkpointing == on for net in networks)  # of full / LoRA student and fake score
    for phase in trainer.phases:
        off, on_ = grads[False, phase.name], grads[True, phase.name]
        assert off.keys() == on_.keys() and off
        assert all(torch.allclose(off[k], on_[k], atol=1e-6) for k in off), phase.name


@pytest.mark.parametrize("case", ["dmd2-full", "dmd2-lora", "swiftbrush-lora"])
def test_trainable_tensors_are_fp32_masters_beside_a_half_precision_teacher(tiny_sd, tmp_path, case, one_thread):
    """teacher.dtype bfloat16: students, fake-score copies and adapters still train fp32 masters, so AdamW steps at
    lr 1e-5 move weights of size ~0.05 (in bf16 they round away: bf16's spacing there is ~2e-4). Two steps: VSD's
    first student gradient is zero (its fresh LoRA teacher is the teacher)."""
    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", *GC_CASES[case], "teacher.dtype=bfloat16", "train.lr=1e-5",
                           "train.max_steps=2", "train.lr_warmup_steps=0", "train.lr_scheduler=constant"))
    assert all(p.dtype == torch.float32 for group in trainer.groups.values() for p in group.values())
    frozen = [p for k, p in trainer.teacher.backbone.denoiser.named_parameters() if "lora" not in k]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)  # the teacher stays bf16
    before = {k: p.detach().clone() for k, p in trainer.groups["student"].items()}
    trainer.run()
    # a fresh LoRA's A matrices get no gradient (its B is zero): count the B matrices there
    live = [k for k in before if "lora_A" not in k]
    moved = sum(int((trainer.groups["student"][k] != before[k]).sum()) for k in live)
    total = sum(before[k].numel() for k in live)
    assert moved > 0.5 * total, (moved, total)
    assert all(p.dtype == torch.float32 for group in trainer.groups.values() for p in group.values())


STAGE = ["student.timesteps=[1.0]", "train.max_steps=2", "train.checkpoint_every=2", "train.sample_every=1000",
         "train.lr=1e-2"]


def test_init_from_carries_student_fake_score_and_head_into_the_next_stage(tiny_sd, tmp_path, one_thread):
    """DMD2's staged recipe: stage 2 (with the GAN head) starts its student and fake score from stage 1's
    checkpoint (as the authors' --ckpt_only_path); the head stage 1 did not train starts fresh; optimizers, the
    step and the EMA start afresh."""
    stage1 = Trainer(_cfg(tiny_sd, tmp_path / "s1", "objective={name: dmd2, student_every: 1, gan_weight: 0, "
                          "disc_weight: 0}", *STAGE))
    stage1.run()
    trained = {g: {k: p.detach().clone() for k, p in group.items()} for g, group in stage1.groups.items()}
    stage2 = Trainer(_cfg(tiny_sd, tmp_path / "s2", "objective={name: dmd2, student_every: 1}", "data.images=digits",
                          f"train.init_from={tmp_path / 's1'}", *STAGE))
    fresh_head = {k: p.detach().clone() for k, p in stage2.groups["disc"].items()}
    teacher_like = {k: p.detach().clone() for k, p in stage2.groups["fake_score"].items()}
    logs = []
    stage2.log = logs.append
    stage2.init_from(tmp_path / "s1")
    for g in ("student", "fake_score"):
        assert all(torch.equal(p, trained[g][k]) for k, p in stage2.groups[g].items()), g
    assert any(not torch.equal(p, teacher_like[k]) for k, p in stage2.groups["fake_score"].items())  # stage 1 moved it
    assert all(torch.equal(p, fresh_head[k]) for k, p in stage2.groups["disc"].items())
    assert stage2.state.step == 0 and stage2.ema.num_updates == 0
    assert all(torch.equal(stage2.ema.shadow[k], p.float()) for k, p in stage2.groups["student"].items())
    assert any("fresh: disc" in line for line in logs)
    stage2.run()  # and it trains on
    assert stage2.state.step == 2
    # a checkpoint that holds a head carries it too
    heads = {k: p.detach().clone() for k, p in stage2.groups["disc"].items()}
    stage3 = Trainer(_cfg(tiny_sd, tmp_path / "s3", "objective={name: dmd2, student_every: 1}", "data.images=digits",
                          *STAGE))
    stage3.init_from(tmp_path / "s2" / "checkpoints" / "step-000002")
    assert all(torch.equal(p, heads[k]) for k, p in stage3.groups["disc"].items())
    assert any(not torch.equal(p, fresh_head[k]) for k, p in stage3.groups["disc"].items())


def test_init_from_refuses_a_checkpoint_that_does_not_fit(tiny_sd, tmp_path, one_thread):
    Trainer(_cfg(tiny_sd, tmp_path / "s1", "objective={name: dmd2, student_every: 1, gan_weight: 0, disc_weight: 0}",
                 "student.kind=lora", "student.lora_rank=4", *STAGE)).run()
    other = Trainer(_cfg(tiny_sd, tmp_path / "s2", "objective={name: dmd2, student_every: 1, gan_weight: 0, "
                         "disc_weight: 0}", "student.kind=lora", "student.lora_rank=8", *STAGE))
    with pytest.raises(ckpt.ResumeError, match="'student' does not fit"):
        other.init_from(tmp_path / "s1")
    with pytest.raises(ckpt.ResumeError, match="neither a complete checkpoint"):
        other.init_from(tmp_path / "nothing")


def test_a_small_prompt_set_is_refused_by_objectives_that_train_on_prompts(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    from diffdistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"holds 2 prompts; regression trains on prompts alone and needs at least "
                                          r"10000 \(data.min_prompts\)"):
        Trainer(_cfg(tiny_sd, tmp_path / "r", f"data.prompts={prompts}"))
    Trainer(_cfg(tiny_sd, tmp_path / "r", f"data.prompts={prompts}", "data.min_prompts=2"))  # at the minimum: fine
    # captioned-image objectives train on the images' captions: the prompt file only names sample prompts
    Trainer(_cfg(tiny_sd, tmp_path / "l", f"data.prompts={prompts}", "objective={name: lcm}", "data.images=digits"))


def test_teacher_pair_pool_is_made_once_streamed_and_resumed_shard_by_shard(tmp_path):
    from diffdistill.objectives.regression import PairPool

    calls = []

    def make(shard, size, device):
        calls.append(shard)
        base = torch.arange(shard * 3, shard * 3 + size, dtype=torch.float32)
        return {"z": base.view(-1, 1, 1, 1).repeat(1, 2, 2, 2), "x0": -base.view(-1, 1, 1, 1).repeat(1, 2, 2, 2),
                "prompt_index": base.long()}

    recipe = {"num_pairs": 7, "teacher_steps": 2, "guidance": 2.0, "prompts": 10}
    pool = PairPool.open_or_make(tmp_path / "pool", recipe, 3, make, "cpu")
    assert calls == [0, 1, 2] and len(pool) == 7  # shards of 3, 3, 1
    rows = pool.rows([6, 0, 4, 4])
    assert rows["prompt_index"].tolist() == [6, 0, 4, 4]
    assert torch.equal(rows["z"][:, 0, 0, 0], torch.tensor([6.0, 0.0, 4.0, 4.0])) and rows["x0"].shape == (4, 2, 2, 2)
    calls.clear()
    PairPool.open_or_make(tmp_path / "pool", recipe, 3, make, "cpu")
    assert calls == []  # made once
    (tmp_path / "pool" / "COMPLETE").unlink()  # an interrupted making: shard 1 never written
    pool.shard_path(1).unlink()
    PairPool.open_or_make(tmp_path / "pool", recipe, 3, make, "cpu")
    assert calls == [1]
    calls.clear()
    PairPool.open_or_make(tmp_path / "pool", {**recipe, "teacher_steps": 4}, 3, make, "cpu")
    assert calls == [0, 1, 2]  # another recipe: made anew
    with pytest.raises(IndexError):
        pool.rows([7])


def test_resume_refuses_a_changed_config_naming_each_key(tiny_sd, tmp_path, one_thread):
    from diffdistill.config import ConfigError

    run = tmp_path / "r"
    Trainer(_cfg(tiny_sd, run, "train.max_steps=2")).run()
    with pytest.raises(ConfigError, match=r"train.lr: 0.001 -> 0.002; train.seed: 0 -> 3; set "
                                          r"train.resume_allow_changes=\[train.lr, train.seed\]"):
        Trainer(_cfg(tiny_sd, run, "train.max_steps=4", "train.lr=2e-3", "train.seed=3")).run()
    with pytest.raises(ConfigError, match="student.kind: 'full' -> 'lora'.*change what the checkpoint's tensors are"):
        Trainer(_cfg(tiny_sd, run, "train.max_steps=4", "student.kind=lora",
                     "train.resume_allow_changes=[student.kind]")).run()
    # allowed: cadence and max_steps freely, a named key knowingly; both recorded in the run folder
    Trainer(_cfg(tiny_sd, run, "train.max_steps=4", "train.sample_every=3", "train.lr=2e-3",
                 "train.resume_allow_changes=[train.lr]")).run()
    recorded = (run / "resume_changes.txt").read_text()
    assert "train.max_steps changed: 2 -> 4" in recorded and "train.lr changed: 0.001 -> 0.002 (allowed" in recorded


def test_non_finite_weights_are_never_checkpointed(tiny_sd, tmp_path, one_thread):
    run = tmp_path / "r"
    trainer = Trainer(_cfg(tiny_sd, run, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1"))
    trainer.run()
    good = ckpt.complete_checkpoints(run)
    name = next(iter(trainer.groups["student"]))
    with torch.no_grad():
        trainer.groups["student"][name].fill_(float("inf"))
    trainer.state.step = 6
    with pytest.raises(NonFiniteError, match=f"param.student.{name} holds non-finite values"):
        trainer.save_checkpoint()
    assert ckpt.complete_checkpoints(run) == good  # the good one is neither replaced nor pruned


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.adam_eps=.nan", "student.lora_alpha=.nan",
                                      "objective.guidance=.inf", "student.timesteps=[1.0, .nan]"])
def test_every_number_in_a_config_must_be_finite(override):
    from diffdistill.config import ConfigError

    with pytest.raises(ConfigError, match="must be finite"):
        load_config(TINY, [override])


TERM_SCRIPT = """
import os, signal, sys
from diffdistill.config import load_config
from diffdistill.objectives.regression import Regression
from diffdistill.trainer import Trainer
real = Regression.loss
def loss(self, phase, batch, step):
    if step == 2:  # the scheduler's notice arrives mid-step
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, phase, batch, step)
Regression.loss = loss
Trainer(load_config(sys.argv[1], sys.argv[2:])).run()
"""


def test_sigterm_saves_at_the_next_step_and_the_resumed_run_is_bitwise_equal(tiny_sd, tmp_path, one_thread):
    run = tmp_path / "run"
    args = [str(TINY), f"teacher.path={tiny_sd}", f"train.output_dir={run}", "train.max_steps=6",
            "train.checkpoint_every=4"]
    proc = subprocess.run([sys.executable, "-c", TERM_SCRIPT, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "signal SIGTERM: saved a checkpoint at step 3" in proc.stdout + proc.stderr
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000003"]
    assert [r["step"] for r in _losses(run)] == [0, 1, 2]  # flushed per step: nothing of steps 0-2 lost
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 3, "phase": "student"}\n')
    resumed = Trainer(_cfg(tiny_sd, run, "train.max_steps=6", "train.checkpoint_every=4"))
    resumed.run()
    straight = Trainer(_cfg(tiny_sd, tmp_path / "straight", "train.max_steps=6", "train.checkpoint_every=4"))
    straight.run()
    a, b = _snapshot(straight), _snapshot(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _losses(run)] == list(range(6))  # one record per step: the stray step 3 is gone
    assert _losses(run) == _losses(tmp_path / "straight")


def test_output_dir_must_be_a_run_of_ours_and_never_the_teacher_or_the_source_tree(tiny_sd, tmp_path, one_thread):
    from diffdistill.config import ConfigError

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="non-empty folder that is not a diffdistill run"):
        Trainer(_cfg(tiny_sd, other, "train.max_steps=1")).run()
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]
    for bad in (tiny_sd, str(Path(tiny_sd).parent), str(ROOT)):
        with pytest.raises(ConfigError, match="choose a folder of its own"):
            Trainer(_cfg(tiny_sd, bad, "train.max_steps=1")).run()
    run = tmp_path / "run"
    Trainer(_cfg(tiny_sd, run, "train.max_steps=1")).run()
    assert (run / Trainer.RUN_MARKER).is_file()
    Trainer(_cfg(tiny_sd, run, "train.max_steps=2")).run()  # ours: resumed


def test_resuming_an_older_checkpoint_fences_the_abandoned_branch(tiny_sd, tmp_path, one_thread):
    from diffdistill.config import ConfigError

    run = tmp_path / "run"
    Trainer(_cfg(tiny_sd, run, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3")).run()
    older = run / "checkpoints" / "step-000002"
    with pytest.raises(ConfigError, match="train.lr"):  # a refused resume moves nothing
        Trainer(_cfg(tiny_sd, run, "train.max_steps=3", f"train.resume={older}", "train.lr=5e-3")).run()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000006", "step-000004", "step-000002"]
    Trainer(_cfg(tiny_sd, run, "train.max_steps=3", f"train.resume={older}", "train.checkpoint_every=2",
                 "train.keep_checkpoints=3")).run()
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000003", "step-000002"]
    aside = run / "checkpoints" / "abandoned-step-000002-0"
    assert sorted(p.name for p in aside.iterdir()) == ["step-000004", "step-000006"]  # kept, out of auto's way


def test_a_checkpoint_of_the_removed_auto_fake_score_resumes_as_what_it_was():
    import yaml

    from diffdistill.config import check_resume, config_to_dict, dump_config

    new = load_config(TINY, ["objective={name: dmd2}", "data.images=digits"])
    old = config_to_dict(new)
    old["objective"]["fake_score"] = "auto"  # full student: auto was a copy, as full is now
    assert check_resume(yaml.safe_dump(old), new) == []
    assert check_resume(dump_config(new), new) == []


def test_process_group_timeout_reaches_accelerate(tiny_sd, tmp_path):
    from datetime import timedelta

    from diffdistill.config import ConfigError

    trainer = Trainer(_cfg(tiny_sd, tmp_path / "r", "train.process_group_timeout=7200"))
    handler = trainer.acc.init_handler
    assert handler is not None and handler.timeout == timedelta(seconds=7200)
    with pytest.raises(ConfigError, match="train.process_group_timeout"):
        _cfg(tiny_sd, tmp_path / "r", "train.process_group_timeout=0")
