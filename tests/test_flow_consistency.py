"""The consistency family (LCM, PCM, TDD) on flow-matching teachers (SD3).

References: diffusers' ``FlowMatchEulerDiscreteScheduler`` (its training sigmas are the solver grid, its
deterministic step is the sampler PCM exports with), explicit Euler steps of the raw transformer's guided
velocity, and the stock ``StableDiffusion3Pipeline`` with ``load_lora_weights`` for the exported PCM LoRA.
"""

import json
import math

import pytest
import torch
from conftest import TINY_PROMPTS
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from test_trainer import TINY

from diffdistill.batch import micro_batch
from diffdistill.config import ConfigError, load_config
from diffdistill.export import ExportError, RecipeWarning, export_student, read_recipe
from diffdistill.pipeline import load_teacher
from diffdistill.sampling import sample_student
from diffdistill.schedule import FlowSchedule, VPSchedule
from diffdistill.student import Student
from diffdistill.trainer import Trainer

PCM4 = [1.0, 0.9, 0.75, 0.5]  # PCM's 4 phase tops on the 100-point grid: indices 999, 749, 499, 249 at shift 3


def _stock_sigmas(shift: float) -> torch.Tensor:
    """The stock scheduler's 1000 training sigmas, ascending (index k)."""
    return FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.double().flip(0)


def _cfg(tiny_sd3, run, objective: str, *extra):
    return load_config(TINY, [f"teacher.path={tiny_sd3}", f"train.output_dir={run}", f"objective={objective}",
                              "data.images=digits", "train.max_steps=2", "train.sample_every=1000",
                              "train.checkpoint_every=1000", "train.lr=1e-2", *extra])


# -- grid index <-> time --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 6.0])
def test_flow_grid_indices_are_the_flow_schedulers_training_sigmas(shift):
    sched, ks = FlowSchedule(shift=shift), torch.arange(1000, dtype=torch.float64)
    ref = _stock_sigmas(shift)  # float32 in diffusers
    assert (sched.index_time(ks) - ref).abs().max() < 3e-7
    assert sched.index_time(999.0).item() == 1.0 and sched.index_time(-1.0).item() == 0.0
    assert torch.equal(sched.time_index(sched.index_time(ks)), ks)  # integers on the grid, exactly
    assert torch.equal(sched.time_index(ref), ks)  # the stock scheduler's float32 sigmas snap to their index
    assert sched.time_index(1.0).item() == 999.0 and sched.time_index(0.0).item() == -1.0
    frac = torch.tensor([0.37, 17.5, 498.25, 998.9], dtype=torch.float64)
    assert torch.allclose(sched.time_index(sched.index_time(frac)), frac, atol=1e-9)
    assert torch.allclose(sched.index_time(sched.time_index(torch.tensor([0.01, 0.3, 0.77]))),
                          torch.tensor([0.01, 0.3, 0.77], dtype=torch.float64), atol=1e-12)


def test_vp_grid_indices_are_the_diffusers_timesteps_bit_for_bit():
    vp = VPSchedule.from_scheduler(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
    ks = torch.cat([torch.arange(-1, 1000, dtype=torch.float64), torch.tensor([0.5, 12.25, 998.75])])
    assert torch.equal(vp.index_time(ks), vp.from_timestep(ks))
    ts = torch.rand(257, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(vp.time_index(ts), vp.to_timestep(ts))


# -- LCM on the tiny SD3: grid, teacher step, boundary, loss ----------------------------------------------------
def test_lcm_grid_and_teacher_step_are_the_flow_schedulers(tiny_sd3, tmp_path, one_thread):
    trainer = Trainer(_cfg(tiny_sd3, tmp_path / "r", "{name: lcm}", "student.kind=lora", "student.lora_rank=4",
                           "student.timesteps=[1.0, 0.75]"))
    obj, teacher = trainer.objective, trainer.teacher
    sched = teacher.backbone.schedule
    assert isinstance(sched, FlowSchedule) and sched.shift == 3.0
    stock = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
    ref = stock.sigmas.double().flip(0)  # index k -> the k-th training sigma, ascending
    assert torch.allclose(sched.index_time(obj.grid_ks), ref[19::20], atol=3e-7)  # 50 points, top sigma 1
    batch = micro_batch(trainer.prompts, 6, 0, 3)
    t_n, t_m, t_end = obj.times(batch)
    k_n = (t_n.unsqueeze(1) - ref).abs().argmin(1)  # each time's index among the stock sigmas
    k_m = (t_m.unsqueeze(1) - ref).abs().argmin(1)
    assert torch.allclose(t_n, ref[k_n], atol=3e-7) and torch.allclose(t_m, ref[k_m], atol=3e-7)
    assert set(k_n.tolist()) <= set(range(19, 1000, 20)) and torch.equal(k_m, (k_n - 20).clamp_min(0))
    assert torch.allclose(t_end, ref[0].expand(6), atol=3e-7)  # LCM maps to index 0: shift_t(1/1000), not 0
    # the teacher's step is the Euler step of the raw transformer's guided velocity between stock sigmas
    cond, uncond = teacher.encode_prompt(["a 3", "a 7"]), teacher.empty_cond(2)
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    tf = teacher.backbone.denoiser
    for k in (999, 519, 19):
        s, s_prev = ref[k].float(), ref[max(k - 20, 0)].float()

        def v(c, s=s):
            return tf(hidden_states=x, timestep=(s * 1000).expand(2), encoder_hidden_states=c.embeds,
                      pooled_projections=c.extra["text_embeds"], return_dict=False)[0]

        with torch.no_grad():
            v_c, v_u = v(cond), v(uncond)
        ref_step = x + (s_prev - s) * (v_u + 3.0 * (v_c - v_u))
        ours = obj.teacher_step(x, sched.index_time(torch.full((2,), float(k))),
                                sched.index_time(torch.full((2,), float(max(k - 20, 0)))), cond, torch.full((2,), 3.0))
        assert torch.allclose(ours, ref_step, atol=2e-5), (k, (ours - ref_step).abs().max())
    # the boundary: f is the identity at index 0 (c_skip 1, c_out 0), the network's x0 at the top
    t0 = sched.index_time(torch.zeros(2))
    assert torch.equal(obj.consistency(obj.student, x, t0, t0, cond), x)
    t1 = sched.index_time(torch.full((2,), 999.0))
    with torch.no_grad():
        assert torch.allclose(obj.consistency(obj.student, x, t1, t0, cond), obj.student(x, t1, cond, out="x0"),
                              atol=1e-5)
    # the loss trains the student only
    base = {k: p.detach().clone() for k, p in tf.named_parameters() if "lora" not in k}
    out = trainer.phase_loss("student", trainer.micro_batch(0))
    assert torch.isfinite(out.total) and out.total > 0
    out.total.backward()
    grads = [p.grad for p in trainer.groups["student"].values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    trainer.run()
    after = dict(tf.named_parameters())
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_off_grid_student_times_are_refused(tiny_sd3, tmp_path):
    # 0.5 is index 249 at shift 3: not on the 50-point grid (239, 259), on the 100-point one
    with pytest.raises(ConfigError, match=r"student\.timesteps.*249"):
        Trainer(_cfg(tiny_sd3, tmp_path / "r", "{name: lcm}", "student.timesteps=[1.0, 0.5]"))
    with pytest.raises(ConfigError, match=r"student\.timesteps.*249"):
        Trainer(_cfg(tiny_sd3, tmp_path / "p", "{name: pcm}", "student.timesteps=[1.0, 0.5]"))
    Trainer(_cfg(tiny_sd3, tmp_path / "ok", "{name: pcm, num_ddim_timesteps: 100}", "student.timesteps=[1.0, 0.5]"))


# -- PCM and TDD through the Trainer; PCM's LoRA in the stock pipeline ---------------------------------------------
def _train(tiny_sd3, run, objective, *extra):
    trainer = Trainer(_cfg(tiny_sd3, run, objective, *extra))
    base = {k: p.detach().clone() for k, p in trainer.teacher.backbone.denoiser.named_parameters() if "lora" not in k}
    before = {k: p.detach().clone() for k, p in trainer.student.named_parameters_to_train().items()}
    trainer.run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(not r.get("skipped") and math.isfinite(r["grad_norm"]) for r in records)
    after = dict(trainer.teacher.backbone.denoiser.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the teacher never moves
    assert any(not torch.equal(p, before[k]) for k, p in trainer.student.named_parameters_to_train().items())
    return trainer


@pytest.mark.filterwarnings("ignore::diffdistill.export.RecipeWarning")  # the Trainer's own final export
def test_pcm_trains_and_its_lora_samples_as_the_stock_pipeline(tiny_sd3, tmp_path, one_thread):
    from diffusers import StableDiffusion3Pipeline

    trainer = _train(tiny_sd3, tmp_path / "run", "{name: pcm, num_ddim_timesteps: 100}", "student.kind=lora",
                     "student.lora_rank=4", f"student.timesteps={PCM4}", "student.gamma=0.0", "student.guidance=1.5")
    obj, teacher, student = trainer.objective, trainer.teacher, trainer.student
    sched = teacher.backbone.schedule
    tops = sched.index_time(obj.grid_ks[obj.edge_index[1:] - 1].tolist() + [999.0]).flip(0)
    assert torch.allclose(tops, torch.tensor(PCM4, dtype=torch.float64), atol=1e-12)  # the phase tops
    assert torch.allclose(sched.index_time(obj.phase_edges()), _stock_sigmas(3.0)[[0, 249, 499, 749]], atol=3e-7)
    with pytest.warns(RecipeWarning, match=r"sigmas=\[1.0, 0.9, 0.75, 0.5\]"):
        out = export_student(teacher, student, tmp_path / "pcm")
    recipe = read_recipe(out)
    assert recipe["gamma"] == 0.0 and recipe["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert "stochastic_sampling=False" in (out / "README.md").read_text()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert not pipe.scheduler.config.stochastic_sampling
    pipe.load_lora_weights(str(out))

    def ours(s):
        g = torch.Generator().manual_seed(7)
        noise = torch.randn((2, *teacher.latent_shape), generator=g)
        latents = s.generate(noise, teacher.encode_prompt(TINY_PROMPTS), teacher.empty_cond(2))
        return (teacher.decode_latents(latents) / 2 + 0.5).clamp(0, 1)

    mine = ours(student)
    theirs = pipe(TINY_PROMPTS, guidance_scale=1.5, num_inference_steps=4, sigmas=PCM4, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    diff = (mine - theirs).abs().max().item()
    print(f"\nPCM LoRA on SD3, 4 deterministic steps: max |ours - stock pipeline| = {diff:.2e}")
    assert diff < 1e-4
    base = Student(student.backbone, None, student.timesteps, student.guidance, student.gamma)
    assert (ours(base) - mine).abs().mean() > 1e-3  # the trained adapter matters


def test_tdd_trains_on_a_flow_teacher(tiny_sd3, tmp_path, one_thread):
    trainer = _train(tiny_sd3, tmp_path / "run", "{name: tdd, num_ddim_timesteps: 100}",
                     "student.timesteps=[1.0, 0.75]", "student.gamma=0.2")
    obj, sched = trainer.objective, trainer.teacher.backbone.schedule
    t_n, t_m, t_end = obj.times(micro_batch(trainer.prompts, 8, 0, 5))
    k_n, k_m, k_s = sched.time_index(t_n), sched.time_index(t_m), sched.time_index(t_end)
    assert torch.equal(k_m, (k_n - 10).clamp_min(0))  # one step down the 100-point grid of flow sigmas
    assert torch.equal(k_s, k_s.round()) and (k_s <= k_m).all()  # TDD's s: an index at or below the target
    assert set(obj.candidates.tolist()) <= {0.0, *obj.grid_ks.tolist()}
    with pytest.raises(ExportError, match=r"0 < gamma < 1"):  # no stock flow scheduler has TCD's gamma
        export_student(trainer.teacher, trainer.student, tmp_path / "tdd")


# -- the flow sampler --------------------------------------------------------------------------------------------
def test_deterministic_flow_sampler_is_the_euler_step_at_any_times(tiny_sd3, one_thread):
    """``gamma = 0`` on a flow schedule steps exactly to each given time (no flooring onto a grid) and lands on
    t = 0; ``0 < gamma < 1`` jumps to the floored grid index and re-noises by the forward process."""
    teacher = load_teacher(tiny_sd3)
    bb = teacher.backbone
    cond = teacher.encode_prompt(TINY_PROMPTS)
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    ts = [1.0, 0.8123, 0.3377]
    with torch.no_grad():
        x = noise
        for t, t_next in zip(ts, [*ts[1:], 0.0]):
            x = x + (t_next - t) * bb(x, t, cond, out="flow")
        ours = sample_student(bb, noise, cond, ts, gamma=0.0)
    assert (ours - x).abs().max() < 1e-5
    # gamma 0.5, one intermediate time: s = floor(0.5 * index(0.8123)) and x_next = (a'/a_s) x_s + std * noise
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = sample_student(bb, noise, cond, [1.0, 0.8123], gamma=0.5, generator=g)
        v = bb(noise, 1.0, cond, out="flow")
        x0, eps = noise - v, noise  # at t = 1: x = eps
        sched = bb.schedule
        t_s = sched.index_time(math.floor(0.5 * sched.time_index(0.8123).item())).item()
        x_s = (1 - t_s) * x0 + t_s * eps
        ratio = (1 - 0.8123) / (1 - t_s)
        fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
        x_next = ratio * x_s + math.sqrt(0.8123**2 - (ratio * t_s) ** 2) * fresh
        last = x_next - 0.8123 * bb(x_next, 0.8123, cond, out="flow")  # lands on t = 0: x0
    assert (out - last).abs().max() < 1e-5


@pytest.mark.parametrize("path, name", [("configs/pcm/sd3_lora.yaml", "pcm"), ("configs/lcm/sd3_lora.yaml", "lcm")])
def test_sd3_configs_load_with_times_on_their_grid(path, name):
    """The shipped SD3 configs (SD3 Medium's scheduler: shift 3, 1000 training sigmas) sample on their solver
    grid; PCM's times are its phase tops and it samples deterministically."""
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / path)
    obj, student = cfg.objective, cfg.student
    assert obj.name == name and student.kind == "lora" and (student.gamma == 0.0) == (name == "pcm")
    skip = 1000 // obj.num_ddim_timesteps
    ks = FlowSchedule(shift=3.0).time_index(torch.tensor(student.timesteps))
    assert torch.equal(ks, ks.round()) and all((k + 1) % skip == 0 for k in ks.tolist())
    if name == "pcm":
        assert obj.w_min == obj.w_max == 4.0  # the official w = 3 as cond + w (cond - uncond)
        N, K = obj.num_ddim_timesteps, obj.num_phases
        edges = torch.linspace(0, N, K + 1)[:-1].floor().long()
        tops = [(int(e) * skip - 1) for e in [*edges[1:].tolist(), N]]  # the grid point just below each next edge
        assert sorted(ks.long().tolist()) == tops


def test_dpdmd_rollout_is_the_deterministic_flow_sampler(tiny_sd3, tmp_path, one_thread):
    """DP-DMD's differentiable rollout mirrors ``sample_student`` at gamma 0, on a flow teacher too (times that
    ``floor(1000 t)`` would move)."""
    trainer = Trainer(load_config(TINY, [f"teacher.path={tiny_sd3}", f"train.output_dir={tmp_path / 'r'}",
                                         "objective={name: dpdmd, anchor_steps: 2, anchor_grid: 4}",
                                         "student.timesteps=[1.0, 0.8123, 0.3377]", "student.gamma=0.0"]))
    cond = trainer.teacher.encode_prompt(TINY_PROMPTS)
    noise = torch.randn(2, *trainer.teacher.latent_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, final = trainer.objective.rollout(micro_batch(trainer.prompts, 2, 0, 0), cond, grad=False, noise=noise)
        assert (final - trainer.student.generate(noise, cond)).abs().max() < 1e-5
