"""Schedules and conversions against diffusers' schedulers, the reference."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffdistill.backbone import Cond, DiffusionBackbone
from diffdistill.sampling import sample_ode
from diffdistill.schedule import (
    MIN_COEF,
    PREDICTION_TYPES,
    FlowSchedule,
    VPSchedule,
    convert,
    from_x0_eps,
    to_x0_eps,
)

BETAS = {
    "sd15_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "ddpm_linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.fixture(params=list(BETAS))
def ddpm(request):
    return DDPMScheduler(**BETAS[request.param])


def test_vp_add_noise_and_velocity_match_ddpm(ddpm):
    vp = VPSchedule.from_scheduler(ddpm)
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([0, 1, 17, 250, 500, 731, 998, 999])
    x0, eps = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    t = vp.from_timestep(k).float()  # float32 times, as a training loop would hold them
    assert torch.equal(vp.to_timestep(t), k.double())
    x_t = vp.add_noise(x0, eps, t)
    assert (x_t - ddpm.add_noise(x0, eps, k)).abs().max() < 1e-5
    v_ref = ddpm.get_velocity(x0, eps, k)
    # the v-target as a training loop forms it, from the (x0, eps) pair; also from a config dict
    vp2 = VPSchedule.from_scheduler(dict(ddpm.config))
    assert (from_x0_eps(x0, eps, t, "v", vp2) - v_ref).abs().max() < 1e-5
    # from x0 (or eps) alone the route divides by sigma (or alpha): float32 rounding in x_t grows by it
    for src, pred, coef in (("x0", x0, vp.sigma(t)), ("eps", eps, vp.alpha(t))):
        tol = 1e-6 / coef.float().view(-1, 1, 1, 1)
        assert ((vp.convert(pred, x_t, t, src, "v") - v_ref).abs() <= tol).all(), src


def test_vp_endpoints_and_interpolation(ddpm):
    vp = VPSchedule.from_scheduler(ddpm)
    assert vp.alpha(0.0).item() == 1.0 and vp.sigma(0.0).item() == 0.0
    assert math.isclose(vp.alpha(1.0).item() ** 2, ddpm.alphas_cumprod[-1].item(), rel_tol=1e-6)
    # between two grid points the value lies between theirs
    t = (vp.from_timestep(10) + vp.from_timestep(11)) / 2
    lo, hi = ddpm.alphas_cumprod[11].item(), ddpm.alphas_cumprod[10].item()
    assert lo < vp.alpha(t).item() ** 2 < hi
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        vp.alpha(1.5)


@pytest.mark.parametrize("spacing,offset,n", [("leading", 1, 25), ("leading", 0, 7), ("trailing", 0, 4),
                                              ("trailing", 0, 10), ("linspace", 0, 12)])
def test_vp_grid_matches_ddim_timesteps(spacing, offset, n):
    sched = DDIMScheduler(**BETAS["sd15_scaled_linear"], timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    vp = VPSchedule.from_scheduler(sched)
    grid = vp.grid(n, spacing=spacing, steps_offset=offset)
    assert torch.equal(vp.to_timestep(grid[:-1]).long(), sched.timesteps)
    assert grid[-1].item() == 0.0
    assert vp.grid(n, spacing=spacing, steps_offset=offset, final="first")[-1].item() == vp.from_timestep(0).item()


class _Wiggly(torch.nn.Module):
    """A deterministic stand-in network whose output depends on x and on the timestep."""

    def forward(self, x, timestep, encoder_hidden_states=None, return_dict=False, **_):
        ts = timestep.view(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return (0.4 * x + 0.3 * torch.sin(ts / 97.0 + x),)


@pytest.mark.parametrize("native,diffusers_name", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("betas", ["sd15_scaled_linear", "ddpm_linear"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_euler_sampler_equals_ddim_scheduler(native, diffusers_name, betas, set_alpha_to_one):
    sched = DDIMScheduler(**BETAS[betas], prediction_type=diffusers_name, clip_sample=False,
                          set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    sched.set_timesteps(10)
    net = _Wiggly()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = x.clone()
    for k in sched.timesteps:
        ref = sched.step(net(ref, k.expand(2))[0], k, ref, eta=0.0).prev_sample
    vp = VPSchedule.from_scheduler(sched)
    backbone = DiffusionBackbone(net, vp, native)
    grid = vp.grid(10, "leading", 1, final="clean" if set_alpha_to_one else "first")
    ours = sample_ode(backbone, x, Cond(torch.zeros(2, 1, 1)), grid, solver="ddim")
    # diffusers steps in float32, we in float64: on DDPM's linear betas the samples reach |x| ~ 20, where float32's
    # rounding over 10 steps is ~1e-5 absolute (1.5e-5 measured on this machine's CPU): compare relatively there
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-5), (ours - ref).abs().max()


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matches_flow_match_euler(shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(8)
    flow = FlowSchedule(shift=shift)
    assert torch.allclose(flow.grid(8, t_min=sched.sigma_min).float(), sched.sigmas, atol=1e-6)
    assert torch.allclose(flow.grid(8).float(), sched.sigmas, atol=1e-6)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = sched.sigmas[[0, 3, 6]]
    ref = sched.scale_noise(x0, sched.timesteps[[0, 3, 6]], eps)
    assert (flow.add_noise(x0, eps, t) - ref).abs().max() < 1e-5
    net = _Wiggly()
    x = eps.clone()
    for k in sched.timesteps:
        x = sched.step(net(x, k.expand(3))[0], k, x).prev_sample
    ours = sample_ode(DiffusionBackbone(net, flow, "flow"), eps, Cond(torch.zeros(3, 1, 1)), sched.sigmas)
    assert (ours - x).abs().max() < 1e-5


SCHEDULES = {"vp": VPSchedule.from_scheduler(DDPMScheduler(**BETAS["sd15_scaled_linear"])),
             "flow": FlowSchedule(shift=3.0)}


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), src=st.sampled_from(PREDICTION_TYPES),
       dst=st.sampled_from(PREDICTION_TYPES),
       t=st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-9, 1e-4, 0.5, 1 - 1e-4, 1 - 1e-9, 1.0])),
       seed=st.integers(0, 2**16))
def test_conversions_round_trip(name, src, dst, t, seed):
    schedule = SCHEDULES[name]
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, dtype=torch.float64, generator=g), torch.randn(2, 3, dtype=torch.float64, generator=g)
    x_t = schedule.add_noise(x0, eps, t)
    pred = convert(x0, x_t, t, "x0", src, schedule) if src != "eps" else eps
    there = convert(pred, x_t, t, src, dst, schedule)
    back = convert(there, x_t, t, dst, src, schedule)
    assert torch.isfinite(there).all() and torch.isfinite(back).all()
    # divisions happen on the x0 <-> eps routes only: by sigma out of x0, by alpha out of eps
    a, s = schedule.alpha(t).item(), schedule.sigma(t).item()
    divisors = [s for k in (src, dst) if k == "x0"] + [a for k in (src, dst) if k == "eps"]
    cond_number = 1.0 / max(min(divisors, default=1.0), MIN_COEF)
    if cond_number < 1e6:
        assert torch.allclose(back, pred, atol=1e-9 * cond_number, rtol=1e-7), (back - pred).abs().max()


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_ill_conditioned_endpoints_stay_finite(name):
    schedule = SCHEDULES[name]
    x_t = torch.randn(4, 3)
    for t in (0.0, 1.0):
        for src in PREDICTION_TYPES:
            x0, eps = to_x0_eps(torch.randn(4, 3), x_t, t, src, schedule)
            assert torch.isfinite(x0).all() and torch.isfinite(eps).all()
    # at t = 1 of a flow, x_t is pure noise: eps -> x0 is clamped, not inf
    flow = SCHEDULES["flow"]
    x0 = flow.convert(x_t, x_t, 1.0, "eps", "x0")
    assert torch.isfinite(x0).all() and x0.abs().max() <= 1.0  # (x_t - 1 * eps) / MIN_COEF with eps = x_t is 0


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="'sample'"):
        convert(torch.zeros(1), torch.zeros(1), 0.5, "sample", "x0", SCHEDULES["vp"])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_sample_t(name):
    schedule = SCHEDULES[name]
    g = torch.Generator().manual_seed(0)
    for kind in ("uniform", "logit_normal", "discrete"):
        t = schedule.sample_t(4096, kind, generator=g)
        assert t.shape == (4096,) and t.min() >= 0 and t.max() <= 1
    u = schedule.sample_t(4096, "uniform", generator=g, t_min=0.2, t_max=0.4)
    if name == "vp":
        assert u.min() >= 0.2 and u.max() <= 0.4 and abs(u.mean().item() - 0.3) < 0.01
        d = schedule.sample_t(4096, "discrete", generator=g)
        assert torch.equal(schedule.from_timestep(schedule.to_timestep(d)).float(), d)
        assert len(torch.unique(d)) > 900
        grid = schedule.sample_t(64, "discrete", generator=g, grid=[0.25, 0.5])
        assert set(grid.tolist()) == {0.25, 0.5}
    else:  # flow: shifted towards noise (SD3, shift 3)
        assert u.min() >= schedule.shift_t(0.2).item() - 1e-6 and u.mean() > 0.3
    with pytest.raises(ValueError, match="unknown kind"):
        schedule.sample_t(4, "gamma")
    with pytest.raises(ValueError, match="t_min"):
        schedule.sample_t(4, "uniform", t_min=0.5, t_max=0.5)
